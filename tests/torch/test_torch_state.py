"""state_dict / load_state_dict: bit-for-bit resume in a fresh process, dtypes, and checks; copies."""

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_helpers import (
    BUILDERS,
    assert_bitwise_equal,
    make_params,
    named_groups,
    resume_problem,
    resume_setup,
    resume_steps,
    snapshot,
)

from tether.adapters.torch import FTP, AdamFTP, AdamSPD

HERE = Path(__file__).parent
STEPS, SPLIT = 10, 4


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run every class to SPLIT, save, finish; resume all of them in one fresh process."""
    tmp = tmp_path_factory.mktemp("resume")
    expected = {}
    for kind in BUILDERS:
        problem, params, opt, scheduler = resume_setup(kind)
        resume_steps(problem, params, opt, scheduler, 0, SPLIT)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in params.items()},
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
            tmp / f"{kind}.pt",
        )
        resume_steps(problem, params, opt, scheduler, SPLIT, STEPS)
        expected[kind] = snapshot(params, opt)
    cmd = [
        sys.executable,
        str(HERE / "torch_resume_child.py"),
        str(tmp),
        str(SPLIT),
        str(STEPS),
        *BUILDERS,
    ]
    subprocess.run(cmd, check=True, cwd=HERE, capture_output=True)
    return {
        kind: (expected[kind], torch.load(tmp / f"{kind}.resumed.pt", weights_only=True)) for kind in BUILDERS
    }


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_resume_in_fresh_process_is_bit_for_bit(kind, resumed):
    expected, got = resumed[kind]
    assert_bitwise_equal(expected, got)


def _trained(cls, params, **kw):
    opt = cls(params, lr=0.1, **kw)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_state_keys_and_dtypes_bf16():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    opt = _trained(AdamFTP, [w])
    state = opt.state[w]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["anchor"].dtype == state["prev_displacement"].dtype == torch.bfloat16
    for key in ("radius", "radius_exp_avg", "radius_exp_avg_sq", "step"):
        assert state[key].dtype == torch.float32, key
    # loading keeps the float32 radius state (torch's own load would cast it to bfloat16)
    state["radius"].fill_(1.2345678)
    fresh = AdamFTP([torch.nn.Parameter(w.detach().clone())], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    loaded = next(iter(fresh.state.values()))
    assert loaded["radius"].dtype == torch.float32
    assert torch.equal(loaded["radius"], state["radius"])


def test_adam_spd_memory():
    """AdamSPD keeps exp_avg, exp_avg_sq and the anchor; 'zero' stores no anchor; the rest is 0-d."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(5, 4))
    opt = _trained(AdamSPD, [{"params": [a]}, {"params": [b], "anchor": "zero"}])
    full = lambda p: sorted(k for k, v in opt.state[p].items() if v.shape == p.shape)  # noqa: E731
    assert full(a) == ["anchor", "exp_avg", "exp_avg_sq"]
    assert full(b) == ["exp_avg", "exp_avg_sq"]
    assert sorted(opt.state[a]) == ["anchor", "exp_avg", "exp_avg_sq", "spd_decayed", "spd_ratio", "step"]
    assert all(opt.state[a][k].ndim == 0 for k in ("spd_decayed", "spd_ratio", "step"))


def test_load_rejects_mismatched_anchor():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = _trained(AdamSPD, [w])
    state_dict = opt.state_dict()
    state_dict["state"][0]["anchor"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="anchor"):
        AdamSPD([torch.nn.Parameter(torch.randn(4, 3))]).load_state_dict(state_dict)
    state_dict["state"][0]["anchor"] = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="anchor"):
        AdamSPD([torch.nn.Parameter(torch.randn(4, 3))]).load_state_dict(state_dict)
    del state_dict["state"][0]["anchor"]
    with pytest.raises(ValueError, match="no 'anchor'"):
        AdamSPD([torch.nn.Parameter(torch.randn(4, 3))]).load_state_dict(state_dict)


