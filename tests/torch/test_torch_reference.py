"""Float64 trajectories equal the NumPy run of tether.core (1e-12); wrappers equal the fused classes."""

import numpy as np
import pytest
import torch
from torch_helpers import (
    ANCHORS,
    make_params,
    named_groups,
    require_kernels,
    require_triton_interpreter,
    set_grads,
    to_numpy,
)

from tether.adapters import _torch_ops, _triton_ops
from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD, _Anchored
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

STEPS = 25
CASES = [
    ("adam_ftp", AdamFTP, {}),
    ("adam_ftp", AdamFTP, dict(lr=0.05, weight_decay=0.01, amsgrad=True, k=0.5)),
    ("adam_ftp", AdamFTP, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, k=0.0)),
    ("sgd_ftp", SGDFTP, dict(lr=0.05)),
    ("sgd_ftp", SGDFTP, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01, k=0.8)),
    ("sgd_ftp", SGDFTP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.001)),
    ("adam_spd", AdamSPD, dict(lr=0.05, weight_decay=1.0)),
    ("adam_spd", AdamSPD, dict(lr=0.05, weight_decay=0.5, amsgrad=True)),
]


def skipped(t):
    """Gradients that are None on step t: 'scale' every third step, 'fc.bias' on step 5."""
    return {"scale"} if t % 3 == 2 else ({"fc.bias"} if t == 5 else set())


@pytest.fixture(params=["kernels", "whole", "row_blocks", "multi_tensor", "triton"])
def blocks(request, monkeypatch):
    """The fused C kernels, or the CPU's single pass in PyTorch on whole tensors or one row per
    block, or the multi-tensor path, or the Triton kernels of CUDA steps in Triton's
    interpreter (the tests-triton session, ``TRITON_INTERPRET=1``).

    Float32/float64 CPU steps take the C kernels where they were built (SGD-FTP's step and
    every FTP projection), and the single pass for the rest, a block of rows at a time;
    making every tensor "large" gives one row a block. Without a scratch buffer a step takes
    the multi-tensor path that accelerators and 16-bit tensors take.
    """
    if request.param == "triton":
        require_triton_interpreter()
        monkeypatch.setattr(_triton_ops, "run_on_cpu", True)
    if request.param == "kernels":
        require_kernels()
    else:
        monkeypatch.setattr(_torch_ops, "_kernels", None)
    if request.param == "row_blocks":
        monkeypatch.setattr(_torch_ops, "BLOCK", 1)
    if request.param == "multi_tensor":
        monkeypatch.setattr(_Anchored, "_scratch_for", lambda self, params: None)
    return request.param


@pytest.mark.parametrize(
    ("kind", "cls", "hparams"), CASES, ids=lambda c: str(c) if isinstance(c, str) else ""
)
def test_float64_trajectory_equals_core(blocks, kind, cls, hparams):
    problem = closed_loop_problem(seed=3, steps=STEPS)
    params = make_params(problem)
    opt = cls(named_groups(params), **hparams)
    reference = ReferenceOptimizer(kind, problem.theta0, anchors=ANCHORS, **hparams)
    for t in range(STEPS):
        skip = skipped(t)
        set_grads(params, problem, t, skip)
        grads = {n: problem.gradient(n, p, t) for n, p in reference.params.items() if n not in skip}
        opt.step()
        expected = reference.step(grads)
        got = to_numpy(params)
        for n in params:
            np.testing.assert_allclose(got[n], expected[n], rtol=0, atol=1e-12, err_msg=f"{n} at step {t}")
    if kind.endswith("ftp"):
        for n, p in params.items():
            if ANCHORS[n] is not None:
                np.testing.assert_allclose(
                    float(opt.state[p]["radius"]), float(reference.radius(n)), atol=1e-12
                )


def _run(opt, params, problem, steps):
    for t in range(steps):
        set_grads(params, problem, t, skipped(t))
        opt.step()
    return to_numpy(params)


WRAPPED = [
    (
        lambda g: AdamFTP(g, lr=0.05, weight_decay=0.01, amsgrad=True, k=0.5),
        lambda g: FTP(torch.optim.AdamW(g, lr=0.05, weight_decay=0.01, amsgrad=True), k=0.5),
    ),
    (
        lambda g: SGDFTP(g, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01, k=0.8),
        lambda g: FTP(torch.optim.SGD(g, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01), k=0.8),
    ),
    (
        lambda g: SGDFTP(g, lr=0.05, momentum=0.9, nesterov=True),
        lambda g: FTP(torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, foreach=False)),
    ),
    (
        lambda g: AdamSPD(g, lr=0.05, weight_decay=1.0, amsgrad=True),
        lambda g: SPD(torch.optim.Adam(g, lr=0.05, amsgrad=True), weight_decay=1.0),
    ),
]


@pytest.mark.parametrize(("fused", "wrapped"), WRAPPED)
def test_wrapper_equals_fused_in_float64(blocks, fused, wrapped):
    problem = closed_loop_problem(seed=5, steps=STEPS)
    a, b = make_params(problem), make_params(problem)
    got = _run(wrapped(named_groups(b)), b, problem, STEPS)
    expected = _run(fused(named_groups(a)), a, problem, STEPS)
    for n in a:
        np.testing.assert_allclose(got[n], expected[n], rtol=0, atol=1e-12, err_msg=n)


def test_float32_single_step_matches_core():
    """From identical state, one float32 step agrees with the core run in float32."""
    problem = closed_loop_problem(seed=11, steps=3, dtype=np.float32)
    for kind, cls, hparams in CASES:
        params = make_params(problem, dtype=torch.float32)
        opt = cls(named_groups(params), **hparams)
        reference = ReferenceOptimizer(kind, problem.theta0, anchors=ANCHORS, **hparams)
        for t in range(3):
            set_grads(params, problem, t)
            reference_grads = {
                n: problem.gradient(n, p, t).astype(np.float32) for n, p in reference.params.items()
            }
            opt.step()
            expected = reference.step(reference_grads)
            for n, p in params.items():
                np.testing.assert_allclose(
                    p.detach().numpy(), expected[n], rtol=2e-5, atol=2e-6, err_msg=f"{kind} {n}"
                )
            # continue from the reference's parameters so that every step starts from identical state
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(torch.from_numpy(np.asarray(expected[n], dtype=np.float32)))
