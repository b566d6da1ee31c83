"""The Triton kernels of the CUDA steps (adapters/_triton_ops.py), run on CPU tensors by Triton's interpreter.

The tests-triton session sets ``TRITON_INTERPRET=1``; elsewhere these tests skip, except the
CUDA ones at the end, which run the compiled kernels where a GPU is (``benchmarks/gpu_check.sh``).
`test_torch_reference.py`'s "triton" cases run every float64 trajectory through the kernels
against the NumPy core at 1e-12; here: float32 and bfloat16 against the PyTorch multi-tensor
path (what CUDA ran before), every method, wrapper and anchor mode, which steps take the
kernels, and which stay on the multi-tensor path.
"""

import pytest
import torch
from torch_helpers import assert_bfloat16_drift_within, require_triton_interpreter
from torch_helpers import float_tensors as tensors

from tether.adapters import _torch_ops, _triton_ops
from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD, _Anchored

#: A scalar, a vector, a matrix with a row longer than one block (1024 values), a conv kernel.
SHAPES = [(), (37,), (5, 1500), (6, 3, 5, 5)]


def ftp_adamw(groups, **options):
    return FTP(torch.optim.AdamW(groups, **options))


def ftp_sgd(groups, **options):
    return FTP(torch.optim.SGD(groups, **options))


def spd_adam(groups, *, weight_decay, **options):
    return SPD(torch.optim.Adam(groups, **options), weight_decay=weight_decay)


