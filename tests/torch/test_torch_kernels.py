"""The fused C kernels (adapters/_kernels.c) against the PyTorch single pass they replace.

`test_torch_reference.py` runs every float64 trajectory through the kernels against the
NumPy core at 1e-12; here: float32, every SGD and Adam option and anchor mode, the FTP and
SPD wrappers around fused bases, shapes whose rows are not a multiple of the kernels' 16
lanes, which tensors take them, threads, autograd's version counters, NaN and the kernels'
own argument checks.
"""

import contextlib

import pytest
import torch
from torch_helpers import assert_bfloat16_drift_within, float_tensors, require_kernels

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD

#: A scalar, a vector, a matrix whose rows are not a multiple of 16 lanes (and narrower than the
#: kernels' `NARROW`), a conv kernel, and LoRA's B: rows of 8 values, more than one piece of
#: `sweep_narrow` (256 values).
SHAPES = [(), (37,), (33, 19), (6, 3, 5, 5), (300, 8)]
SGD_OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01, k=0.8),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
]
ADAM_OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=0.01, k=0.8),
    dict(lr=0.05, amsgrad=True),
    dict(lr=0.05, betas=(0.4, 0.99), eps=1e-6),  # 1 − β1 ≥ 0.5: the lerp's other form
]
SPD_OPTIONS = [
    dict(lr=0.05, weight_decay=1.0),
    dict(lr=0.05, weight_decay=0.5, amsgrad=True),
    dict(lr=0.05, weight_decay=2.0, betas=(0.4, 0.99)),
]


def ftp_adamw(groups, **options):
    return FTP(torch.optim.AdamW(groups, lr=options.pop("lr"), fused=True, **options))


def spd_adam(groups, *, weight_decay, **options):
    return SPD(torch.optim.Adam(groups, fused=True, **options), weight_decay=weight_decay)


def ftp_sgd(groups, **options):
    return FTP(torch.optim.SGD(groups, **options))


TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.fixture(autouse=True)
def kernels():
    return require_kernels()


@contextlib.contextmanager
def without_kernels():
    saved = _torch_ops._kernels
    _torch_ops._kernels = None
    try:
        yield
    finally:
        _torch_ops._kernels = saved


def run(cls, options, anchor, dtype, steps=6, shapes=SHAPES, seed=0, grad_layout=None, storage=None):
    """Parameters and optimizer state after ``steps`` steps.

    The gradients keep one direction (plus noise), so that the radii grow and the projection
    moves the parameters well away from their anchors, which are small (1e-3): a wrong
    projection shows at float32's tolerance. ``storage``: the values are drawn in ``dtype``
    and stored in this dtype (a bfloat16 run from a float32 run's numbers).
    """
    storage = storage or dtype
    torch.manual_seed(seed)
    params = [torch.nn.Parameter((1e-3 * torch.randn(s, dtype=dtype)).to(storage)) for s in shapes]
    directions = [torch.randn(s, dtype=dtype) for s in shapes]
    opt = cls([{"params": params, "anchor": anchor}], **options)
    for t in range(steps):
        gen = torch.Generator().manual_seed(100 * seed + t)
        for p, direction in zip(params, directions, strict=True):
            g = (direction + 0.3 * torch.randn(p.shape, generator=gen, dtype=dtype)).to(storage)
            p.grad = g if grad_layout is None else grad_layout(g)
        opt.step()
    return params, opt


def assert_kernels_match(cls, options, anchor, dtype, **run_options):
    """The same run with and without the kernels: parameters and state agree at TOLERANCE."""
    with_kernels = run(cls, options, anchor, dtype, **run_options)
    with without_kernels():
        without = run(cls, options, anchor, dtype, **run_options)
    assert_same_run(with_kernels, without, dtype)


def assert_same_run(a, b, dtype):
    (params_a, opt_a), (params_b, opt_b) = a, b
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[dtype])
        for key, value in opt_a.state[p].items():
            torch.testing.assert_close(value, opt_b.state[q][key], **TOLERANCE[dtype], msg=key)


