"""The reference baselines for JAX (ALGORITHMS.md §8): l2_sp, mars_sp and wise_ft against the core in float64."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_closed_loop import as_params, assert_trajectories_close, reference_anchors, run

from tether import core
from tether.adapters import jax as tj
from tether.core.reference import closed_loop_problem, run_reference

STEPS = 20


@pytest.fixture(scope="module")
def problem():
    return closed_loop_problem(seed=5, steps=STEPS)


def _l2_sp(alpha, sgd, anchor, mask):
    return optax.chain(tj.l2_sp(alpha, anchor=anchor, mask=mask), sgd)


def _mars_sp(radius, sgd, anchor, mask):
    return tj.mars_sp(sgd, radius=radius, anchor=anchor, mask=mask)


# (reference kind, builder, its strength, anchor mode, unanchored names, SGD's hyperparameters)
CASES = {
    "l2sp-init": ("sgd_l2sp", _l2_sp, dict(alpha=0.5), "init", (), dict(lr=0.05)),
    "l2sp-momentum-mask": ("sgd_l2sp", _l2_sp, dict(alpha=2.0), "init", ("fc.bias", "scale"), dict(lr=0.02, momentum=0.9)),
    "l2sp-zero-nesterov": ("sgd_l2sp", _l2_sp, dict(alpha=0.3), "zero", ("head.weight",), dict(lr=0.02, momentum=0.8, nesterov=True)),
    "marssp-init": ("sgd_marssp", _mars_sp, dict(radius=0.4), "init", (), dict(lr=0.05)),
    "marssp-momentum-mask": ("sgd_marssp", _mars_sp, dict(radius=1.5), "init", ("fc.weight",), dict(lr=0.05, momentum=0.9)),
    "marssp-zero": ("sgd_marssp", _mars_sp, dict(radius=0.5), "zero", ("fc.bias",), dict(lr=0.05, momentum=0.5)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_equals_the_numpy_reference(case, problem):
    kind, build, strength, anchor, unanchored, sgd = CASES[case]
    mask = {n: n not in unanchored for n in problem.theta0}
    base = optax.sgd(sgd["lr"], momentum=sgd.get("momentum"), nesterov=sgd.get("nesterov", False))
    got, _ = run(build(*strength.values(), base, anchor, mask), problem, STEPS)
    anchors = reference_anchors(problem.theta0, anchor, unanchored)
    expected = run_reference(kind, problem, STEPS, anchors=anchors, **strength, **sgd)
    assert_trajectories_close(got, expected)
    if unanchored:  # the mask matters: anchoring every tensor gives another run
        everything = run_reference(
            kind, problem, STEPS, anchors=reference_anchors(problem.theta0, anchor), **strength, **sgd
        )
        assert not all(np.allclose(got[n], everything[n]) for n in unanchored)


def test_mars_sp_keeps_every_row_within_the_radius_on_the_flax_layout():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((5, 3))), "bias": jnp.zeros(3)}}
    tx = tj.mars_sp(optax.sgd(1.0), radius=0.25)
    state = tx.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    moved = params["dense"]["kernel"] - state.anchor["dense"]["kernel"]
    rows = np.sum(np.abs(np.asarray(moved)), axis=0)  # rows are the output units: the last axis
    assert rows.shape == (3,) and np.all(rows <= 0.25 + 1e-12) and np.all(rows > 0.2)
    assert float(jnp.sum(jnp.abs(params["dense"]["bias"]))) <= 0.25 + 1e-12


def test_l2_sp_penalizes_16_bit_tensors_in_float32():
    rng = np.random.default_rng(1)
    theta0 = jnp.asarray(rng.standard_normal(256), jnp.bfloat16)
    theta = (theta0 + jnp.asarray(0.01 * rng.standard_normal(256), jnp.bfloat16)).astype(jnp.bfloat16)
    grad = jnp.asarray(rng.standard_normal(256), jnp.bfloat16)
    tx = tj.l2_sp(0.37)
    out, _ = tx.update(grad, tx.init(theta0), theta)
    wide = grad.astype(jnp.float32) + 0.37 * (theta.astype(jnp.float32) - theta0.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(wide.astype(jnp.bfloat16), np.float32)
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda: optax.chain(tj.l2_sp(0.5), optax.sgd(0.05, momentum=0.9)),
        lambda: tj.mars_sp(optax.adam(1e-2), radius=0.3),
    ],
)
def test_jitted_state_round_trip_resumes_bit_for_bit(factory, problem):
    tx = factory()
    update = jax.jit(tx.update)

    def steps(params, state, start, stop):
        for t in range(start, stop):
            grads = {n: jnp.asarray(problem.gradient(n, np.asarray(p), t)) for n, p in params.items()}
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    params = as_params(problem.theta0)
    straight, _ = steps(params, tx.init(params), 0, 8)
    params, state = steps(params, tx.init(params), 0, 4)
    leaves = pickle.loads(pickle.dumps([np.asarray(x) for x in jax.tree.leaves(state)]))
    restored = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(x) for x in leaves])
    resumed, _ = steps(params, restored, 4, 8)
    for n in straight:
        np.testing.assert_array_equal(resumed[n], straight[n])


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: tj.l2_sp(-0.1), ValueError, "alpha must be a finite number"),
        (lambda: tj.l2_sp(float("nan")), ValueError, "alpha must be a finite number"),
        (lambda: tj.l2_sp(float("inf")), ValueError, "alpha must be a finite number"),
        (lambda: tj.l2_sp("0.1"), TypeError, "alpha"),
        (lambda: tj.l2_sp(0.1, anchor="pretrained"), ValueError, "anchor must be one of"),
        (lambda: tj.l2_sp(0.1, mask="all"), TypeError, "mask"),
        (lambda: tj.mars_sp(optax.sgd(0.1), radius=-1.0), ValueError, "radius must be a finite number"),
        (
            lambda: tj.mars_sp(optax.sgd(0.1), radius=float("inf")),
            ValueError,
            "radius must be a finite number",
        ),
        (lambda: tj.mars_sp(lambda g: g, radius=1.0), TypeError, "GradientTransformation"),
        (lambda: tj.mars_sp(optax.sgd(0.1), radius=1.0, anchor=None), ValueError, "use `mask`"),
        (lambda: tj.mars_sp(optax.sgd(0.1), radius=1.0, row_axis="last"), TypeError, "row_axis"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}
GRADS = {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}


@pytest.mark.parametrize("build", [lambda: tj.l2_sp(0.1), lambda: tj.mars_sp(optax.sgd(0.1), radius=1.0)])
def test_update_checks_params_and_state_and_names_the_tensor(build):
    tx = build()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="`params` is required"):
        tx.update(GRADS, state)
    other = tx.init({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"state\.anchor of \['w'\] has shape"):
        tx.update(GRADS, other, PARAMS)
    with pytest.raises(TypeError, match="made by this transformation's init"):
        tx.update(GRADS, tj.adam_spd(1e-3).init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match=r"the gradient of \['w'\] has shape"):
        tx.update({"w": jnp.ones(6), "b": jnp.ones(3)}, state, PARAMS)


def test_a_state_made_with_another_mask_is_an_error():
    state = tj.l2_sp(0.1, mask={"w": True, "b": False}).init(PARAMS)
    with pytest.raises(ValueError, match=r"state\.anchor of \['b'\] should hold an array"):
        tj.l2_sp(0.1).update(GRADS, state, PARAMS)


def test_l2_sp_and_mars_sp_work_under_inject_hyperparams(problem):
    injected = optax.inject_hyperparams(tj.l2_sp)(alpha=0.5)
    got, _ = run(optax.chain(injected, optax.sgd(0.05)), problem, 5)
    plain, _ = run(optax.chain(tj.l2_sp(0.5), optax.sgd(0.05)), problem, 5)
    assert_trajectories_close(got, plain, rtol=1e-15, atol=1e-15)
    injected = optax.inject_hyperparams(tj.mars_sp, static_args=("inner",))(inner=optax.sgd(0.05), radius=0.4)
    got, _ = run(injected, problem, 5)
    plain, _ = run(tj.mars_sp(optax.sgd(0.05), radius=0.4), problem, 5)
    assert_trajectories_close(got, plain, rtol=1e-15, atol=1e-15)


# --- WiSE-FT ---------------------------------------------------------------------------------------


def _model_state(seed, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return {
        "params": {"dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), dtype), "bias": jnp.zeros(3, dtype)}},
        "batch_stats": {"mean": jnp.asarray(rng.standard_normal(3), dtype), "count": jnp.asarray(seed, jnp.int32)},
        "flags": jnp.asarray([True, seed % 2 == 0]),
    }  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_wise_ft_mixes_every_floating_leaf_and_keeps_the_others(alpha):
    anchor, finetuned = _model_state(1), _model_state(2)
    mixed = tj.wise_ft(anchor, finetuned, alpha)
    assert jax.tree.structure(mixed) == jax.tree.structure(finetuned)
    for path, value in jax.tree_util.tree_flatten_with_path(mixed)[0]:
        a = _at(anchor, path)
        f = _at(finetuned, path)
        if jnp.issubdtype(f.dtype, jnp.floating):
            np.testing.assert_allclose(value, (1 - alpha) * np.asarray(a) + alpha * np.asarray(f), rtol=1e-15)
            np.testing.assert_array_equal(value, core.wise_ft(np.asarray(a), np.asarray(f), alpha))
        else:
            assert value is f
    for leaf in jax.tree.leaves(tj.wise_ft(anchor, finetuned, 0.0)["params"]):
        assert leaf.dtype == jnp.float64
    np.testing.assert_array_equal(
        tj.wise_ft(anchor, finetuned, 0.0)["params"]["dense"]["kernel"], anchor["params"]["dense"]["kernel"]
    )
    np.testing.assert_array_equal(
        tj.wise_ft(anchor, finetuned, 1.0)["params"]["dense"]["kernel"],
        finetuned["params"]["dense"]["kernel"],
    )


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_wise_ft_computes_16_bit_leaves_in_float32_and_traces_under_jit():
    anchor, finetuned = _model_state(1, jnp.bfloat16), _model_state(2, jnp.bfloat16)
    mixed = tj.wise_ft(anchor, finetuned, 0.3)
    kernel = mixed["params"]["dense"]["kernel"]
    a, f = (t["params"]["dense"]["kernel"].astype(jnp.float32) for t in (anchor, finetuned))
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32), np.asarray((0.7 * a + 0.3 * f).astype(jnp.bfloat16), np.float32)
    )
    jitted = jax.jit(tj.wise_ft)(anchor, finetuned, jnp.asarray(0.3, jnp.float32))
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(mixed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("anchor", "alpha", "match"),
    [
        (_model_state(1), -0.1, r"alpha must be a finite number in \[0.0, 1.0\]"),
        (_model_state(1), 1.5, r"alpha must be a finite number in \[0.0, 1.0\]"),
        (_model_state(1), float("nan"), "alpha must be a finite number"),
        ({"params": _model_state(1)["params"]}, 0.5, "tree structure of params"),
        ({**_model_state(1), "params": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(3)}}}, 0.5, r"the anchor's \['params'\]\['dense'\]\['kernel'\] is \(3, 4\)"),
    ],
)  # fmt: skip
def test_wise_ft_refuses_bad_input(anchor, alpha, match):
    with pytest.raises(ValueError, match=match):
        tj.wise_ft(anchor, _model_state(2), alpha)