CASES = {
    "AdamFTP": (AdamFTP, dict(lr=0.05, weight_decay=0.01)),
    "AdamFTP amsgrad": (AdamFTP, dict(lr=0.05, amsgrad=True, k=0.8)),
    "AdamFTP beta1=0.4": (AdamFTP, dict(lr=0.05, betas=(0.4, 0.99), eps=1e-6)),
    "SGDFTP": (SGDFTP, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "SGDFTP nesterov": (SGDFTP, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "SGDFTP plain": (SGDFTP, dict(lr=0.05)),
    "AdamSPD": (AdamSPD, dict(lr=0.05, weight_decay=1.0)),
    "AdamSPD amsgrad": (AdamSPD, dict(lr=0.05, weight_decay=0.5, amsgrad=True)),
    "FTP(AdamW)": (ftp_adamw, dict(lr=0.05, weight_decay=0.01)),
    "FTP(SGD)": (ftp_sgd, dict(lr=0.05, momentum=0.9)),
    "SPD(Adam)": (spd_adam, dict(lr=0.05, weight_decay=1.0)),
}


@pytest.fixture
def triton_on_cpu(monkeypatch):
    require_triton_interpreter()
    monkeypatch.setattr(_triton_ops, "run_on_cpu", True)
    # as on a GPU: a CUDA bucket has no CPU scratch, so the C kernels never take its steps
    monkeypatch.setattr(_Anchored, "_scratch_for", lambda self, params: None)


@pytest.fixture
def multi_tensor(monkeypatch):
    """The path CUDA steps took before the Triton kernels: the multi-tensor ops."""

    def use():
        monkeypatch.setattr(_triton_ops, "run_on_cpu", False)
        monkeypatch.setattr(_torch_ops, "_kernels", None)
        monkeypatch.setattr(_Anchored, "_scratch_for", lambda self, params: None)

    return use


def run(make, options, anchor, dtype, steps=5, shapes=SHAPES, device="cpu"):
    """Parameters and optimizer state after ``steps`` steps of gradients that keep one direction."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter((1e-3 * torch.randn(s)).to(device, dtype)) for s in shapes]
    directions = [torch.randn(s) for s in shapes]
    opt = make([{"params": params, "anchor": anchor}], **dict(options))
    for t in range(steps):
        gen = torch.Generator().manual_seed(t)
        for p, direction in zip(params, directions, strict=True):
            p.grad = (direction + 0.3 * torch.randn(p.shape, generator=gen)).to(device, dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("anchor", ["init", "zero"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_equals_the_multi_tensor_path(triton_on_cpu, multi_tensor, case, anchor):
    make, options = CASES[case]
    if anchor == "zero" and make in (ftp_adamw, ftp_sgd, spd_adam):
        pytest.skip("the wrappers anchor at the initial weights")
    got = tensors(*run(make, options, anchor, torch.float32))
    multi_tensor()
    want = tensors(*run(make, options, anchor, torch.float32))
    assert got.keys() == want.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_tracks_float32_as_the_multi_tensor_path_does(triton_on_cpu, multi_tensor, case):
    """bfloat16 runs drift from the float32 run by rounding; the kernels (one rounding per stored
    value) drift no more than the multi-tensor path (one per op), give or take one bfloat16 step."""
    make, options = CASES[case]
    got = tensors(*run(make, options, "init", torch.bfloat16))
    multi_tensor()
    want = tensors(*run(make, options, "init", torch.bfloat16))
    exact = tensors(*run(make, options, "init", torch.float32))
    assert_bfloat16_drift_within(got, want, exact)


def spy(monkeypatch):
    calls = []
    for name in ("_sweep", "project_", "decay_"):
        original = getattr(_triton_ops, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_triton_ops, name, wrapped)
    return calls


@pytest.mark.parametrize(
    "case, per_step",
    [
        ("AdamFTP", {"_sweep": 4, "project_": 1}),
        ("SGDFTP", {"_sweep": 4, "project_": 1}),
        ("AdamSPD", {"_sweep": 4, "decay_": 1}),
        ("FTP(AdamW)", {"_sweep": 4, "project_": 1}),
        ("SPD(Adam)", {"_sweep": 8, "decay_": 1}),
    ],
)
def test_every_step_takes_the_kernels(triton_on_cpu, monkeypatch, case, per_step):
    calls = spy(monkeypatch)
    make, options = CASES[case]
    run(make, options, "init", torch.float32, steps=2)
    assert {name: calls.count(name) for name in set(calls)} == {k: 2 * n for k, n in per_step.items()}


def test_a_tensor_learning_rate_or_a_strided_tensor_keeps_the_multi_tensor_path(triton_on_cpu, monkeypatch):
    """A 0-d tensor ``lr`` (Keras's) keeps the base step on the multi-tensor path (the projection,
    which reads no ``lr``, still runs in Triton); a strided tensor keeps the whole step there."""
    calls = spy(monkeypatch)
    run(AdamFTP, dict(lr=torch.tensor(0.05)), "init", torch.float32, steps=2)
    assert calls == ["project_", "project_"]
    calls.clear()
    p = torch.nn.Parameter(torch.randn(6, 4).t())  # not contiguous
    opt = AdamSPD([p], lr=0.05)
    p.grad = torch.randn(4, 6)
    opt.step()
    assert calls == []


def test_cuda_tensors_only_outside_the_tests(monkeypatch):
    """Without `run_on_cpu`, CPU tensors never take the Triton kernels (the C kernels serve them)."""
    monkeypatch.setattr(_triton_ops, "run_on_cpu", False)
    x = [torch.zeros(3)]
    assert not _triton_ops.takes(x, x)


# -- on a GPU: the compiled kernels -----------------------------------------------------------

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _triton_ops.available()), reason="needs CUDA and Triton"
)


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernels_equal_the_multi_tensor_path(monkeypatch, case, dtype):
    """On CUDA the steps take the Triton kernels; they agree with the multi-tensor path (float64:
    at 1e-12; float32 at float32's tolerance; bfloat16 within the multi-tensor path's own drift)."""
    calls = spy(monkeypatch)
    make, options = CASES[case]
    got = tensors(*run(make, options, "init", dtype, device="cuda"))
    assert "_sweep" in calls
    monkeypatch.setattr(_triton_ops, "triton", None)  # the multi-tensor path
    want = tensors(*run(make, options, "init", dtype, device="cuda"))
    exact = tensors(*run(make, options, "init", torch.float64, device="cuda"))
    for name, value in got.items():
        if dtype == torch.float64:
            torch.testing.assert_close(value.double(), want[name].double(), rtol=1e-12, atol=1e-14, msg=name)
        elif dtype == torch.float32:
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            reference = exact[name].float()
            ulp = 2.0**-7 * reference.abs().max().item()
            drift, multi_drift = ((x[name] - reference).abs().max().item() for x in (got, want))
            assert drift <= 1.5 * multi_drift + ulp, (name, drift, multi_drift)


@cuda
def test_a_cuda_step_never_synchronises(monkeypatch):
    """Every scalar the kernels read lives on the device: a step with sync debug mode set to
    "error" raises nothing."""
    _, opt = run(AdamFTP, dict(lr=0.05), "init", torch.float32, steps=1, device="cuda")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_a_tensor_that_does_not_decay_keeps_its_step_exactly(triton_on_cpu):
    """The SPD wrapper's decay with ``keep = 1`` reads and writes nothing: θ̃ stays, even beside ``θ₀ = inf``."""
    theta = torch.tensor([1.0, -0.0, 3.0])
    params = [theta.clone(), torch.tensor([4.0, 4.0, 4.0])]
    anchors = [torch.tensor([float("inf"), 2.0, float("nan")]), torch.zeros(3)]
    _triton_ops.decay_(params, anchors, torch.tensor([1.0, 0.5]), wrapper=True)
    torch.testing.assert_close(params[0], theta, rtol=0, atol=0)
    assert torch.signbit(params[0][1])
    torch.testing.assert_close(params[1], torch.tensor([2.0, 2.0, 2.0]), rtol=0, atol=0)
