"""Shared builders for the torch adapter's tests (imported by the tests and by the resume child)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, L2SP, MARSSP, SGDFTP, SPD, AdamFTP, AdamSPD
from tether.core.reference import closed_loop_problem

#: Anchor mode of each tensor of ``core.reference.DEFAULT_SHAPES``: every mode appears.
ANCHORS = {
    "conv.weight": "init",
    "fc.weight": "init",
    "fc.bias": "zero",
    "scale": "init",
    "head.weight": None,
}


def make_params(problem, dtype=torch.float64, device="cpu"):
    return {
        n: torch.nn.Parameter(torch.tensor(v, dtype=dtype, device=device)) for n, v in problem.theta0.items()
    }


def named_groups(params, anchors=ANCHORS, **extra):
    """One named group per anchor mode, in a fixed order."""
    groups = []
    for mode in ("init", "zero", None):
        names = [n for n in params if anchors.get(n, "init") == mode]
        if names:
            groups.append({"params": [(n, params[n]) for n in names], "anchor": mode, **extra.get(mode, {})})
    return groups


def set_grads(params, problem, t, skip=()):
    for n, p in params.items():
        if n in skip:
            p.grad = None
        else:
            g = problem.gradient(n, p.detach().to(torch.float64).cpu().numpy(), t)
            p.grad = torch.tensor(g, dtype=torch.float64).to(dtype=p.dtype, device=p.device)


def _adam_ftp(groups, eps=1e-8):
    return AdamFTP(groups, lr=0.05, eps=eps, weight_decay=0.01, amsgrad=True, k=0.5)


def _sgd_ftp(groups, eps=None):
    return SGDFTP(groups, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.001, k=0.8)


def _adam_spd(groups, eps=1e-8):
    return AdamSPD(groups, lr=0.05, eps=eps, weight_decay=1.0, amsgrad=True)


def _ftp(groups, eps=1e-8):
    return FTP(torch.optim.AdamW(groups, lr=0.05, eps=eps, weight_decay=0.01), k=0.7)


def _spd(groups, eps=1e-8):
    return SPD(torch.optim.Adam(groups, lr=0.05, eps=eps), weight_decay=0.5)


def _l2sp(groups, eps=1e-8):
    return L2SP(torch.optim.Adam(groups, lr=0.05, eps=eps), alpha=0.3)


def _marssp(groups, eps=None):
    return MARSSP(torch.optim.SGD(groups, lr=0.05, momentum=0.9), radius=0.5)


#: Builders of the public optimizer classes, with hyperparameters that exercise every branch
#: (``eps`` is Adam's, for float16, where 1e-8 underflows as in torch.optim.Adam).
BUILDERS = {
    "AdamFTP": _adam_ftp,
    "SGDFTP": _sgd_ftp,
    "AdamSPD": _adam_spd,
    "FTP": _ftp,
    "SPD": _spd,
    "L2SP": _l2sp,
    "MARSSP": _marssp,
}


def resume_problem():
    return closed_loop_problem(seed=7, steps=12)


def resume_setup(kind):
    """Fresh float32 parameters (plus one bf16 tensor), optimizer and scheduler for the resume test."""
    problem = resume_problem()
    params = make_params(problem, dtype=torch.float32)
    params["fc.bias"] = torch.nn.Parameter(params["fc.bias"].detach().to(torch.bfloat16))
    groups = named_groups({n: p for n, p in params.items() if n != "fc.bias"})
    groups.append({"params": [("fc.bias", params["fc.bias"])], "anchor": "init"})
    opt = BUILDERS[kind](groups)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return problem, params, opt, scheduler


def resume_steps(problem, params, opt, scheduler, start, stop):
    for t in range(start, stop):
        # "scale" skips every third step: its state must stay untouched meanwhile
        set_grads(params, problem, t, skip=("scale",) if t % 3 == 1 else ())
        opt.step()
        scheduler.step()
        opt.zero_grad()


def state_tensors(state_dict):
    """``{"index:key": tensor}`` of every state tensor, the wrapped optimizer's (``"base"``) as ``"index:base.key"``."""
    out = {}
    for i, values in state_dict["state"].items():
        for k, v in values.items():
            if k == "base":
                out.update({f"{i}:base.{kb}": vb for kb, vb in v.items() if torch.is_tensor(vb)})
            elif torch.is_tensor(v):
                out[f"{i}:{k}"] = v
    return out


def snapshot(params, opt):
    """Every parameter and every state tensor, as CPU tensors, for a bit-for-bit comparison."""
    out = {f"param:{n}": p.detach().cpu().clone() for n, p in params.items()}
    for key, value in state_tensors(opt.state_dict()).items():
        out[f"state:{key}"] = value.detach().cpu().clone()
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def to_numpy(params):
    return {n: p.detach().cpu().to(torch.float64).numpy() for n, p in params.items()}


__all__ = ["np"]


def require_kernels():
    """The fused C kernels (`tether.adapters._kernels`); skip a test where they were not built.

    Under nox (``TETHER_REQUIRE_KERNELS=1``) a missing build fails instead: there, the package
    is built on a machine with a C compiler, so a missing module is a broken build.
    """
    if _torch_ops._kernels is None:
        if os.environ.get("TETHER_REQUIRE_KERNELS") == "1":
            pytest.fail("tether.adapters._kernels was not built (TETHER_REQUIRE_KERNELS=1)")
        pytest.skip("tether.adapters._kernels was not built (no C compiler at install)")
    return _torch_ops._kernels


DOCS = Path(__file__).resolve().parents[2] / "docs"


def snippet(name, page="scale.md"):
    """The Python code block that follows ``<!-- snippet: name -->`` in ``docs/page``: the tests run it."""
    text = (DOCS / page).read_text()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    if match is None:
        raise LookupError(f"docs/{page} has no snippet {name!r}")
    return match.group(1)


def require_triton_interpreter():
    """Skip unless Triton is installed and its interpreter is on (``TRITON_INTERPRET=1``, which
    must be set before Triton compiles the kernels: the tests-triton session sets it)."""
    from tether.adapters import _triton_ops

    if not _triton_ops.available():
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is not set: the Triton kernels run in the tests-triton session")


def float_tensors(params, opt):
    """Each parameter and its floating state tensors, by name, as float32."""
    out = {}
    for i, p in enumerate(params):
        out[f"param {i}"] = p.detach().float()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                out[f"param {i} {key}"] = value.float()
    return out


def assert_bfloat16_drift_within(got, multi_tensor, exact):
    """bfloat16 runs drift from the float32 run (``exact``) by rounding. A fused path (one rounding
    per stored value) drifts no more than the multi-tensor path (one per op), give or take one
    bfloat16 step of the tensor's scale. Each argument is `float_tensors` of a run."""
    assert got.keys() == multi_tensor.keys() == exact.keys()
    for name, reference in exact.items():
        assert torch.isfinite(got[name]).all(), name
        ulp = 2.0**-7 * reference.abs().max().item()
        drift, multi_drift = ((x[name] - reference).abs().max().item() for x in (got, multi_tensor))
        assert drift <= 1.5 * multi_drift + ulp, (name, drift, multi_drift)