FUSED = [
    *[(SGDFTP, options) for options in SGD_OPTIONS],
    *[(AdamFTP, options) for options in ADAM_OPTIONS],
    *[(AdamSPD, options) for options in SPD_OPTIONS],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("anchor", ["init", "zero"])
@pytest.mark.parametrize(
    "cls, options", FUSED, ids=[f"{cls.__name__}:{','.join(options)}" for cls, options in FUSED]
)
def test_fused_classes_equal_single_pass(cls, options, anchor, dtype):
    assert_kernels_match(cls, options, anchor, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "make, options",
    [
        (ftp_adamw, dict(lr=0.05, weight_decay=0.01)),
        (ftp_sgd, dict(lr=0.05, momentum=0.9)),
        (spd_adam, dict(lr=0.05, weight_decay=1.0)),
    ],
    ids=["FTP(AdamW fused)", "FTP(SGD)", "SPD(Adam fused)"],
)
def test_wrappers_equal_single_pass(make, options, dtype):
    assert_kernels_match(make, options, "init", dtype)


BFLOAT16 = {
    "SGDFTP": (SGDFTP, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "SGDFTP nesterov": (SGDFTP, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "AdamFTP": (AdamFTP, dict(lr=0.05, weight_decay=0.01)),
    "AdamFTP amsgrad": (AdamFTP, dict(lr=0.05, amsgrad=True, k=0.8)),
    "AdamSPD": (AdamSPD, dict(lr=0.05, weight_decay=1.0)),
    "AdamSPD beta1=0.4": (AdamSPD, dict(lr=0.05, weight_decay=0.5, betas=(0.4, 0.99))),
    "FTP(AdamW fused)": (ftp_adamw, dict(lr=0.05, weight_decay=0.01)),
    "FTP(SGD)": (ftp_sgd, dict(lr=0.05, momentum=0.9)),
    "SPD(Adam fused)": (spd_adam, dict(lr=0.05, weight_decay=1.0)),
}


@pytest.mark.parametrize("path", ["kernels", "single pass"])
@pytest.mark.parametrize("case", list(BFLOAT16))
def test_bfloat16_tracks_float32_as_the_multi_tensor_path_does(case, path, monkeypatch):
    """bfloat16 on the CPU: the kernels (and, for a bucket they do not take, the single pass in
    PyTorch) drift from the float32 run no more than the multi-tensor path that bfloat16 took before."""
    make, options = BFLOAT16[case]
    shapes = [(), (37,), (33, 300), (6, 3, 5, 5), (300, 8)]
    layout = None
    if path == "single pass" and make in (ftp_adamw, spd_adam):
        # torch 2.13's fused CPU Adam(W) reads a strided gradient in memory order (0.1 off at lr 0.05)
        pytest.skip("a fused base takes no non-contiguous gradient")
    if path == "single pass":  # one non-contiguous gradient: the bucket leaves the kernels
        layout = lambda g: g.t().contiguous().t() if g.ndim == 2 else g  # noqa: E731
    calls = count_calls(monkeypatch, _torch_ops._kernels)
    got = float_tensors(*run(make, options, "init", torch.float32, shapes=shapes, grad_layout=layout,
                             storage=torch.bfloat16))  # fmt: skip
    swept = sum(n for name, n in calls.items() if name not in ("ftp_project", "spd_decay", "dot"))
    assert swept > 0 if path == "kernels" else swept == 0
    with without_kernels():
        multi_tensor = float_tensors(*run(make, options, "init", torch.float32, shapes=shapes,
                                          storage=torch.bfloat16))  # fmt: skip
    exact = float_tensors(*run(make, options, "init", torch.float32, shapes=shapes))
    assert_bfloat16_drift_within(got, multi_tensor, exact)


def assert_same_bfloat16(got, expected):
    """The same bits, NaN for NaN (torch's own NaN bits differ between its vector and scalar code)."""
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_bfloat16_is_computed_in_float32_and_stored_rounded_to_nearest_even(kernels):
    """One rounding per stored value, as torch's ``.bfloat16()``: ties to even, NaN a NaN (not ±inf)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4099, generator=gen).bfloat16()
    a = torch.randn(4099, generator=gen).bfloat16()
    p[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 3.0e38])
    keep, strength = 1 + 2.0**-8, 0.3  # p · (1 + 2⁻⁸) is often exactly half a bfloat16 step
    for anchor in (a, None):
        expected = p.float() * torch.tensor(keep)
        if anchor is not None:
            expected = expected + anchor.float() * torch.tensor(strength)
        got = p.clone()
        kernels.spd_decay(2, got.data_ptr(), _torch_ops._address(anchor), keep, strength, p.numel(), 2)
        assert_same_bfloat16(got, expected.bfloat16())
    ties = (p.float() * torch.tensor(keep)).view(torch.int32) & 0xFFFF == 0x8000
    assert ties.sum() > 20  # where rounding half up would differ
    # the projection, its per-row norms (row sums + eps) and 1 / n in float32
    c, sums, s = torch.randn(3, 1000, generator=gen).bfloat16(), torch.rand(3) + 0.5, torch.zeros(3)
    got = torch.empty_like(c)
    kernels.ftp_project(2, got.data_ptr(), a[:3000].data_ptr(), c.data_ptr(), sums.data_ptr(), s.data_ptr(),
                        0.8, 1e-3, 3, 1000, 2)  # fmt: skip
    n = sums + 1e-3
    scale = torch.clamp(0.8 / n, 0, 1)[:, None]
    expected = a[:3000].float().reshape(3, 1000) + scale * c.float()
    assert_same_bfloat16(got, expected.bfloat16())
    assert torch.equal(s, 1 / n)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, nesterov=True)],
    ids=["plain", "momentum", "weight-decay", "nesterov"],
)
@pytest.mark.parametrize("anchored", [True, False], ids=["anchor", "zero-anchor"])
@pytest.mark.parametrize("rows, cols", [(5, 1037), (300, 8)], ids=["wide", "narrow"])
def test_the_bfloat16_sgd_ftp_sweep_is_float32_arithmetic_rounded_once(
    kernels, options, anchored, rows, cols
):
    """SGD-FTP's bfloat16 sweep (AVX2 where the CPU has it) stores, bit for bit, SGD's float32
    arithmetic rounded once (momentum buffer, ``c``); ``MARS(c)`` is of ``c`` as stored and ``∇γ``
    is ``Σ_r s_r ⟨c_prev, g⟩_r``. Rows of 1037 values end off the 16-value vectors; rows of 8
    take `sweep_narrow`."""
    gen = torch.Generator().manual_seed(1)
    p, g, b, a, c_prev = (torch.randn(rows, cols, generator=gen).bfloat16() for _ in range(5))
    s, n = torch.rand(rows, generator=gen) + 0.5, torch.empty(rows)
    dots = torch.empty(rows, dtype=torch.float64)
    lr, momentum, coefficient = 0.05, options.get("momentum", 0.0), 0.7
    weight_decay, nesterov = options.get("weight_decay", 0.0), options.get("nesterov", False)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731 (the kernel's scalars are float32)
    d = g.float() + f32(weight_decay) * p.float() if weight_decay else g.float()
    buffer = f32(momentum) * b.float() + f32(coefficient) * d
    if momentum:
        d = d + f32(momentum) * buffer if nesterov else buffer
    c = ((p.float() - a.float()) if anchored else p.float()) + -(f32(lr) * d)
    got_b, got_c = b.clone(), c_prev.clone()
    swept = kernels.sgd_ftp_displace(
        2, p.data_ptr(), g.data_ptr(), got_b.data_ptr() if momentum else 0, a.data_ptr() if anchored else 0,
        got_c.data_ptr(), s.data_ptr(), n.data_ptr(), dots.data_ptr(), rows, cols, lr, momentum, coefficient,
        weight_decay, nesterov, 1,
    )  # fmt: skip
    assert_same_bfloat16(got_c, c.bfloat16())
    assert_same_bfloat16(got_b, buffer.bfloat16() if momentum else b)
    torch.testing.assert_close(n, got_c.float().abs().sum(1), rtol=1e-6, atol=0.0)
    radius_grad = (s.double() * (c_prev.double() * g.double()).sum(1)).sum().item()
    assert swept[0] == pytest.approx(radius_grad, rel=1e-5)
    assert swept[1] == n.max().item()


def test_a_large_bfloat16_projection_is_rounded_once(kernels):
    """A bfloat16 tensor of 4 MiB and more takes the projection's streaming stores (AVX2 where
    the CPU has it), from the first cache line of each row; the result is the same bits."""
    gen = torch.Generator().manual_seed(2)
    rows, cols = 1100, 1907
    a, c = (torch.randn(rows, cols, generator=gen).bfloat16() for _ in range(2))
    sums, s = torch.rand(rows, generator=gen) * 2, torch.zeros(rows)
    assert a.numel() * a.element_size() >= 4 << 20
    for anchor in (a, None):
        got = torch.empty_like(c)
        kernels.ftp_project(2, got.data_ptr(), _torch_ops._address(anchor), c.data_ptr(), sums.data_ptr(),
                            s.data_ptr(), 0.8, 1e-8, rows, cols, 2)  # fmt: skip
        scale = torch.clamp(torch.tensor(0.8) / (sums + 1e-8), 0, 1)[:, None]  # float32 / float32
        expected = scale * c.float() if anchor is None else anchor.float() + scale * c.float()
        assert_same_bfloat16(got, expected.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("anchor", ["init", "zero"])
def test_large_tensors_equal_single_pass(anchor, dtype):
    """Tensors of 4 MiB and more take the projection's streaming stores; rows of an odd length
    start off the cache-line boundary those begin at."""
    shapes = [(1100 if dtype == torch.float32 else 550, 1001)]
    assert_kernels_match(SGDFTP, dict(lr=0.05, momentum=0.9), anchor, dtype, steps=3, shapes=shapes)


def test_a_long_float32_row_is_summed_accurately():
    """A vector is one MARS row: 4M float32 values summed one by one in 16 lanes were off by
    2e-6; the kernels add each 256 values' partial sums in double (4e-8, as torch.sum's 6e-8)."""
    p = torch.nn.Parameter(torch.rand(1 << 22) + 0.5)
    opt = SGDFTP([{"params": [p], "anchor": "zero"}], lr=0.1)
    p.grad = torch.rand(1 << 22) + 0.5
    opt.step()
    state = opt.state[p]
    exact = state["prev_displacement"].double().abs().sum() + 1e-8
    assert abs(1 / state["prev_inv_norm"].double().item() - exact.item()) <= 2e-7 * exact.item()


def count_calls(monkeypatch, kernels):
    calls = dict.fromkeys(
        ["sgd_ftp_displace", "ftp_project", "adam_ftp_displace", "ftp_displace", "adam_spd_step", "spd_sums",
         "spd_decay", "dot"], 0
    )  # fmt: skip

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                if name != "scalars":  # the 0-d bookkeeping (step counts, radii): its own tests
                    calls[name] += 1
                return getattr(kernels, name)(*args)

            return call

    monkeypatch.setattr(_torch_ops, "_kernels", Spy())
    return calls


TAKEN = [
    (SGDFTP, dict(lr=0.05, momentum=0.9), {"sgd_ftp_displace": 1, "ftp_project": 1}),
    (AdamFTP, dict(lr=0.05), {"adam_ftp_displace": 1, "ftp_project": 1}),
    (AdamSPD, dict(lr=0.05, weight_decay=1.0), {"adam_spd_step": 1}),
    (ftp_adamw, dict(lr=0.05), {"ftp_displace": 1, "ftp_project": 1}),
    (spd_adam, dict(lr=0.05, weight_decay=1.0), {"spd_sums": 2}),  # spd_decay: only where it decays
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "make, options, per_tensor", TAKEN, ids=["SGDFTP", "AdamFTP", "AdamSPD", "FTP", "SPD"]
)
def test_cpu_float_tensors_take_the_kernels(make, options, per_tensor, dtype, monkeypatch, kernels):
    calls = count_calls(monkeypatch, kernels)
    run(make, options, "init", torch.float32, steps=2, storage=dtype)
    if make is AdamSPD:  # its decay: one sweep per tensor
        per_tensor = dict(per_tensor, spd_decay=1)
    assert {name: n for name, n in calls.items() if n and (name != "spd_decay" or make is AdamSPD)} == {
        name: 2 * len(SHAPES) * n for name, n in per_tensor.items()
    }


def test_the_spd_wrapper_sweeps_only_the_tensors_it_decays(monkeypatch, kernels):
    """``λr = 0`` (no push away from the anchor, or a step that moved closer) leaves θ̃ unswept."""

    def spd_run():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = spd_adam([{"params": params, "anchor": "init"}], lr=0.05, weight_decay=1.0)
        decaying = []
        for _ in range(6):
            for p in params:  # independent gradients: some push away from the anchor, some do not
                p.grad = torch.randn(p.shape)
            opt.step()
            decaying.append(
                sum(bool(opt.state[p]["spd_decayed"] and opt.state[p]["spd_ratio"] > 0) for p in params)
            )
        return (params, opt), decaying

    with without_kernels():
        expected, _ = spd_run()
    calls = count_calls(monkeypatch, kernels)
    got, decaying = spd_run()
    assert 0 < sum(decaying) < 6 * len(SHAPES)
    assert calls["spd_decay"] == sum(decaying)
    assert_same_run(got, expected, torch.float32)


@pytest.mark.parametrize(
    "case",
    ["float16", "transposed grads", "unanchored"],
)
def test_other_tensors_keep_the_pytorch_path(case, monkeypatch, kernels):
    calls = count_calls(monkeypatch, kernels)
    shapes = [(8, 5), (5,)]
    if case == "float16":
        run(SGDFTP, dict(lr=0.05, momentum=0.9), "init", torch.float16, steps=2, shapes=shapes)
    elif case == "transposed grads":
        # a gradient with the parameter's shape but not contiguous: the kernels read addresses
        layout = lambda g: g.t().contiguous().t() if g.ndim == 2 else g  # noqa: E731
        got = run(
            SGDFTP, dict(lr=0.05, momentum=0.9), "init", torch.float64, shapes=shapes, grad_layout=layout
        )
        with without_kernels():
            expected = run(SGDFTP, dict(lr=0.05, momentum=0.9), "init", torch.float64, shapes=shapes)
        assert_same_run(got, expected, torch.float64)
        # the projection reads no gradient: it still runs in C
        assert {name: n for name, n in calls.items() if n} == {"ftp_project": 6 * len(shapes)}
        return
    else:
        run(SGDFTP, dict(lr=0.05, momentum=0.9), None, torch.float32, steps=2, shapes=shapes)
    assert not any(calls.values())


@pytest.mark.parametrize(
    "make, options",
    [(make, options) for make, options, _ in TAKEN],
    ids=["SGDFTP", "AdamFTP", "AdamSPD", "FTP", "SPD"],
)
def test_threads_do_not_change_the_result(make, options):
    """Rows (FTP) or spans of values (SPD) are shared among threads; every sum over them is
    taken in order by one thread."""
    shapes = [(300, 257), (70_000,), (9000, 8)]  # large enough for a parallel region
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(make, dict(options), "init", torch.float32, shapes=shapes)
        torch.set_num_threads(4)
        four = run(make, dict(options), "init", torch.float32, shapes=shapes)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(one[0], four[0], strict=True):
        assert torch.equal(p, q)


def test_autograd_sees_the_in_place_update():
    """The kernels write through addresses; the step still bumps the tensors' version counters,
    so a graph that saved a parameter before the step refuses to backpropagate through it."""
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = SGDFTP([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(6, 4)
    opt.step()
    saved = (p * p).sum()  # saves p
    versions = (
        p._version,
        opt.state[p]["prev_displacement"]._version,
        opt.state[p]["momentum_buffer"]._version,
    )
    p.grad = torch.randn(6, 4)
    opt.step()
    after = (p._version, opt.state[p]["prev_displacement"]._version, opt.state[p]["momentum_buffer"]._version)
    assert all(b > a for a, b in zip(versions, after, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize(
    "make, options",
    [(SGDFTP, dict(lr=0.05, momentum=0.9)), (AdamFTP, dict(lr=0.05, amsgrad=True)), (AdamSPD, dict(lr=0.05))],
    ids=["SGDFTP", "AdamFTP", "AdamSPD"],
)
def test_nan_gradients_give_what_the_pytorch_path_gives(make, options):
    def nan_in_second_row(g):
        if g.ndim >= 2:
            g[1, 0] = float("nan")
        return g

    with_kernels = run(make, options, "init", torch.float32, grad_layout=nan_in_second_row)
    with without_kernels():
        without = run(make, options, "init", torch.float32, grad_layout=nan_in_second_row)
    assert with_kernels[0][2].isnan().any()
    for p, q in zip(with_kernels[0], without[0], strict=True):
        torch.testing.assert_close(p, q, equal_nan=True, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_an_ftp_sweep_returns_its_largest_row_sum(kernels, dtype):
    """The radius's clip takes ``max n = max MARS(c) + 1e-8`` from the sweep (adding 1e-8 rounds
    monotonically, so it is the largest ``n``); a NaN row sum gives NaN, as ``torch.max``."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = 7, 300
    stats = _torch_ops.statistics_dtype(dtype)
    for poisoned in (False, True):
        p, g, a = (torch.randn(rows, cols, generator=gen).to(dtype) for _ in range(3))
        if poisoned:
            p[3, 5] = float("nan")
        c = torch.zeros_like(p)
        s, n = torch.ones(rows, dtype=stats), torch.empty(rows, dtype=stats)
        dots = torch.empty(rows, dtype=torch.float64)
        addresses = [x.data_ptr() for x in (p, g, a, c, s, n, dots)]
        _, largest = kernels.ftp_displace(_torch_ops._KERNEL_DTYPES[dtype], *addresses, rows, cols, 2)
        torch.testing.assert_close(c, p - a, rtol=0.0, atol=0.0, equal_nan=True)
        # the norm of c as stored (a bfloat16 c rounded), summed in float32 or float64
        torch.testing.assert_close(n, c.to(stats).abs().sum(1), equal_nan=True, rtol=1e-6, atol=0.0)
        if poisoned:
            assert n.isnan().sum() == 1 and largest != largest
        else:
            assert largest == n.max().item() > 0


