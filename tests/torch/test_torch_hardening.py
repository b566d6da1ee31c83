"""What breaks in the field: 16-bit tensors, empty tensors, bad input, changed anchors, foreign state
dicts, zero-anchored LoRA, the thread count, and the SPD wrapper's memory."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch_helpers import BUILDERS, require_kernels

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, L2SP, MARSSP, SGDFTP, SPD, AdamFTP, AdamSPD

KINDS = sorted(BUILDERS)
PROJECTING = {"AdamFTP", "SGDFTP", "FTP"}
#: No weight decay: a row without gradient takes no step at all.
PLAIN = {
    "AdamFTP": lambda ps: AdamFTP(ps, lr=0.1, eps=1e-4),
    "SGDFTP": lambda ps: SGDFTP(ps, lr=0.1),
    "AdamSPD": lambda ps: AdamSPD(ps, lr=0.1, eps=1e-4, weight_decay=1.0),
    "FTP": lambda ps: FTP(torch.optim.SGD(ps, lr=0.1)),
    "SPD": lambda ps: SPD(torch.optim.Adam(ps, lr=0.1, eps=1e-4), weight_decay=1.0),
    "L2SP": lambda ps: L2SP(torch.optim.Adam(ps, lr=0.1, eps=1e-4), alpha=0.5),
    "MARSSP": lambda ps: MARSSP(torch.optim.SGD(ps, lr=0.1), radius=0.1),
}


def _state_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_same_state(x, y)
        elif isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                if isinstance(u, dict):
                    _assert_same_state(u, v)
                else:
                    assert u == v
        elif torch.is_tensor(x):
            assert torch.equal(x, y), key
        else:
            assert x == y, key


# -- 16-bit parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_gradient_row_stays_finite_in_16_bit(kind, dtype):
    """float16 rounds the norm's 1e-8 to 0: a row with no step made a NaN row (SGDFTP, lr 0.1)."""
    p = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, -1.0]], dtype=dtype))
    opt = PLAIN[kind]([p])
    for step in range(6):
        p.grad = torch.tensor([[0.3, -0.2, 0.1 * step], [0.0, 0.0, 0.0]], dtype=dtype)
        opt.step()
        assert torch.isfinite(p).all(), step


@pytest.mark.parametrize("cls", [AdamFTP, AdamSPD])
def test_float16_adam_with_a_tiny_learning_rate_stays_finite(cls):
    """AdamFTP(lr=1e-5, eps=1e-4) on float16 went NaN at step 2 (1/n overflows for small rows)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 8).half()
    opt = cls(net.parameters(), lr=1e-5, eps=1e-4)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(4, 16).half()).float().pow(2).mean().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in net.parameters())
    for p in net.parameters():
        state = opt.state[p]
        if "prev_inv_norm" in state:
            assert state["prev_inv_norm"].dtype == torch.float32
            assert torch.isfinite(state["prev_inv_norm"]).all()


@pytest.mark.parametrize("anchored", [True, False])
def test_16_bit_spd_decay_is_computed_in_float32(anchored):
    """``1 − λr`` rounded to bfloat16 (0.97 → 0.96875) shifted every decayed bfloat16 tensor."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(1000, generator=gen).bfloat16()
    anchor = torch.randn(1000, generator=gen).bfloat16() if anchored else None
    keep = torch.tensor([0.97])
    widened = c.float() * keep[0]
    expected = (widened if anchor is None else anchor.float() + widened).bfloat16()
    p = c.clone()
    _torch_ops.spd_decay_([p], [anchor], keep)
    assert torch.equal(p, expected)
    # the wrapper's form, θ̃ ← (1 − λr) θ̃ + λr θ₀
    theta = c.clone()
    _torch_ops.decay_toward_anchors_([theta], [anchor], 1 - keep)
    decayed = c.float() * keep[0] + (0 if anchor is None else anchor.float() * (1 - keep[0]))
    assert torch.equal(theta, decayed.bfloat16())


# -- empty tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_empty_tensors_are_skipped(kind):
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    full, alone = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    empties = [torch.nn.Parameter(torch.zeros(0, 5)), torch.nn.Parameter(torch.zeros(0))]
    opt = BUILDERS[kind]([full, *empties])
    reference = BUILDERS[kind]([alone])
    for step in range(4):
        g = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        full.grad, alone.grad = g.clone(), g.clone()
        for e in empties:
            e.grad = torch.zeros_like(e)
        opt.step()
        reference.step()
    assert torch.equal(full, alone)
    assert all(e.shape[0] == 0 for e in empties)


