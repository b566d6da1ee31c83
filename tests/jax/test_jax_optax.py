"""The adapter as an optax citizen: chains, schedules, inject_hyperparams, masks, partitions,
checkpoints, donation and dtypes."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_closed_loop import as_params, assert_trajectories_close, reference_anchors, run

from tether.adapters import jax as tj
from tether.core.reference import ReferenceOptimizer, closed_loop_problem, run_reference

STEPS = 12


@pytest.fixture(scope="module")
def problem():
    return closed_loop_problem(seed=3, steps=STEPS)


def test_after_clip_by_global_norm_in_a_chain(problem):
    """FTP sees the clipped gradient as its raw gradient (the radius gradient uses it too)."""
    tx = optax.chain(optax.clip_by_global_norm(0.5), tj.adam_ftp(1e-2, weight_decay=0.01))
    got, _ = run(tx, problem, STEPS)

    reference = ReferenceOptimizer("adam_ftp", problem.theta0, lr=1e-2, weight_decay=0.01)
    expected = {n: [] for n in problem.theta0}
    for t in range(STEPS):
        grads = {n: problem.gradient(n, p, t) for n, p in reference.params.items()}
        norm = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
        grads = {n: g * (0.5 / max(norm, 0.5)) for n, g in grads.items()}
        for n, p in reference.step(grads).items():
            expected[n].append(p.copy())
    assert_trajectories_close(got, {n: np.stack(v) for n, v in expected.items()})


def test_schedule_is_read_at_the_count_before_the_step(problem):
    def schedule(count):  # float64 arithmetic, so that the reference can repeat it exactly
        return 3e-2 / (1.0 + jnp.asarray(count, jnp.float64))

    got, _ = run(tj.adam_spd(schedule, weight_decay=0.5), problem, STEPS)

    reference = ReferenceOptimizer("adam_spd", problem.theta0, weight_decay=0.5)
    expected = {n: [] for n in problem.theta0}
    for t in range(STEPS):
        reference.hparams["lr"] = 3e-2 / (1.0 + t)
        grads = {n: problem.gradient(n, p, t) for n, p in reference.params.items()}
        for n, p in reference.step(grads).items():
            expected[n].append(p.copy())
    assert_trajectories_close(got, {n: np.stack(v) for n, v in expected.items()})


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (tj.adam_ftp, dict(learning_rate=1e-2, b1=0.8, weight_decay=0.1, k=0.5)),
        (tj.sgd_ftp, dict(learning_rate=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
        (tj.sgd_ftp, dict(learning_rate=5e-2, momentum=0.0)),
        (tj.adam_spd, dict(learning_rate=1e-2, weight_decay=0.5)),
    ],
    ids=["adam_ftp", "sgd_ftp-momentum", "sgd_ftp-no-momentum", "adam_spd"],
)
def test_inject_hyperparams_matches_the_plain_transformation(factory, kwargs, problem):
    """Hyperparameters arrive as arrays; the result is the same, and a callable mask stays static."""
    mask = lambda p: {n: n != "fc.bias" for n in p}  # noqa: E731
    plain, _ = run(factory(**kwargs, mask=mask), problem, 6)
    injected_tx = optax.inject_hyperparams(factory, static_args=("mask",))(**kwargs, mask=mask)
    injected, state = run(injected_tx, problem, 6)
    assert_trajectories_close(injected, plain, rtol=1e-13, atol=1e-13)
    assert set(state.hyperparams) >= {"learning_rate"}


def test_injected_learning_rate_can_be_changed_between_steps(problem):
    """SPD with lr = 0: θ̃ = θ, no distance gained, so no decay either: the updates are exactly zero."""
    tx = optax.inject_hyperparams(tj.adam_spd)(learning_rate=1e-2, weight_decay=1.0)
    params = as_params(problem.theta0)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, state = update(grads, state, params)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)


def test_prefix_mask_and_callable_mask_give_the_same_run(problem):
    nested = {"body": {n: problem.theta0[n] for n in ("conv.weight", "fc.weight", "fc.bias")},
              "head": {n: problem.theta0[n] for n in ("head.weight", "scale")}}  # fmt: skip

    def to_nested(flat):
        return {k: {n: flat[n] for n in v} for k, v in nested.items()}

    prefix = tj.adam_ftp(1e-2, mask={"body": True, "head": False})
    by_rank = tj.adam_ftp(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2 and x.shape[0] != 4, p))
    results = []
    for tx in (prefix, by_rank):
        params = jax.tree.map(jnp.asarray, nested)
        state = tx.init(params)
        for t in range(4):
            flat = {n: np.asarray(params[k][n]) for k in nested for n in nested[k]}
            grads = to_nested({n: jnp.asarray(problem.gradient(n, p, t)) for n, p in flat.items()})
            updates, state = jax.jit(tx.update)(grads, state, params)
            params = optax.apply_updates(params, updates)
        results.append(params)
        assert isinstance(state.anchor["head"]["scale"], optax.MaskedNode)
    # the callable masks fc.bias (1-d) too, so compare the tensors both treat alike
    for k, n in [("body", "conv.weight"), ("body", "fc.weight"), ("head", "head.weight"), ("head", "scale")]:
        np.testing.assert_array_equal(results[0][k][n], results[1][k][n])

    anchors = {"head.weight": None, "scale": None}
    expected = run_reference("adam_ftp", problem, 4, anchors=anchors, lr=1e-2)
    for k, n in [("body", "conv.weight"), ("head", "head.weight"), ("head", "scale")]:
        np.testing.assert_allclose(results[0][k][n], expected[n][-1], rtol=1e-12, atol=1e-12)


def test_inside_multi_transform_with_frozen_leaves(problem):
    """optax partitions hand the transformation a params tree with MaskedNode holes."""
    labels = {n: ("frozen" if n == "conv.weight" else "tuned") for n in problem.theta0}
    tx = optax.multi_transform(
        {"tuned": tj.sgd_ftp(1e-2, momentum=0.9), "frozen": optax.set_to_zero()}, labels
    )
    got, _ = run(tx, problem, STEPS)
    np.testing.assert_array_equal(got["conv.weight"][-1], problem.theta0["conv.weight"])
    tuned = {n: v for n, v in problem.theta0.items() if n != "conv.weight"}
    expected = run_reference(
        "sgd_ftp",
        closed_loop_problem(seed=3, steps=STEPS),
        STEPS,
        anchors=reference_anchors(problem.theta0, "init"),
        lr=1e-2,
        momentum=0.9,
    )
    for n in tuned:  # the frozen tensor does not enter the others' gradients in this problem
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: tj.adam_ftp(1e-2, amsgrad=True),
        lambda: tj.adam_spd(1e-2, 0.9),
        lambda: tj.sgd_ftp(1e-2, momentum=0.9, nesterov=True),
        lambda: tj.ftp(optax.adamw(1e-2, weight_decay=1e-2), k=0.5),
        lambda: tj.spd(optax.adam(1e-2), weight_decay=0.9),
    ],
    ids=["adam_ftp", "adam_spd", "sgd_ftp", "ftp(adamw)", "spd(adam)"],
)
def test_checkpoint_round_trip_resumes_bit_for_bit(factory, problem):
    tx = factory()
    update = jax.jit(tx.update)
    params = as_params(problem.theta0)
    state = tx.init(params)

    def steps(params, state, start, stop):
        for t in range(start, stop):
            grads = {n: jnp.asarray(problem.gradient(n, np.asarray(p), t)) for n, p in params.items()}
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    straight, _ = steps(params, state, 0, 8)
    params, state = steps(params, state, 0, 4)
    blob = pickle.dumps((jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state)))
    saved_params, saved_state = pickle.loads(blob)
    restored = jax.tree.unflatten(
        jax.tree.structure(state), [jnp.asarray(x) for x in jax.tree.leaves(saved_state)]
    )
    resumed, _ = steps(jax.tree.map(jnp.asarray, saved_params), restored, 4, 8)
    for n in straight:
        np.testing.assert_array_equal(resumed[n], straight[n])


def test_donating_params_and_state_is_safe(problem):
    """The "init" anchor is a copy, so donating the parameters never deletes it."""
    tx = tj.adam_ftp(1e-2)

    @jax.jit
    def _train_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    train_step = jax.jit(_train_step, donate_argnums=(0, 1))
    params = as_params(problem.theta0)
    state = tx.init(params)
    for t in range(3):
        grads = {n: jnp.asarray(problem.gradient(n, np.asarray(p), t)) for n, p in params.items()}
        params, state = train_step(params, state, grads)
    expected = run_reference("adam_ftp", problem, 3, lr=1e-2)
    for n in params:
        np.testing.assert_allclose(params[n], expected[n][-1], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(state.anchor[n], problem.theta0[n])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("factory", [tj.adam_ftp, tj.sgd_ftp, tj.adam_spd])
def test_parameter_dtype_is_kept_and_radius_is_at_least_float32(factory, dtype):
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros((4,), dtype)}
    tx = factory(1e-2)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for _ in range(2):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves((updates, params)):
        assert leaf.dtype == dtype
    if hasattr(state, "projection"):
        assert all(r.dtype == jnp.float32 for r in jax.tree.leaves(state.projection.radius))
        assert all(np.all(np.asarray(r) > 0) for r in jax.tree.leaves(state.projection.radius))
    assert state.count.dtype == jnp.int32


def test_zero_momentum_stores_no_buffer_and_zero_anchor_stores_no_anchor():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((4,))}
    state = tj.sgd_ftp(1e-2, anchor="zero").init(params)
    assert jax.tree.leaves(state.momentum_buffer) == []
    assert jax.tree.leaves(state.anchor) == []
    state = tj.adam_spd(1e-2, mask={"w": True, "b": False}).init(params)
    assert isinstance(state.anchor["b"], optax.MaskedNode)
    assert jax.tree.leaves(state.max_exp_avg_sq) == []


@pytest.mark.parametrize(
    "factory",
    [lambda: tj.adam_spd(1e-3, weight_decay=0.5), lambda: tj.spd(optax.adam(1e-3), weight_decay=0.5)],
)
def test_spd_keeps_one_tensors_temporaries_alive_at_a_time(factory):
    """XLA:CPU materializes SPD's statistics; chained, the tensors do not all hold theirs at once."""
    if jax.default_backend() != "cpu":
        pytest.skip("a check of XLA:CPU's buffer assignment")
    params = {f"w{i}": jnp.ones((256, 256), jnp.float32) for i in range(8)}
    tx = factory()
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("no memory analysis on this jax version")
    one_tensor = 256 * 256 * 4
    assert analysis.temp_size_in_bytes <= 4 * one_tensor, analysis.temp_size_in_bytes / one_tensor
