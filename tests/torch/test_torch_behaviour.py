"""How the optimizers behave in a training loop: checks, skips, groups, schedulers, AMP, dtypes, devices."""

import copy

import pytest
import torch
from torch_helpers import BUILDERS, state_tensors

from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
FUSED = [AdamFTP, SGDFTP, AdamSPD]


def model(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        dtype=dtype, device=device
    )


def train(opt, net, steps=5, seed=1, scaler=None, scheduler=None, dtype=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    p0 = next(net.parameters())
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(device=p0.device, dtype=dtype or p0.dtype)
        loss = net(x).pow(2).mean() * scale
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
    return loss


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


# -- construction checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kw", "name"),
    [
        (AdamFTP, dict(lr=-1.0), "lr"),
        (AdamFTP, dict(eps=-1e-8), "eps"),
        (AdamFTP, dict(weight_decay=-0.1), "weight_decay"),
        (AdamFTP, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (AdamSPD, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (AdamFTP, dict(k=1.5), "k"),
        (SGDFTP, dict(k=-0.1), "k"),
        (SGDFTP, dict(lr=-0.1), "lr"),
        (SGDFTP, dict(momentum=-0.9), "momentum"),
        (SGDFTP, dict(nesterov=True), "nesterov"),
        (AdamSPD, dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_value_error(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(model().parameters(), **kw)


def test_bad_anchor_and_types():
    net = model()
    with pytest.raises(ValueError, match="anchor"):
        AdamFTP([{"params": net.parameters(), "anchor": "pretrained"}])
    with pytest.raises(TypeError, match="lr"):
        AdamSPD(net.parameters(), lr="0.1")
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        FTP(net.parameters())
    with pytest.raises(ValueError, match="weight_decay"):
        SPD(torch.optim.AdamW(net.parameters()), weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        SPD(torch.optim.Adam(net.parameters()), weight_decay=-0.1)
    with pytest.raises(ValueError, match="k"):
        FTP(torch.optim.SGD(net.parameters()), k=2.0)


@pytest.mark.parametrize("cls", FUSED)
def test_a_tensor_lr_follows_torch_optims_rules(cls):
    """One floating-point value, as ``torch.optim.Adam`` takes it; its value is checked when it is set."""
    net = model()
    for lr in (torch.tensor(0.1), torch.tensor([0.1], dtype=torch.float64)):
        cls(net.parameters(), lr=lr)
    with pytest.raises(ValueError, match="one floating-point value"):
        cls(net.parameters(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="one floating-point value"):
        cls(net.parameters(), lr=torch.tensor(1))
    with pytest.raises(ValueError, match="lr"):
        cls(net.parameters(), lr=torch.tensor(-0.1))
    opt = cls(net.parameters(), lr=torch.tensor(0.1))
    state_dict = opt.state_dict()
    state_dict["param_groups"][0]["lr"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(state_dict)


@pytest.mark.parametrize("kind", ["AdamFTP", "SGDFTP", "AdamSPD"])
def test_a_tensor_lr_equals_the_float(kind):
    """A float64 tensor lr and the float: the same run at 1e-12 (Adam folds a tensor lr into its
    denominator, so that it stays on the device). Its shape (1,) and a scheduler's ``fill_`` too."""
    runs = []
    for lr in (0.05, torch.tensor([0.05], dtype=torch.float64)):
        net = model(dtype=torch.float64)
        opt = BUILDERS[kind](net.parameters())
        opt.param_groups[0]["lr"] = lr
        scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        train(opt, net, steps=6, scheduler=scheduler)
        runs.append(params_of(net))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", FUSED)
def test_sparse_and_complex_gradients_raise_before_any_update(cls):
    net = model()
    opt = cls(
        [{"params": net[0].named_parameters(prefix="first")}, {"params": [("last.weight", net[2].weight)]}],
        lr=0.1,
    )
    before = params_of(net)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    net[2].weight.grad = torch.ones_like(net[2].weight).to_sparse()
    with pytest.raises(TypeError, match=r"'last\.weight'.*sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(net), strict=True))
    assert all("step" not in s for s in opt.state.values())
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        cls([z], lr=0.1)


# -- anchors, skips, groups ------------------------------------------------------------------


def test_named_parameters_and_anchor_modes():
    net = model()
    opt = AdamFTP(
        [
            {"params": net[0].named_parameters(prefix="body")},
            {"params": net[2].named_parameters(prefix="head"), "anchor": "zero"},
        ]
    )
    assert opt.param_groups[0]["param_names"] == ["body.weight", "body.bias"]
    assert torch.equal(opt.state[net[0].weight]["anchor"], net[0].weight)
    assert opt.state[net[0].weight]["anchor"].data_ptr() != net[0].weight.data_ptr()
    assert "anchor" not in opt.state[net[2].weight]
    assert opt.param_groups[1]["anchor"] == "zero"


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_none_grads_are_skipped(kind):
    net = model()
    opt = BUILDERS[kind]([{"params": net[0].parameters()}, {"params": net[2].parameters(), "anchor": "zero"}])
    train(opt, net, steps=2)
    frozen = net[0].bias
    state_before = copy.deepcopy(opt.state[frozen])
    value_before = frozen.detach().clone()
    x = torch.randn(4, 6)
    opt.zero_grad()
    net(x).sum().backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, value_before)
    for key, value in opt.state[frozen].items():
        assert torch.equal(value, state_before[key]), key
    assert float(opt.state[net[0].weight].get("step", torch.tensor(3.0))) == 3.0


def _random_grads(nets, step, skip=()):
    gen = torch.Generator().manual_seed(step)
    for net in nets:
        gen.manual_seed(step)
        for i, p in enumerate(net.parameters()):
            g = torch.randn(p.shape, generator=gen)
            p.grad = None if (net, i) in skip else g


def test_skipped_tensor_does_not_change_others():
    a, b = model(), model()
    opt_a, opt_b = AdamFTP(a.parameters(), lr=0.05), AdamFTP(b.parameters(), lr=0.05)
    for step in range(4):
        _random_grads((a, b), step, skip={(b, 1)} if step >= 1 else ())
        opt_a.step()
        opt_b.step()
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
        if i != 1:
            assert torch.equal(p, q), i
    assert not torch.equal(opt_a.state[a[0].bias]["exp_avg"], opt_b.state[b[0].bias]["exp_avg"])
    assert float(opt_b.state[b[0].bias]["step"]) == 1.0
    assert float(opt_b.state[b[0].weight]["step"]) == 4.0


def test_groups_with_different_hyperparameters_equal_separate_optimizers():
    net, first, second = model(), model(), model()
    opt = AdamSPD(
        [
            {"params": net[0].parameters(), "lr": 0.1, "weight_decay": 0.5},
            {"params": net[2].parameters(), "lr": 0.01, "anchor": "zero", "amsgrad": True},
        ],
        weight_decay=1.0,
    )
    opt1 = AdamSPD(first[0].parameters(), lr=0.1, weight_decay=0.5)
    opt2 = AdamSPD(
        [{"params": second[2].parameters(), "anchor": "zero"}], lr=0.01, weight_decay=1.0, amsgrad=True
    )
    for step in range(4):
        _random_grads((net, first, second), step)
        opt.step()
        opt1.step()
        opt2.step()
    assert torch.equal(net[0].weight, first[0].weight)
    assert torch.equal(net[2].weight, second[2].weight)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_lr_schedulers_and_closure(kind):
    net = model()
    opt = BUILDERS[kind](net.parameters())
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    ]
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        for s in schedulers:
            s.step()
    assert torch.isfinite(loss)
    lr = opt.param_groups[0]["lr"]
    if isinstance(opt, (FTP, SPD)):
        assert opt.optimizer.param_groups[0]["lr"] == lr
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    plateau.step(1.0)
    plateau.step(2.0)
    assert opt.param_groups[0]["lr"] < lr


# -- AMP, dtypes, devices ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_grad_scaler(kind):
    plain, scaled = model(), model()
    train(BUILDERS[kind](plain.parameters()), plain, steps=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = BUILDERS[kind](scaled.parameters())
    train(opt, scaled, steps=3, scaler=scaler)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # an inf gradient: the scaler skips the step and nothing moves
    before = params_of(scaled)
    opt.zero_grad()
    scaler.scale(scaled(torch.randn(2, 6)).sum()).backward()
    next(scaled.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(scaled), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_low_precision_parameters(kind, dtype):
    """16-bit parameters keep their dtype; FTP's and SPD's statistics are float32 and stay finite."""
    eps = 1e-4 if dtype == torch.float16 else 1e-8  # 1e-8 is 0 in float16, as for torch.optim.Adam
    # float16 Adam's second moments underflow for small gradients, as torch.optim.Adam's do without a
    # GradScaler: a larger loss (Adam is scale-invariant) keeps the base step itself comparable
    scale = 100.0 if dtype == torch.float16 and kind != "SGDFTP" else 1.0
    reference, net = model(), model(dtype=dtype)
    with torch.no_grad():  # the same (rounded) start for both runs
        for p, q in zip(reference.parameters(), net.parameters(), strict=True):
            p.copy_(q.float())
    reference_opt = BUILDERS[kind](list(reference.parameters()), eps=eps)
    train(reference_opt, reference, steps=6, dtype=torch.float32, scale=scale)
    opt = BUILDERS[kind](list(net.parameters()), eps=eps)
    train(opt, net, steps=6, scale=scale)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.float(), q, rtol=0.05, atol=0.02)
    for name, value in state_tensors(opt.state_dict()).items():
        key = name.split(":")[1].removeprefix("base.")
        if key.startswith("radius") or key in ("step", "prev_inv_norm"):
            assert value.dtype == torch.float32, key
        elif value.ndim:
            assert value.dtype == dtype, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_devices(kind, device):
    net = model(device=device)
    opt = BUILDERS[kind](net.parameters())
    train(opt, net, steps=3)
    for state in opt.state.values():
        for value in state.values():
            assert value.device == net[0].weight.device
    if device == "cuda":
        cpu = model()
        train(BUILDERS[kind](cpu.parameters()), cpu, steps=3)
        for a, b in zip(net.parameters(), cpu.parameters(), strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_no_host_sync_on_cuda(kind):
    net = model(device="cuda")
    opt = BUILDERS[kind](net.parameters())
    train(opt, net, steps=2)
    net(torch.randn(4, 6, device="cuda")).sum().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("through", ["wrapper", "base"])
def test_wrapper_param_groups_added_later(through):
    net = model()
    base = torch.optim.SGD(net[0].parameters(), lr=0.1)
    opt = FTP(base)
    before = net[2].weight.detach().clone()
    target = opt if through == "wrapper" else base
    target.add_param_group({"params": net[2].parameters(), "lr": 0.01})
    assert len(opt.param_groups) == len(base.param_groups) == 2
    net(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert torch.equal(opt.state[net[2].weight]["anchor"], before)
    assert opt.param_groups[1]["anchor"] == "init" and opt.param_groups[1]["k"] == 1.0


@pytest.mark.parametrize("kind", ["AdamFTP", "AdamSPD", "SGDFTP"])
def test_skipping_leaves_the_other_tensors_bit_for_bit(kind):
    """With enough tensors that the stacked per-tensor scalars span vectorised and tail lanes."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(40)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = BUILDERS[kind](a), BUILDERS[kind](b)
    for step in range(12):
        gen = torch.Generator().manual_seed(step)
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), (None if i == 3 and step % 2 else g.clone())
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for i, (p, q) in enumerate(zip(a, b, strict=True)) if i != 3)