# -- nothing is half-updated ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_integer_and_bool_parameters_are_refused_by_name(kind):
    net = torch.nn.Linear(3, 2)
    for dtype in (torch.long, torch.bool):
        bad = torch.zeros(2, dtype=dtype)
        groups = [{"params": list(net.named_parameters())}, {"params": [("counts", bad)]}]
        with pytest.raises(TypeError, match=r"'counts'.*floating"):
            BUILDERS[kind](groups)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_tensor_in_a_later_group_changes_nothing(kind):
    """An integer tensor slipped into a second group after construction: no group steps."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    opt = BUILDERS[kind]([{"params": first.parameters()}, {"params": second.parameters()}])
    for p in [*first.parameters(), *second.parameters()]:
        p.grad = torch.randn_like(p)
    opt.step()
    before_params = [p.detach().clone() for p in [*first.parameters(), *second.parameters()]]
    before_state = _state_snapshot(opt)
    counts = torch.zeros(3, dtype=torch.long)
    counts.grad = torch.zeros(3, dtype=torch.long)
    opt.param_groups[1]["params"].append(counts)
    with pytest.raises(TypeError, match="floating"):
        opt.step()
    opt.param_groups[1]["params"].pop()
    after_params = [p.detach() for p in [*first.parameters(), *second.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(before_params, after_params, strict=True))
    _assert_same_state(before_state, opt.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda ps: FTP(torch.optim.AdamW(ps, lr=0.05, fused=True)),
        lambda ps: SPD(torch.optim.Adam(ps, lr=0.05, fused=True), weight_decay=1.0),
        lambda ps: L2SP(torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), alpha=0.5),
    ],
    ids=["FTP(AdamW)", "SPD(Adam)", "L2SP(SGD)"],
)
def test_a_fused_cpu_base_refuses_a_gradient_laid_out_unlike_its_parameter(wrap):
    """torch's fused CPU kernels read the parameter and the gradient in memory order: a transposed
    gradient of a contiguous parameter would be read as another matrix. Refused by name, before
    anything changes; a gradient of the parameter's layout (a transposed parameter's too) steps."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = wrap([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    before, state = p.detach().clone(), _state_snapshot(opt)
    p.grad = torch.randn(4, 6).t()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*memory order"):
        opt.step()
    assert torch.equal(p.detach(), before)
    _assert_same_state(state, opt.state_dict())
    p.grad = p.grad.contiguous()
    opt.step()
    q = torch.nn.Parameter(torch.randn(4, 6).t())  # a transposed parameter, its gradient alike
    opt = wrap([q])
    q.grad = torch.randn(4, 6).t()
    opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_state_is_caught_before_the_step(kind):
    """A wrong-shaped state tensor used to fail after the wrapped optimizer had already stepped."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = BUILDERS[kind](list(net.named_parameters()))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    key = "prev_inv_norm" if kind in PROJECTING else "anchor"
    opt.state[net.weight][key] = torch.zeros(7)
    before = [p.detach().clone() for p in net.parameters()]
    before_base = copy.deepcopy(opt.optimizer.state_dict()) if hasattr(opt, "optimizer") else None
    with pytest.raises(ValueError, match=rf"'weight'.*{key}|{key}.*'weight'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    if before_base is not None:
        _assert_same_state(before_base, opt.optimizer.state_dict())


# -- anchors changed after construction ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_switching_an_unanchored_group_to_init_anchors_it_where_it_is(kind):
    """None → "init" after 5 steps made AdamFTP treat the missing anchor as zero (|θ| 2.7 → 1.7e-9)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(3 * torch.randn(6, 5))
    opt = BUILDERS[kind]([{"params": [w], "anchor": None}])
    for _ in range(5):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.param_groups[0]["anchor"] = "init"
    where = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.equal(opt.state[w]["anchor"], where)
    assert (w.detach() - where).abs().max() < 0.5  # one step from where it was, not snapped to zero
    assert w.detach().abs().mean() > 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_switching_init_to_zero_does_not_use_the_old_snapshot(kind):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = BUILDERS[kind]([w])
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    twin_w = torch.nn.Parameter(w.detach().clone())
    twin = BUILDERS[kind]([twin_w])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load shares the tensors
    del twin.state[twin_w]["anchor"]  # what a zero anchor keeps: nothing
    for o in (opt, twin):
        o.param_groups[0]["anchor"] = "zero"
    g = torch.randn_like(w)
    w.grad, twin_w.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert torch.equal(w, twin_w)


