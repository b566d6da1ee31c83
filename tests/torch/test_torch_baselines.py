"""L2-SP, MARS-SP and WiSE-FT for PyTorch (ALGORITHMS.md §8), against the core in float64."""

import numpy as np
import pytest
import torch
from torch_helpers import ANCHORS, make_params, named_groups, set_grads

from tether import core
from tether.adapters.torch import L2SP, MARSSP, wise_ft
from tether.core.reference import closed_loop_problem

STEPS = 8


def _reference(problem, kind, hyper):
    """The wrapper's trajectory by the core on NumPy: Adam (L2-SP) or SGD with momentum (MARS-SP)."""
    params = {n: v.copy() for n, v in problem.theta0.items()}
    base = {n: core.adam_init(v) if kind == "l2sp" else core.sgd_init(v) for n, v in params.items()}
    for t in range(STEPS):
        for n, theta in params.items():
            mode = ANCHORS.get(n, "init")
            anchor = problem.theta0[n] if mode == "init" else None
            g = problem.gradient(n, theta, t)
            if kind == "l2sp":
                if mode is not None:
                    g = core.l2_sp_gradient(g, theta, anchor, hyper["alpha"])
                d, base[n] = core.adam_direction(g, base[n], t + 1, lr=0.05)
                params[n] = theta - d
            else:
                d, base[n] = core.sgd_direction(g, theta, base[n], t + 1, lr=0.05, momentum=0.9)
                params[n] = theta - d
                if mode is not None:
                    params[n] = core.mars_sp_project(params[n], anchor, hyper["radius"])
    return params


@pytest.mark.parametrize(
    ("kind", "hyper"), [("l2sp", {"alpha": 0.3}), ("marssp", {"radius": 0.4}), ("marssp", {"radius": 50.0})]
)
def test_wrappers_follow_the_core_in_float64(kind, hyper):
    problem = closed_loop_problem(seed=3, steps=STEPS)
    params = make_params(problem)
    groups = named_groups(params)
    if kind == "l2sp":
        opt = L2SP(torch.optim.Adam(groups, lr=0.05), **hyper)
    else:
        opt = MARSSP(torch.optim.SGD(groups, lr=0.05, momentum=0.9), **hyper)
    for t in range(STEPS):
        set_grads(params, problem, t)
        raw = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        assert all(torch.equal(p.grad, raw[n]) for n, p in params.items())  # the user's gradients are back
    expected = _reference(problem, kind, hyper)
    for n, p in params.items():
        np.testing.assert_allclose(p.detach().numpy(), expected[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_marssp_keeps_every_row_within_the_radius():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    anchor = w.detach().clone()
    opt = MARSSP(torch.optim.SGD([w], lr=0.5), radius=0.25)
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    rows = (w.detach() - anchor).abs().sum(dim=1)
    assert torch.all(rows <= 0.25 * (1 + 1e-6)) and torch.all(rows > 0.2)


@pytest.mark.parametrize(("cls", "kw"), [(L2SP, {"alpha": -0.1}), (MARSSP, {"radius": -1.0})])
def test_negative_strengths_are_refused(cls, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        cls(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), **kw)


def _bn_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_wise_ft_interpolates_every_floating_entry():
    pretrained = _bn_model(0)
    anchor = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = _bn_model(0)
    model.train()
    model(torch.randn(8, 3))  # moves BatchNorm's running statistics and its counter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}
    for alpha in (0.0, 0.3, 1.0):
        mixed = wise_ft(model, anchor, alpha)
        for key, value in mixed.items():
            if torch.is_floating_point(value):
                torch.testing.assert_close(value, (1 - alpha) * anchor[key] + alpha * finetuned[key])
            else:
                assert torch.equal(value, finetuned[key]), key  # num_batches_tracked
    assert all(torch.equal(v, finetuned[k]) for k, v in model.state_dict().items())  # the model is untouched
    model.load_state_dict(wise_ft(model, anchor, 0.0))
    assert all(
        torch.equal(v.float(), anchor[k].float()) for k, v in model.state_dict().items() if "num" not in k
    )


def test_wise_ft_refuses_bad_input():
    model = _bn_model(0)
    anchor = model.state_dict()
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(model, anchor, -0.5)
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(model, anchor, 1.5)
    with pytest.raises(ValueError, match="lacks"):
        wise_ft(model, {k: v for k, v in anchor.items() if k != "0.bias"}, 0.5)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        wise_ft(model, {**anchor, "0.weight": torch.zeros(2, 2)}, 0.5)