def test_the_kernels_check_their_arguments(kernels):
    x = torch.zeros(4)
    address = x.data_ptr()
    with pytest.raises(ValueError, match="dtype code"):
        kernels.ftp_project(3, address, 0, address, address, address, 1.0, 1e-8, 1, 4, 1)
    with pytest.raises(ValueError, match="rows must be"):
        kernels.ftp_project(0, address, 0, address, address, address, 1.0, 1e-8, 0, 4, 1)
    with pytest.raises(TypeError):
        kernels.sgd_ftp_displace(0, address)
    with pytest.raises(ValueError, match="dtype code"):
        kernels.dot(3, address, address, 4, 1)
    with pytest.raises(ValueError, match="n must be"):
        kernels.dot(0, address, address, -1, 1)
    sweep = (address, address, address, address, 0, address, address, address, address, address)
    with pytest.raises(ValueError, match="dtype code"):
        kernels.adam_ftp_displace(5, *sweep, 1, 4, 0.9, 0.999, 1.0, 0.0, -0.1, 0.0, 1)
    with pytest.raises(ValueError, match="rows must be"):
        kernels.ftp_displace(0, address, address, 0, address, address, address, address, 0, 4, 1)
    with pytest.raises(ValueError, match="count must be"):
        kernels.adam_spd_step(0, *sweep[:6], -1, 0.9, 0.999, 1.0, 0.0, -0.1, 1)
    with pytest.raises(ValueError, match="count must be"):
        kernels.spd_sums(0, address, 0, 0, -4, 1)
    with pytest.raises(ValueError, match="dtype code"):
        kernels.spd_decay(-1, address, 0, 1.0, 0.0, 4, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 255, 256, 257, 16_384, 16_385, 100_003])
