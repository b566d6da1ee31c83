"""16-bit parameters (statistics in float32, parameters in their own dtype) and empty tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tether.adapters import jax as tj

# eps=1e-4: Adam's second moment is kept in the parameter's dtype (as torch.optim.Adam does), and in
# float16 (1 − β₂)·g² rounds to 0 for |g| below ~5e-3, where eps=1e-8 would blow the step up; that is
# the base step's precision, not FTP's or SPD's.
TRANSFORMS = {
    "adam_ftp-AdamFTP-like": lambda: tj.adam_ftp(1e-5, eps=1e-4),  # NaN at step 2 with 16-bit statistics
    "adam_ftp": lambda: tj.adam_ftp(1e-2, eps=1e-4, weight_decay=0.1, k=0.5),
    "sgd_ftp": lambda: tj.sgd_ftp(1e-2, momentum=0.9, weight_decay=1e-2),
    "adam_spd": lambda: tj.adam_spd(1e-2, eps=1e-4, weight_decay=0.5),
    "ftp": lambda: tj.ftp(optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)),
    "spd": lambda: tj.spd(optax.adam(1e-2, eps=1e-4), weight_decay=0.5),
}
STEPS = 8


def _problem():
    rng = np.random.default_rng(5)
    params = {
        "w": rng.standard_normal((6, 5)),
        "b": rng.standard_normal((6,)),
        "Dense_0": {"kernel": rng.standard_normal((5, 4))},  # rows on the last axis
        "scale": np.asarray(1.5),
    }
    target = jax.tree.map(lambda p: p + rng.standard_normal(p.shape), params)

    def gradient(params, t):
        grads = jax.tree.map(lambda p, q: (1.0 + 0.1 * t) * (p - q), params, target)
        w = np.array(grads["w"])
        w[1] = 0.0  # a zero row: n = 1e-8, so 1 / n = 1e8, beyond float16
        w[2] *= 1e-6  # a tiny row: its L1 norm is far below float16's 1 / 65504
        kernel = np.array(grads["Dense_0"]["kernel"])
        kernel[:, 0] = 0.0
        return {**grads, "w": w, "Dense_0": {"kernel": kernel}}

    return params, gradient


def _run(tx, dtype):
    params, gradient = _problem()
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    state = tx.init(params)
    dtypes = jax.tree.map(lambda x: x.dtype, state)
    update = jax.jit(tx.update)
    for t in range(STEPS):
        grads = jax.tree.map(lambda g: jnp.asarray(g, dtype), gradient(jax.tree.map(np.asarray, params), t))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert jax.tree.map(lambda x: x.dtype, state) == dtypes  # the state keeps its dtypes
    return params, state


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_16_bit_parameters_stay_finite_and_track_the_float32_run(name, dtype):
    expected, _ = _run(TRANSFORMS[name](), jnp.float32)
    got, state = _run(TRANSFORMS[name](), dtype)
    for leaf in jax.tree.leaves(got):
        assert leaf.dtype == dtype
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    tolerance = 0.02 if dtype == jnp.float16 else 0.06  # a few roundings of values of size ~3
    for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
        reference = expected
        for key in path:
            reference = reference[key.key]
        np.testing.assert_allclose(
            np.asarray(leaf, np.float32), reference, atol=tolerance, err_msg=jax.tree_util.keystr(path)
        )
    projection = getattr(state, "projection", None)
    if projection is not None:  # FTP's statistics stay float32; its c_prev has θ's dtype
        for field in ("radius", "radius_exp_avg", "radius_exp_avg_sq", "prev_inv_norm"):
            assert {x.dtype for x in jax.tree.leaves(getattr(projection, field))} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in jax.tree.leaves(projection.prev_displacement)} == {jnp.dtype(dtype)}
        assert projection.prev_inv_norm["Dense_0"]["kernel"].shape == (1, 4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_injected_hyperparameters_do_not_widen_16_bit_state(dtype):
    """float32 hyperparameter arrays would promote `β·m` to float32 one step at a time."""
    tx = optax.inject_hyperparams(tj.adam_ftp, hyperparam_dtype=jnp.float32)(learning_rate=1e-2, eps=1e-4)
    params = {"w": jnp.ones((4, 3), dtype)}
    state = tx.init(params)
    dtypes = jax.tree.map(lambda x: x.dtype, state)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update({"w": jnp.full((4, 3), 0.5, dtype)}, state, params)
        params = optax.apply_updates(params, updates)
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
    assert state.inner_state.exp_avg["w"].dtype == dtype


ALL = {
    "adam_ftp": lambda: tj.adam_ftp(1e-2, weight_decay=0.1, amsgrad=True),
    "sgd_ftp": lambda: tj.sgd_ftp(1e-2, momentum=0.9),
    "adam_spd": lambda: tj.adam_spd(1e-2, weight_decay=0.5),
    "ftp": lambda: tj.ftp(optax.adam(1e-2)),
    "spd": lambda: tj.spd(optax.adam(1e-2), weight_decay=0.5),
}


@pytest.mark.parametrize("name", list(ALL))
def test_empty_tensors_take_no_step_and_the_others_step_normally(name):
    rng = np.random.default_rng(0)
    full = {"w": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.asarray(rng.standard_normal(3))}
    empty = {"e": jnp.zeros((0, 5)), "v": jnp.zeros((0,)), "m": {"kernel": jnp.zeros((4, 0))}}

    def run(params):
        tx = ALL[name]()
        state = tx.init(params)
        first = state
        update = jax.jit(tx.update)
        for t in range(4):
            grads = jax.tree.map(lambda p, t=t: jnp.cos(p + t), params)
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, updates, first, state

    alone, _, _, _ = run(full)
    params, updates, first, state = run({**full, **empty})
    for n in full:  # the others step as if the empty tensors were not there
        np.testing.assert_array_equal(params[n], alone[n])
    for n in empty:
        for leaf, before in zip(jax.tree.leaves(params[n]), jax.tree.leaves(empty[n]), strict=True):
            assert leaf.shape == before.shape
        for leaf, before in zip(jax.tree.leaves(updates[n]), jax.tree.leaves(empty[n]), strict=True):
            assert leaf.shape == before.shape
    # an empty tensor's state is unchanged: FTP's radius and its moments stay at their initial 0
    for field in getattr(state, "projection", ())[:3]:
        for n in empty:
            for leaf in jax.tree.leaves(field[n]):
                assert float(leaf) == 0.0
        assert float(field["w"]) != 0.0
    shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]  # noqa: E731
    assert shapes(state) == shapes(first)