# -- state dicts ---------------------------------------------------------------------------------


def _trained(kind, net, steps=2):
    opt = BUILDERS[kind](list(net.named_parameters()))
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


def _fresh(kind):
    torch.manual_seed(1)
    return BUILDERS[kind](list(torch.nn.Linear(4, 3).named_parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_a_torch_optim_state_dict_is_refused(kind):
    torch.manual_seed(0)
    source = torch.nn.Linear(4, 3)
    adam = torch.optim.Adam(source.parameters())
    source(torch.randn(2, 4)).sum().backward()
    adam.step()
    opt = _fresh(kind)
    before = _state_snapshot(opt)
    with pytest.raises(ValueError, match=r"not saved by|another optimizer|no 'base'"):
        opt.load_state_dict(adam.state_dict())
    _assert_same_state(before, opt.state_dict())


@pytest.mark.parametrize(
    ("source", "target"),
    [("AdamSPD", "AdamFTP"), ("SPD", "FTP"), ("AdamFTP", "AdamSPD"), ("FTP", "SPD"), ("SGDFTP", "AdamFTP")],
)
@pytest.mark.parametrize("tagged", [True, False])
def test_another_methods_state_dict_is_refused(source, target, tagged):
    """An SPD state dict loaded into FTP used to snap the weights back to the anchor at the next step."""
    torch.manual_seed(0)
    state_dict = _trained(source, torch.nn.Linear(4, 3)).state_dict()
    if not tagged:  # as a state dict saved before the tag, or flattened by a checkpointing library
        state_dict.pop("method")
        state_dict.get("base", {}).pop("method", None)
    opt = _fresh(target)
    before = _state_snapshot(opt)
    with pytest.raises(ValueError, match=source if tagged else r"another optimizer|not saved by"):
        opt.load_state_dict(state_dict)
    _assert_same_state(before, opt.state_dict())


@pytest.mark.parametrize("kind", sorted(PROJECTING))
@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("prev_inv_norm", torch.zeros(1, 3)),
        ("radius", torch.zeros(2)),
        ("step", torch.zeros(1, 1)),
        ("prev_displacement", torch.zeros(4, 3)),
        ("radius", 0.5),
    ],
)
def test_a_wrong_shaped_saved_tensor_names_the_parameter_and_key(kind, key, bad):
    torch.manual_seed(0)
    state_dict = _trained(kind, torch.nn.Linear(4, 3)).state_dict()
    state_dict["state"][0][key] = bad
    opt = _fresh(kind)
    before = _state_snapshot(opt)
    with pytest.raises(ValueError, match=rf"'{key}' of parameter 'weight'"):
        opt.load_state_dict(state_dict)
    _assert_same_state(before, opt.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_tensor_on_another_device_is_refused_before_the_step(kind):
    """A state tensor moved off the parameter's device (here to "meta") is named at the next step,
    and nothing has changed."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = _trained(kind, net)
    state = opt.state[net.weight]
    key = next(k for k in ("prev_displacement", "anchor") if k in state)
    state[key] = state[key].to("meta")
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=rf"'{key}' of parameter 'weight' .* on meta"):
        opt.step()
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", KINDS)
def test_an_untagged_state_dict_of_the_same_method_still_loads(kind):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = _trained(kind, net)
    state_dict = opt.state_dict()
    state_dict.pop("method")
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    other = BUILDERS[kind](list(twin.named_parameters()))
    other.load_state_dict(state_dict)
    _assert_same_state(opt.state_dict(), other.state_dict())


def test_missing_group_hyperparameter_is_named():
    torch.manual_seed(0)
    state_dict = _trained("AdamSPD", torch.nn.Linear(4, 3)).state_dict()
    state_dict.pop("method")
    opt = _fresh("AdamFTP")
    with pytest.raises(ValueError, match=r"group 0 .* no 'k'"):
        opt.load_state_dict(state_dict)


# -- FTP and a zero anchor (LoRA) ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ftp_warns_when_a_zero_anchor_meets_a_nonzero_tensor(kind):
    torch.manual_seed(0)
    lora_a = torch.nn.Parameter(torch.randn(4, 8) * 0.02)
    lora_b = torch.nn.Parameter(torch.zeros(8, 4))
    groups = [{"params": [("lora_A", lora_a), ("lora_B", lora_b)], "anchor": "zero"}]
    if kind in PROJECTING:
        with pytest.warns(UserWarning, match=r"'lora_A'.*anchor='zero'") as record:
            BUILDERS[kind](groups)
        assert all("lora_B" not in str(w.message) for w in record)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            BUILDERS[kind](groups)


@pytest.mark.parametrize("kind", sorted(PROJECTING))
def test_ftp_with_an_init_anchor_keeps_a_lora_adapter(kind):
    """The recipe: a LoRA pair anchored at its own initialisation is not wiped by the first step."""
    torch.manual_seed(0)
    lora_a = torch.nn.Parameter(torch.randn(4, 8) * 0.02)
    lora_b = torch.nn.Parameter(torch.zeros(8, 4))
    start = lora_a.detach().clone()
    opt = BUILDERS[kind]([{"params": [lora_a, lora_b], "anchor": "init"}])
    for _ in range(3):
        lora_a.grad, lora_b.grad = torch.randn_like(lora_a), torch.randn_like(lora_b)
        opt.step()
    assert torch.allclose(lora_a, start, atol=1e-3)
    assert lora_a.detach().abs().mean() > 0.5 * start.abs().mean()


# -- the thread count ------------------------------------------------------------------------------

SHAPES = [(100_003,), (1, 70_001), (3, 40_000), (64, 600), (5, 4, 3, 3), ()]


def _threads_run(kind, dtype, threads, monkeypatch, path):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = BUILDERS[kind](params, eps=1e-4 if dtype == torch.float16 else 1e-8)
    if path == "foreach":
        monkeypatch.setattr(type(opt), "_scratch_for", lambda self, params: None)
    for step in range(4):
        gen.manual_seed(100 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + step)).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], _state_snapshot(opt)


@pytest.mark.parametrize(
    ("path", "dtype"),
    [
        ("kernels", torch.float32),
        ("kernels", torch.float64),
        ("no-kernels", torch.float32),
        ("foreach", torch.float32),
        ("foreach", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_the_thread_count(kind, path, dtype, monkeypatch):
    if path == "kernels":
        require_kernels()
    else:
        monkeypatch.setattr(_torch_ops, "_kernels", None)
    threads = torch.get_num_threads()
    try:
        runs = [_threads_run(kind, dtype, n, monkeypatch, path) for n in (1, 2, 3)]
    finally:
        torch.set_num_threads(threads)
    for params, state in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], params, strict=True))
        _assert_same_state(runs[0][1], state)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kw", "error"),
    [
        (AdamFTP, dict(lr=float("inf")), ValueError),
        (AdamSPD, dict(weight_decay=float("inf")), ValueError),
        (SGDFTP, dict(lr=float("nan")), ValueError),
        (SGDFTP, dict(weight_decay=float("inf")), ValueError),
        (SGDFTP, dict(momentum=float("inf")), ValueError),
        (AdamFTP, dict(amsgrad="yes"), TypeError),
        (AdamSPD, dict(amsgrad=1), TypeError),
        (SGDFTP, dict(nesterov="yes", momentum=0.9), TypeError),
    ],
)
def test_non_finite_numbers_and_truthy_flags_are_refused(cls, kw, error):
    with pytest.raises(error, match=next(iter(kw))):
        cls(torch.nn.Linear(2, 2).parameters(), **kw)


def test_wrappers_refuse_non_finite_numbers():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="weight_decay"):
        SPD(torch.optim.Adam(net.parameters()), weight_decay=float("inf"))
    with pytest.raises(ValueError, match="k"):
        FTP(torch.optim.SGD(net.parameters(), lr=0.1), k=float("nan"))


# -- the SPD wrapper's memory ----------------------------------------------------------------------


class _FreshBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an op creates that is not a view of its inputs."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.bytes = threshold, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                if nbytes >= self.threshold:
                    self.bytes += nbytes
        return out


def _fresh_bytes_per_step(make, big):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(big)), torch.nn.Parameter(torch.randn(64))]
    opt = make(params)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step < 2:  # warm-up: lazily made state and scratch buffers
            opt.step()
    counter = _FreshBytes(threshold=big[0] * big[1])  # a quarter of the big tensor's bytes and up
    with counter:
        opt.step()
    return counter.bytes


@pytest.mark.parametrize("foreach", [False, True])
def test_the_spd_wrapper_allocates_at_most_one_more_full_size_buffer(foreach):
    big = (512, 1024)
    size = 4 * big[0] * big[1]
    base = _fresh_bytes_per_step(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=foreach), big)
    spd = _fresh_bytes_per_step(
        lambda ps: SPD(torch.optim.Adam(ps, lr=1e-3, foreach=foreach), weight_decay=1.0), big
    )
    assert spd <= base + size, (spd / size, base / size)