def test_dot_is_accurate_and_takes_no_account_of_threads(kernels, dtype, n):
    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    exact = float((a.double() * b.double()).sum())
    squares = float((a.double() ** 2).sum())
    code = _torch_ops._KERNEL_DTYPES[dtype]
    # relative to Σ|a·b|: float32 lanes of 16 values, chunks of 256 joined in double
    scale = float((a.double() * b.double()).abs().sum())
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for threads in (1, 2, 3):
        got = kernels.dot(code, a.data_ptr(), b.data_ptr(), n, threads)
        assert abs(got - exact) <= tol * scale
        assert kernels.dot(code, a.data_ptr(), 0, n, threads) == pytest.approx(squares, rel=tol, abs=0)
    results = {kernels.dot(code, a.data_ptr(), b.data_ptr(), n, threads) for threads in (1, 2, 3, 4)}
    assert len(results) == 1


def test_dot_takes_the_kernel_for_contiguous_cpu_floats(kernels, monkeypatch):
    calls = []
    monkeypatch.setattr(_torch_ops._kernels, "dot", lambda *args: calls.append(args) or 2.5, raising=False)
    a = torch.ones(40)
    assert float(_torch_ops.dot(a, a)) == 2.5 and len(calls) == 1
    assert float(_torch_ops.dot(a[::2], a[::2])) == 20.0 and len(calls) == 1  # strided: the PyTorch path


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_a_tensor_that_does_not_decay_keeps_its_step_exactly(path):
    """``λr = 0``: θ̃ as the wrapped optimizer left it, even beside a non-finite anchor (``θ₀ · 0``)."""
    theta = torch.tensor([1.0, -0.0, 3.0])
    anchor = torch.tensor([float("inf"), 2.0, float("nan")])
    decaying, decayed_anchor = torch.tensor([4.0, 4.0, 4.0]), torch.zeros(3)
    strength = torch.tensor([0.0, 0.5])
    with contextlib.nullcontext() if path == "kernels" else without_kernels():
        params = [theta.clone(), decaying.clone()]
        _torch_ops.decay_toward_anchors_(params, [anchor, decayed_anchor], strength)
    torch.testing.assert_close(params[0], theta, rtol=0, atol=0, equal_nan=False)
    assert torch.signbit(params[0][1])
    torch.testing.assert_close(params[1], torch.tensor([2.0, 2.0, 2.0]), rtol=0, atol=0)


