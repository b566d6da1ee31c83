"""TPGM for PyTorch (ALGORITHMS.md §7): one call, the model's mode, exclusions, batches, resume, errors."""

import copy
import itertools

import numpy as np
import pytest
import torch

from tether import core
from tether.adapters.torch import TPGM


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()


def _finetune(model, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _batches(n=3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(n)
    ]


def _loss(model):
    return lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_iters_zero_projects_with_half_the_smallest_norm():
    model = _model()
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    tpgm = TPGM(model, norm="mars")
    _finetune(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert tpgm.step(_loss(model), _batches(), iters=0) is None
    for i, (name, p) in enumerate(model.named_parameters()):
        c = (before[name] - anchors[name]).numpy()
        n = np.asarray(core.mars_norm(c))
        gamma = n.min() / 2
        expected = anchors[name].numpy() + np.clip(gamma / (n + 1e-8), 0, 1) * c
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-14, atol=1e-15)
        assert float(tpgm.constraints[i]) == pytest.approx(gamma, rel=1e-14)


def test_the_loss_sees_the_projected_weights_in_eval_mode_and_the_mode_comes_back():
    model = _model()
    tpgm = TPGM(model, lr=0.05)
    _finetune(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    originals = dict(model.named_parameters())
    seen = []

    def loss_fn(batch):
        seen.append(model.training)
        current = dict(model.named_parameters())
        # the projected weights, not the fine-tuned ones (which stay untouched until the projection)
        assert not torch.equal(current["0.weight"].detach(), weights["0.weight"])
        assert current["0.weight"].requires_grad and current["0.weight"].grad_fn is not None
        assert all(torch.equal(originals[n].detach(), w) for n, w in weights.items())
        return _loss(model)(batch)

    model.train()
    tpgm.step(loss_fn, _batches(), iters=2)
    assert seen == [False, False] and model.training
    assert all(p.grad is None for p in model.parameters())  # gradients went to the constraints only


def test_excluded_and_frozen_tensors_are_not_projected():
    model = _model()
    model[0].bias.requires_grad_(False)
    tpgm = TPGM(model, exclude=["3.*"])
    assert tpgm.names == ["0.weight"]
    _finetune(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tpgm.step(_loss(model), _batches(), iters=1)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name != "0.weight"), name


def test_batches_are_one_iterator_across_calls_restarted_when_exhausted():
    model = _model()
    tpgm = TPGM(model)
    _finetune(model)
    batches = _batches(n=3)
    order = []

    def loss_fn(batch):
        order.append(next(i for i, b in enumerate(batches) if b[0] is batch[0]))
        return _loss(model)(batch)

    tpgm.step(loss_fn, batches, iters=2)
    tpgm.step(loss_fn, batches, iters=3)
    assert order == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="exhausted"):
        tpgm.step(loss_fn, (b for b in []), iters=1)


def _run(model, tpgm, calls, batches):
    for call in range(calls):
        _finetune(model, seed=10 + call, scale=0.05)
        tpgm.step(_loss(model), batches, iters=2)


def test_resume_is_bit_for_bit():
    batches = _batches(n=4)
    model = _model()
    tpgm = TPGM(model, lr=0.02)
    _run(model, tpgm, 5, itertools.cycle(batches))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    model = _model()
    tpgm = TPGM(model, lr=0.02)
    data = itertools.cycle(batches)  # the validation stream goes on where it was
    _run(model, tpgm, 3, data)
    saved = copy.deepcopy({"model": model.state_dict(), "tpgm": tpgm.state_dict()})
    fresh = _model(seed=5)
    fresh.load_state_dict(saved["model"])
    resumed = TPGM(fresh, lr=0.5)
    resumed.load_state_dict(saved["tpgm"])
    for call in range(3, 5):
        _finetune(fresh, seed=10 + call, scale=0.05)
        resumed.step(_loss(fresh), data, iters=2)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, expected[n]), n


def test_load_state_dict_checks_before_changing_anything():
    model = _model()
    tpgm = TPGM(model)
    _finetune(model)
    tpgm.step(_loss(model), _batches(), iters=1)
    state = tpgm.state_dict()
    other = TPGM(_model())
    with pytest.raises(ValueError, match="TPGM state dict"):
        other.load_state_dict({"state": state["state"]})
    broken = copy.deepcopy(state)
    broken["state"]["0.weight"]["constraint"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"'constraint' of parameter '0\.weight'"):
        other.load_state_dict(broken)
    assert other.constraints is None
    with pytest.raises(ValueError, match="constrains"):
        TPGM(_model(), exclude="3.bias").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(norm="linf"), ValueError, "norm"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(exclude=["head.*"]), ValueError, "matches no trainable parameter"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TPGM(_model(), **kwargs)


def test_bad_iters_and_a_model_without_trainable_parameters():
    model = _model()
    with pytest.raises(ValueError, match="iters"):
        TPGM(model).step(_loss(model), _batches(), iters=-1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        TPGM(model)
