"""The optax adapter against the PyTorch adapter: float64 trajectories at 1e-12, and float32
single steps from identical state at 1e-6 (relative). Skipped until ``tether.adapters.torch`` imports."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_closed_loop import ZERO_ANCHOR_WARNING, assert_trajectories_close, make, run

from tether.adapters import jax as tj
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

torch = pytest.importorskip("torch")
try:
    from tether.adapters import torch as tt
except Exception as error:  # the PyTorch adapter is written alongside this one
    pytest.skip(f"tether.adapters.torch cannot be imported yet: {error!r}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings(ZERO_ANCHOR_WARNING)
STEPS = 20

# (kind, anchor mode, unanchored names, hyperparameters in PyTorch's names)
CASES = {
    "adam_ftp": ("adam_ftp", "init", ("fc.bias",), dict(lr=3e-2, weight_decay=0.1, amsgrad=True, k=0.5)),
    "sgd_ftp": ("sgd_ftp", "zero", ("scale",), dict(lr=2e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adam_spd": ("adam_spd", "init", ("fc.bias",), dict(lr=3e-2, weight_decay=1.0)),
    "adam_spd-zero": ("adam_spd", "zero", (), dict(lr=1e-2, weight_decay=0.5, amsgrad=True)),
}
TORCH_CLASSES = {"adam_ftp": "AdamFTP", "sgd_ftp": "SGDFTP", "adam_spd": "AdamSPD"}


def torch_optimizer(kind, params, anchor, unanchored, hp):
    names = list(params)
    groups = [{"params": [params[n] for n in names if n not in unanchored], "anchor": anchor}]
    if unanchored:
        groups.append({"params": [params[n] for n in names if n in unanchored], "anchor": None})
    return getattr(tt, TORCH_CLASSES[kind])(groups, **hp)


def torch_run(kind, problem, steps, anchor, unanchored, hp):
    params = {n: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for n, v in problem.theta0.items()}
    opt = torch_optimizer(kind, params, anchor, unanchored, hp)
    trajectory = {n: [] for n in params}
    for t in range(steps):
        for n, p in params.items():
            p.grad = torch.tensor(problem.gradient(n, p.detach().numpy(), t))
        opt.step()
        for n, p in params.items():
            trajectory[n].append(p.detach().numpy().copy())
    return {n: np.stack(v) for n, v in trajectory.items()}


@pytest.fixture(scope="module")
def problem():
    return closed_loop_problem(seed=5, steps=STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_trajectory_equals_the_torch_adapter(case, problem):
    kind, anchor, unanchored, hp = CASES[case]
    mask = {n: n not in unanchored for n in problem.theta0}
    got, _ = run(make(kind, anchor=anchor, mask=mask, **hp), problem, STEPS)
    expected = torch_run(kind, problem, STEPS, anchor, unanchored, hp)
    assert_trajectories_close(got, expected)


def test_ftp_wrapper_around_sgd_equals_torch_ftp_around_sgd(problem):
    got, _ = run(tj.ftp(optax.sgd(5e-2), k=0.5), problem, STEPS)
    params = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in problem.theta0.items()}
    opt = tt.FTP(torch.optim.SGD(list(params.values()), lr=5e-2), k=0.5)
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = torch.tensor(problem.gradient(n, p.detach().numpy(), t))
        opt.step()
    for n, p in params.items():
        np.testing.assert_allclose(got[n][-1], p.detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=n)


# --- float32: one step from the same state ---------------------------------------------------------

SINGLE = {
    "adam_ftp": ("adam_ftp", "init", ("fc.bias",), dict(lr=1e-2, weight_decay=0.1, k=0.5)),
    "sgd_ftp": ("sgd_ftp", "init", (), dict(lr=1e-2, momentum=0.9, dampening=0.1)),
    "adam_spd": ("adam_spd", "init", ("fc.bias",), dict(lr=1e-2, weight_decay=1.0, amsgrad=True)),
}
WARMUP = 6  # float64 reference steps that make a mid-run state (moments, radius, previous displacement)


def _f32(x):
    return np.asarray(x, dtype=np.float32)


@pytest.mark.parametrize("case", list(SINGLE))
def test_float32_single_step_from_identical_state_matches_torch(case):
    kind, anchor, unanchored, hp = SINGLE[case]
    problem = closed_loop_problem(seed=9, steps=WARMUP + 1)
    names = list(problem.theta0)
    modes = {n: (None if n in unanchored else anchor) for n in names}
    reference = ReferenceOptimizer(kind, problem.theta0, anchors=modes, **hp)
    for t in range(WARMUP):
        reference.step({n: problem.gradient(n, p, t) for n, p in reference.params.items()})
    theta = {n: _f32(p) for n, p in reference.params.items()}
    grads = {n: _f32(problem.gradient(n, reference.params[n], WARMUP)) for n in names}

    # torch: build on θ, then put the reference's state (float32) in place
    params = {n: torch.nn.Parameter(torch.from_numpy(theta[n].copy())) for n in names}
    opt = torch_optimizer(kind, params, anchor, unanchored, hp)
    for n, p in params.items():
        state = opt.state[p]
        state.clear()
        state["step"] = torch.tensor(float(WARMUP))
        for key, value in reference.base[n]._asdict().items():
            if value is not None:
                state[key] = torch.from_numpy(_f32(value))
        if modes[n] == "init":
            state["anchor"] = torch.from_numpy(_f32(reference.anchors[n]))
        if n in reference.ftp:
            for key, value in reference.ftp[n]._asdict().items():
                state[key] = torch.from_numpy(_f32(value))
        p.grad = torch.from_numpy(grads[n])
    opt.step()

    # jax: the same state as the adapter's NamedTuple
    mask = {n: n not in unanchored for n in names}
    tx = make(kind, anchor=anchor, mask=mask, **hp)
    jparams = {n: jnp.asarray(theta[n]) for n in names}
    state = tx.init(jparams)
    fields = {"count": jnp.asarray(WARMUP, jnp.int32)}
    for key in reference.base[names[0]]._fields:
        if not isinstance(getattr(state, key), optax.MaskedNode):
            fields[key] = {n: jnp.asarray(_f32(getattr(reference.base[n], key))) for n in names}
    if anchor == "init":
        fields["anchor"] = {
            n: (jnp.asarray(_f32(reference.anchors[n])) if mask[n] else optax.MaskedNode()) for n in names
        }
    if hasattr(state, "projection"):
        fields["projection"] = tj.FTPProjectionState(
            *[
                {
                    n: (jnp.asarray(_f32(reference.ftp[n][i])) if mask[n] else optax.MaskedNode())
                    for n in names
                }
                for i in range(len(tj.FTPProjectionState._fields))
            ]
        )
    state = state._replace(**fields)
    updates, new_state = jax.jit(tx.update)({n: jnp.asarray(g) for n, g in grads.items()}, state, jparams)
    got = optax.apply_updates(jparams, updates)

    for n, p in params.items():
        expected = p.detach().numpy()
        assert got[n].dtype == jnp.float32
        scale = float(np.max(np.abs(expected))) or 1.0
        np.testing.assert_allclose(np.asarray(got[n]), expected, rtol=1e-6, atol=1e-6 * scale, err_msg=n)
        if hasattr(new_state, "projection") and mask[n]:
            radius = opt.state[p]["radius"].numpy()
            np.testing.assert_allclose(
                np.asarray(new_state.projection.radius[n]), radius, rtol=1e-6, err_msg=n
            )