SCALAR_DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("vector_dtype", SCALAR_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", SCALAR_DTYPES, ids=str)
def test_0d_tensors_are_read_and_written_as_torch_would(kernels, dtype, vector_dtype):
    """`Scalars` (radii, SPD's records) and `advance_steps_` in C give what stack, copy_ and add_ give."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(7, generator=gen, dtype=torch.float64) * 1e3
    tensors = [torch.tensor(v, dtype=dtype) for v in values.tolist()]
    expected = torch.stack(tensors).to(vector_dtype)
    scalars = _torch_ops.Scalars(tensors)
    assert scalars.taken is not None
    assert torch.equal(scalars.read(vector_dtype), expected)
    versions = [x._version for x in tensors]
    new = torch.randn(7, generator=gen, dtype=torch.float64).to(vector_dtype)
    scalars.write_(new)
    assert torch.equal(torch.stack(tensors), new.to(dtype))  # float64 into float32: to nearest, as copy_
    assert all(x._version > v for x, v in zip(tensors, versions, strict=True))  # autograd sees the write
    flags = [torch.tensor(False) for _ in range(7)]
    _torch_ops.Scalars(flags).write_(new > 0)
    assert torch.equal(torch.stack(flags), new > 0)
    steps = [torch.tensor(float(i), dtype=dtype) for i in range(7)]
    t = _torch_ops.advance_steps_(steps, vector_dtype)
    assert t.dtype == vector_dtype and torch.equal(t, torch.arange(1, 8, dtype=vector_dtype))
    assert torch.equal(torch.stack(steps), torch.arange(1, 8, dtype=dtype))


@pytest.mark.parametrize("dtype, start", [(torch.int32, 2**30), (torch.int64, 2**40)], ids=str)
def test_integer_step_counts_advance_in_c(kernels, monkeypatch, dtype, start):
    """Keras keeps its step counts as integer variables (int32 on the torch backend): they advance in C too, exactly."""
    steps = [torch.tensor(start + i, dtype=dtype) for i in range(3)]
    monkeypatch.setattr(torch, "_foreach_add_", None)  # a call would raise: the C path
    t = _torch_ops.advance_steps_(steps, torch.float64)
    assert torch.equal(torch.stack(steps), torch.tensor([start + 1, start + 2, start + 3], dtype=dtype))
    assert torch.equal(t, torch.stack(steps).double())


def test_0d_tensors_the_kernels_cannot_address_take_torch(kernels, monkeypatch):
    """Another device, mixed dtypes or a tensor subclass: torch's ops, never an address."""
    monkeypatch.setattr(_torch_ops._kernels, "scalars", None, raising=False)  # a call would raise
    meta = [torch.zeros((), device="meta") for _ in range(3)]
    assert _torch_ops.Scalars(meta).read(torch.float32).device.type == "meta"
    mixed = [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)]
    assert _torch_ops.Scalars(mixed).taken is None
    subclass = [torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), torch.tensor(1.0))]
    assert _torch_ops.Scalars(subclass).taken is None
    steps = [torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64)]
    assert torch.equal(
        _torch_ops.advance_steps_(steps, torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64)
    )