def test_load_names_the_parameter():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = _trained(AdamFTP, [("encoder.weight", w)])
    state_dict = opt.state_dict()
    state_dict["state"][0]["prev_displacement"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"encoder\.weight"):
        AdamFTP([("encoder.weight", torch.nn.Parameter(torch.randn(4, 3)))]).load_state_dict(state_dict)


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_copy_continues_as_the_original(kind, how):
    """A copy of the optimizer with its parameters (``copy.deepcopy``, pickle) takes the same steps.

    The wrappers lost the wrapped optimizer (torch.optim pickles the state and groups only):
    ``AttributeError: 'FTP' object has no attribute 'optimizer'`` at the next step.
    """
    problem, params, opt, scheduler = resume_setup(kind)
    resume_steps(problem, params, opt, scheduler, 0, 4)
    twin_params, twin_opt = how((params, opt))
    twin_scheduler = type(scheduler)(twin_opt, step_size=3, gamma=0.5)
    twin_scheduler.load_state_dict(scheduler.state_dict())
    if hasattr(opt, "optimizer"):  # one list of groups, shared with the wrapped optimizer's copy
        assert twin_opt.param_groups is twin_opt.optimizer.param_groups
        assert twin_opt.optimizer.param_groups[0]["params"][0] is twin_params["conv.weight"]
    resume_steps(problem, params, opt, scheduler, 4, 10)
    resume_steps(problem, twin_params, twin_opt, twin_scheduler, 4, 10)
    assert_bitwise_equal(snapshot(params, opt), snapshot(twin_params, twin_opt))


@pytest.mark.parametrize("kind", ["FTP", "SPD", "L2SP", "MARSSP"])
def test_a_wrapper_loads_the_layout_with_a_top_level_base(kind):
    """A wrapper's state dict used to hold the wrapped optimizer's as a whole, under a top-level
    ``"base"`` key (torch.distributed.checkpoint keeps only ``state`` and ``param_groups``); such a
    state dict still resumes bit for bit."""
    problem, params, opt, scheduler = resume_setup(kind)
    resume_steps(problem, params, opt, scheduler, 0, 4)
    state_dict = copy.deepcopy(opt.state_dict())
    base = {i: values.pop("base") for i, values in state_dict["state"].items() if "base" in values}
    state_dict["base"] = {"state": base, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    _, twin_params, twin, twin_scheduler = resume_setup(kind)
    with torch.no_grad():
        for n, p in twin_params.items():
            p.copy_(params[n])
    twin.load_state_dict(state_dict)
    twin_scheduler.load_state_dict(scheduler.state_dict())
    resume_steps(problem, params, opt, scheduler, 4, 10)
    resume_steps(problem, twin_params, twin, twin_scheduler, 4, 10)
    assert_bitwise_equal(snapshot(params, opt), snapshot(twin_params, twin))


@pytest.mark.parametrize("kind", ["AdamFTP", "SGDFTP", "AdamSPD", "FTP", "SPD"])
def test_a_state_dict_loads_twice(kind):
    """torch's load adds "differentiable" to the defaults; accelerate (HF Trainer) loads twice."""
    from torch_helpers import BUILDERS

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = BUILDERS[kind]([w])
    w.grad = torch.randn_like(w)
    opt.step()
    state_dict = opt.state_dict()
    fresh = BUILDERS[kind]([torch.nn.Parameter(w.detach().clone())])
    fresh.load_state_dict(state_dict)
    fresh.load_state_dict(state_dict)


def _ftp_around_damped_sgd(groups):
    # torch's SGD starts its momentum buffer at the first gradient, undamped: a zero buffer differs
    return FTP(torch.optim.SGD(groups, lr=0.05, momentum=0.9, dampening=0.5), k=0.7)


@pytest.mark.parametrize("kind", [*sorted(BUILDERS), "FTP(SGD dampening)"])
def test_a_fresh_state_dict_loaded_before_the_first_step_changes_nothing(kind):
    """accelerate (the HF Trainer) loads the optimizer's own state dict back before the first step.

    That state dict holds the state a first step would make, so that it can serve as a template;
    loaded back, the run must be the one that never saw it (the wrappers' wrapped Adam counted
    that template as a step taken: every parameter was 2e-2 off after 6 steps)."""
    build = _ftp_around_damped_sgd if kind == "FTP(SGD dampening)" else BUILDERS[kind]
    runs = []
    for reload in (False, True):
        problem = resume_problem()
        params = make_params(problem, dtype=torch.float32)
        opt = build(named_groups(params))
        if reload:
            opt.load_state_dict(opt.state_dict())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        resume_steps(problem, params, opt, scheduler, 0, 6)
        runs.append(snapshot(params, opt))
    assert_bitwise_equal(*runs)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_state_dict_made_inside_a_default_device_context_loads(kind):
    """``with torch.device("meta")`` (or "cuda") around ``state_dict()``: what it adds of its own
    (a wrapper's per-tensor flag) is a CPU tensor, which the load can read."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = BUILDERS[kind]([w])
    w.grad = torch.randn_like(w)
    opt.step()
    with torch.device("meta"):
        state_dict = opt.state_dict()
    fresh = BUILDERS[kind]([torch.nn.Parameter(w.detach().clone())])
    fresh.load_state_dict(state_dict)
    assert all(
        value.device.type == "cpu"
        for entry in fresh.state.values()
        for value in entry.values()
        if isinstance(value, torch.Tensor)
    )
