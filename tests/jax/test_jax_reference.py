"""Float64 trajectories of the optax adapter equal a NumPy run of the core (ALGORITHMS.md §3–§6) at 1e-12."""

import numpy as np
import optax
import pytest
from jax_closed_loop import ZERO_ANCHOR_WARNING, assert_trajectories_close, make, reference_anchors, run

from tether.adapters import jax as tj
from tether.core.reference import closed_loop_problem, run_reference

pytestmark = pytest.mark.filterwarnings(ZERO_ANCHOR_WARNING)
STEPS = 30

# (kind, anchor mode, unanchored names, hyperparameters in the reference's names)
CASES = {
    "adam_ftp-defaults": ("adam_ftp", "init", (), {}),
    "adam_ftp-wd-amsgrad-k-mask": (
        "adam_ftp", "init", ("fc.bias",), dict(lr=3e-2, weight_decay=0.1, amsgrad=True, k=0.5, eps=1e-6)
    ),
    "adam_ftp-zero": ("adam_ftp", "zero", ("head.weight",), dict(lr=1e-2, betas=(0.8, 0.99))),
    "sgd_ftp-plain": ("sgd_ftp", "init", (), dict(lr=5e-2)),
    "sgd_ftp-momentum-dampening-wd": (
        "sgd_ftp", "init", ("scale",), dict(lr=2e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2, k=0.3)
    ),
    "sgd_ftp-nesterov-zero": ("sgd_ftp", "zero", ("fc.bias",), dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "adam_spd-init-mask": ("adam_spd", "init", ("fc.bias",), dict(lr=3e-2, weight_decay=1.0)),
    "adam_spd-zero-amsgrad": (
        "adam_spd", "zero", ("head.weight",), dict(lr=1e-2, weight_decay=0.5, amsgrad=True)
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def problem():
    return closed_loop_problem(seed=7, steps=STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_trajectory_equals_the_numpy_reference(case, problem):
    kind, anchor, unanchored, hp = CASES[case]
    names = list(problem.theta0)
    mask = {n: n not in unanchored for n in names}
    tx = make(kind, anchor=anchor, mask=mask, **hp)
    got, state = run(tx, problem, STEPS)
    expected = run_reference(kind, problem, STEPS, anchors=reference_anchors(names, anchor, unanchored), **hp)
    assert_trajectories_close(got, expected)
    assert int(state.count) == STEPS


def test_ftp_radius_equals_the_reference(problem):
    from tether.core.reference import ReferenceOptimizer

    tx = tj.adam_ftp(1e-2, weight_decay=0.05)
    _, state = run(tx, problem, STEPS)
    reference = ReferenceOptimizer("adam_ftp", problem.theta0, lr=1e-2, weight_decay=0.05)
    for t in range(STEPS):
        reference.step({n: problem.gradient(n, p, t) for n, p in reference.params.items()})
    for name in problem.theta0:
        np.testing.assert_allclose(state.projection.radius[name], reference.radius(name), rtol=1e-12)
        np.testing.assert_allclose(state.anchor[name], problem.theta0[name], rtol=0, atol=0)


def test_sgd_wrapper_is_the_fused_sgd_ftp(problem):
    """optax.sgd proposes θ − lr·g exactly as the core does, so ftp(optax.sgd) is sgd_ftp to 1e-12."""
    mask = {n: n != "fc.bias" for n in problem.theta0}
    got, _ = run(tj.ftp(optax.sgd(5e-2), k=0.7, mask=mask), problem, STEPS)
    anchors = reference_anchors(problem.theta0, "init", ("fc.bias",))
    expected = run_reference("sgd_ftp", problem, STEPS, anchors=anchors, lr=5e-2, k=0.7)
    assert_trajectories_close(got, expected)


# Wrappers around optax's own Adam / SGD-momentum: the same math in another order, so up to rounding.
WRAPPED = {
    "ftp(adam)": (lambda: tj.ftp(optax.adam(1e-2)), "adam_ftp", "init", dict(lr=1e-2)),
    "ftp(adamw)": (
        lambda: tj.ftp(optax.adamw(1e-2, weight_decay=0.1), k=0.5),
        "adam_ftp", "init", dict(lr=1e-2, weight_decay=0.1, k=0.5),
    ),
    "ftp(sgd-nesterov)": (
        lambda: tj.ftp(optax.sgd(1e-2, momentum=0.9, nesterov=True), anchor="zero"),
        "sgd_ftp", "zero", dict(lr=1e-2, momentum=0.9, nesterov=True),
    ),
    "spd(adam)": (
        lambda: tj.spd(optax.adam(3e-2), weight_decay=1.0),
        "adam_spd", "init", dict(lr=3e-2, weight_decay=1.0),
    ),
    "spd(adam)-zero": (
        lambda: tj.spd(optax.adam(1e-2), weight_decay=0.5, anchor="zero"),
        "adam_spd", "zero", dict(lr=1e-2, weight_decay=0.5),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRAPPED))
def test_wrapper_around_optax_equals_the_fused_form(case, problem):
    build, kind, anchor, hp = WRAPPED[case]
    got, _ = run(build(), problem, STEPS)
    expected = run_reference(kind, problem, STEPS, anchors=reference_anchors(problem.theta0, anchor), **hp)
    assert_trajectories_close(got, expected, rtol=1e-9, atol=1e-9)