def test_the_scalars_kernel_checks_its_arguments(kernels):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="dtype codes"):
        kernels.scalars(2, [x.data_ptr()], 0, x.data_ptr(), 0)
    with pytest.raises(ValueError, match="mode must be"):
        kernels.scalars(3, [x.data_ptr()], 0, x.data_ptr(), 2)  # bools do not advance
    with pytest.raises(ValueError, match="address is 0"):
        kernels.scalars(0, [x.data_ptr(), 0], 0, x.data_ptr(), 1)
    assert torch.equal(x, torch.zeros(2))  # refused before anything was written
    with pytest.raises(ValueError, match="vector's address"):
        kernels.scalars(0, [x.data_ptr()], 0, 0, 0)
    with pytest.raises(TypeError):
        kernels.scalars(0, [1.5], 0, x.data_ptr(), 0)


STEPPED = {
    "SGDFTP": (SGDFTP, dict(lr=0.05, momentum=0.9)),
    "AdamFTP": (AdamFTP, dict(lr=0.05)),
    "AdamSPD": (AdamSPD, dict(lr=0.05, weight_decay=1.0)),
    "FTP": (ftp_adamw, dict(lr=0.05)),
    "SPD": (spd_adam, dict(lr=0.05, weight_decay=1.0)),
}


def scalar_calls(monkeypatch, kernels):
    """The address lists of every `_kernels.scalars` call, the other kernels left as they are."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            if name == "scalars":
                return lambda *args: calls.append(args[1]) or kernels.scalars(*args)
            return getattr(kernels, name)

    monkeypatch.setattr(_torch_ops, "_kernels", Spy())
    return calls


@pytest.mark.parametrize("case", list(STEPPED))
def test_the_0d_state_of_a_step_takes_a_few_calls_whatever_the_tensor_count(case, kernels, monkeypatch):
    """Step counts, radii and SPD's records are read and written in C a bucket at a time, not
    once per tensor (a torch dispatch each: about 1 ms a step on 150 tensors)."""
    make, options = STEPPED[case]
    counted = []
    for count in (2, 12):
        calls = scalar_calls(monkeypatch, kernels)
        run(make, dict(options), "init", torch.float32, steps=3, shapes=[(5, 3)] * count)
        counted.append(len(calls))
        assert all(len(addresses) >= count for addresses in calls)
    assert counted[0] == counted[1] > 0


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
@pytest.mark.parametrize("case", list(STEPPED))
def test_a_step_inside_a_default_device_context_is_unchanged(case, path):
    """``with torch.device(...)`` around a step of CPU tensors: the kernels' buffers stay on the CPU.

    (They were made on the default device: under ``torch.device("meta")`` the kernels then wrote
    through a meta tensor's address, 0, and the process died.)"""
    make, options = STEPPED[case]

    def stepped(context):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = make([{"params": params, "anchor": "init"}], **options)
        for t in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
            with context() if t == 2 else contextlib.nullcontext():
                opt.step()
        return params, opt

    with without_kernels() if path == "pytorch" else contextlib.nullcontext():
        got = stepped(lambda: torch.device("meta"))
        expected = stepped(contextlib.nullcontext)
    assert_same_run(got, expected, torch.float64)
