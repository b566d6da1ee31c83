"""TPGM for JAX (ALGORITHMS.md §7): against the NumPy reference, batches, jit, state, resume, errors."""

import itertools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tether import core
from tether.adapters import jax as tj
from tether.core.reference import ReferenceTPGM

#: A two-layer tanh network in PyTorch's layout (weight (out, in)), and a 4-d tensor with its rows on axis 0.
SHAPES = {
    "fc.weight": (6, 4),
    "fc.bias": (6,),
    "head.weight": (3, 6),
    "head.bias": (3,),
    "gain": (2, 3, 1, 1),
}


def _weights(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {n: scale * rng.standard_normal(s) for n, s in SHAPES.items()}


def _loss(params, batch):
    x, y = batch
    gain = jnp.sum(params["gain"])
    hidden = jnp.tanh(x @ params["fc.weight"].T + params["fc.bias"]) * gain
    out = hidden @ params["head.weight"].T + params["head.bias"]
    return jnp.mean((out - y) ** 2)


def _batches(n=3, seed=2):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((5, 4)), rng.standard_normal((5, 3))) for _ in range(n)]


def _deltas(calls, seed=3, scale=0.3):
    rng = np.random.default_rng(seed)
    return [{n: scale * rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(calls)]


def _as_jax(named):
    return {n: jnp.asarray(v) for n, v in named.items()}


def _reference_run(norm, lr, iters, calls, constrained):
    """The reference's trajectory: fine-tuning deltas, then one TPGM call, `calls` times."""
    anchors = _weights()
    reference = ReferenceTPGM(anchors, constrained=constrained, norm=norm, lr=lr)
    stream = itertools.cycle(_batches())
    grad = jax.grad(_loss)

    def gradients(params):  # ∂L/∂θ at the weights given, on the next batch of the shared stream
        return {n: np.asarray(g) for n, g in grad(_as_jax(params), next(stream)).items()}

    params, trajectory = dict(anchors), []
    for delta in _deltas(calls):
        params = reference.call({n: v + delta[n] for n, v in params.items()}, gradients, iters)
        trajectory.append((params, dict(reference.constraints)))
    return trajectory


def _run(norm, lr, iters, calls, constrained, **step_kwargs):
    params = _as_jax(_weights())
    state = tj.tpgm_init(params, norm=norm, mask={n: n in constrained for n in params})
    stream = itertools.cycle(_batches())
    trajectory = []
    for delta in _deltas(calls):
        params = {n: v + delta[n] for n, v in params.items()}
        params, state = tj.tpgm_step(_loss, params, state, stream, lr=lr, iters=iters, **step_kwargs)
        trajectory.append((params, state))
    return trajectory


@pytest.mark.parametrize("norm", ["mars", "l2"])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_calls_follow_the_numpy_reference_in_float64(norm, iters):
    constrained = ["fc.weight", "fc.bias", "head.weight", "gain"]  # head.bias is excluded by the mask
    expected = _reference_run(norm, 0.05, iters, 4, constrained)
    got = _run(norm, 0.05, iters, 4, constrained)
    for call, ((params, state), (ref_params, ref_constraints)) in enumerate(zip(got, expected)):
        for n in SHAPES:
            np.testing.assert_allclose(
                params[n], ref_params[n], rtol=1e-12, atol=1e-13, err_msg=f"{call} {n}"
            )
        for n in constrained:
            np.testing.assert_allclose(state.constraint[n], ref_constraints[n], rtol=1e-12, err_msg=n)
        assert int(state.count) == iters * (call + 1) and int(state.calls) == call + 1
    assert isinstance(state.constraint["head.bias"], optax.MaskedNode)


def test_the_first_call_sets_half_the_smallest_norm_and_iters_zero_only_projects():
    anchors = _as_jax(_weights())
    state = tj.tpgm_init(anchors, norm="mars")
    delta = _deltas(1)[0]
    params = {n: v + delta[n] for n, v in anchors.items()}
    projected, state = tj.tpgm_step(_loss, params, state, None, iters=0)
    assert int(state.count) == 0 and int(state.calls) == 1
    for n in SHAPES:
        c = np.asarray(params[n] - anchors[n])
        norm = np.asarray(core.mars_norm(c))
        gamma = norm.min() / 2
        assert float(state.constraint[n]) == pytest.approx(gamma, rel=1e-15)
        expected = np.asarray(anchors[n]) + np.clip(gamma / (norm + 1e-8), 0, 1) * c
        np.testing.assert_allclose(projected[n], expected, rtol=1e-14, atol=1e-15)
    # a later call keeps the constraint (every row is now on the ball, of norm ≈ γ: set again, it
    # would be γ/2); projecting again moves the weights by the 1e-8 of the denominator only
    again, state2 = tj.tpgm_step(_loss, projected, state, None, iters=0)
    for n in SHAPES:
        np.testing.assert_allclose(again[n], projected[n], rtol=1e-6)
        assert float(state2.constraint[n]) == pytest.approx(float(state.constraint[n]), rel=1e-6)


def test_a_flax_kernel_has_its_rows_on_the_last_axis():
    """`{"kernel": (in, out)}` gives the PyTorch-layout reference transposed (the default row axis)."""
    constrained = list(SHAPES)
    expected = _reference_run("mars", 0.05, 2, 3, constrained)
    torch_params = _weights()
    flax = {
        "fc": {"kernel": jnp.asarray(torch_params["fc.weight"].T), "bias": jnp.asarray(torch_params["fc.bias"])},
        "head": {"kernel": jnp.asarray(torch_params["head.weight"].T), "bias": jnp.asarray(torch_params["head.bias"])},
        "gain": jnp.asarray(torch_params["gain"]),
    }  # fmt: skip

    def to_torch(p):
        return {
            "fc.weight": p["fc"]["kernel"].T, "fc.bias": p["fc"]["bias"],
            "head.weight": p["head"]["kernel"].T, "head.bias": p["head"]["bias"], "gain": p["gain"],
        }  # fmt: skip

    state = tj.tpgm_init(flax)
    assert int(state.row_axis["fc"]["kernel"]) == 1 and int(state.row_axis["gain"]) == 0
    stream = itertools.cycle(_batches())
    for delta, (ref_params, _) in zip(_deltas(3), expected):
        flax = jax.tree.map(lambda v, d: v + d, flax, to_flax_delta(delta))
        flax, state = tj.tpgm_step(lambda p, b: _loss(to_torch(p), b), flax, state, stream, lr=0.05, iters=2)
        for n, v in to_torch(flax).items():
            np.testing.assert_allclose(v, ref_params[n], rtol=1e-12, atol=1e-13, err_msg=n)


def to_flax_delta(delta):
    return {
        "fc": {"kernel": delta["fc.weight"].T, "bias": delta["fc.bias"]},
        "head": {"kernel": delta["head.weight"].T, "bias": delta["head.bias"]},
        "gain": delta["gain"],
    }


def test_unconstrained_leaves_are_returned_as_given_and_the_loss_sees_the_projected_weights():
    params = _as_jax(_weights())
    state = tj.tpgm_init(params, mask={n: n != "head.bias" for n in params})
    moved = {n: v + d for (n, v), d in zip(params.items(), _deltas(1)[0].values())}
    seen = []

    def loss_fn(p, batch):
        seen.append(p)
        return _loss(p, batch)

    out, state = tj.tpgm_step(loss_fn, moved, state, iter(_batches()), iters=1, jit=False)
    assert out["head.bias"] is moved["head.bias"]
    assert seen[0]["head.bias"] is moved["head.bias"]
    assert not np.array_equal(seen[0]["fc.weight"], moved["fc.weight"])  # θ_p, not θ
    assert jax.tree.structure(out) == jax.tree.structure(moved)


def test_batches_are_drawn_one_per_update_from_the_iterator_given():
    params = _as_jax(_weights())
    state = tj.tpgm_init(params)
    batches = _batches(n=5)
    order = []

    def loss_fn(p, batch):
        order.append(int(batch[2]))  # the batch's index, a static value: seen while tracing only
        return _loss(p, batch[:2])

    stream = iter([(*b, i) for i, b in enumerate(batches)])
    params, state = tj.tpgm_step(loss_fn, params, state, stream, iters=2, jit=False)
    params, state = tj.tpgm_step(loss_fn, params, state, stream, iters=np.int64(3), jit=False)
    assert order == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ran out after 0 of 1"):
        tj.tpgm_step(loss_fn, params, state, stream, iters=1, jit=False)
    with pytest.raises(TypeError, match=r"iterator.*itertools\.cycle"):
        tj.tpgm_step(_loss, params, state, batches, iters=1)
    tj.tpgm_step(_loss, params, state, None, iters=0)  # no batch is drawn


def test_the_projection_update_is_compiled_once_across_calls_and_equals_the_eager_run():
    traces = []

    def loss_fn(p, batch):
        traces.append(1)  # runs when jax traces the loss, not when the compiled update runs
        return _loss(p, batch)

    params = _as_jax(_weights())
    state = tj.tpgm_init(params, norm="l2")
    stream = itertools.cycle(_batches())
    for delta in _deltas(3):
        params = {n: v + delta[n] for n, v in params.items()}
        params, state = tj.tpgm_step(loss_fn, params, state, stream, lr=0.05, iters=2)
    assert len(traces) == 1
    eager = _run("l2", 0.05, 2, 3, list(SHAPES), jit=False)[-1]
    for n in SHAPES:
        np.testing.assert_allclose(params[n], eager[0][n], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(state.constraint[n], eager[1].constraint[n], rtol=1e-14)


def test_the_state_passes_through_jit_and_tpgm_step_says_it_runs_outside():
    params = _as_jax(_weights())
    jitted = jax.jit(tj.tpgm_init)(params)  # norm and row axes are arrays: the state is jit-friendly
    stream = itertools.cycle(_batches())
    got, _ = tj.tpgm_step(_loss, params, jax.jit(lambda s: s)(jitted), stream, iters=1)
    expected, _ = tj.tpgm_step(_loss, params, tj.tpgm_init(params), itertools.cycle(_batches()), iters=1)
    for n in SHAPES:
        np.testing.assert_array_equal(got[n], expected[n])
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(lambda p, s: tj.tpgm_step(_loss, p, s, None, iters=0))(params, jitted)


@pytest.mark.parametrize("serialize", ["pickle", "flax"])
def test_resume_continues_bit_for_bit(serialize):
    stream_batches = _batches(n=4)

    def calls(params, state, stream, deltas):
        for delta in deltas:
            params = {n: v + delta[n] for n, v in params.items()}
            params, state = tj.tpgm_step(_loss, params, state, stream, lr=0.05, iters=2)
        return params, state

    deltas = _deltas(5)
    start = _as_jax(_weights())
    mask = {n: n != "fc.bias" for n in start}
    straight, _ = calls(start, tj.tpgm_init(start, mask=mask), itertools.cycle(stream_batches), deltas)

    stream = itertools.cycle(stream_batches)
    params, state = calls(start, tj.tpgm_init(start, mask=mask), stream, deltas[:3])
    if serialize == "flax":
        serialization = pytest.importorskip("flax.serialization")
        blob = serialization.to_bytes(state)
        target = tj.tpgm_init(jax.tree.map(jnp.zeros_like, start), mask=mask, norm="l2")  # shapes only
        restored = serialization.from_bytes(target, blob)
    else:
        leaves = pickle.loads(pickle.dumps([np.asarray(x) for x in jax.tree.leaves(state)]))
        restored = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(x) for x in leaves])
    assert int(restored.norm) == 0  # the norm travels with the state
    resumed, _ = calls(params, restored, stream, deltas[3:])
    for n in straight:
        np.testing.assert_array_equal(resumed[n], straight[n])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_parameters_keep_their_dtype_and_constraints_are_at_least_float32(dtype):
    params = {n: v.astype(dtype) for n, v in _as_jax(_weights()).items()}
    state = tj.tpgm_init(params)
    moved = {n: (v + 0.3).astype(dtype) for n, v in params.items()}
    batches = itertools.cycle([tuple(jnp.asarray(a, dtype) for a in b) for b in _batches()])
    out, state = tj.tpgm_step(_loss, moved, state, batches, iters=2)
    for n in SHAPES:
        assert out[n].dtype == dtype and state.anchor[n].dtype == dtype
        assert (
            state.constraint[n].dtype == jnp.float32 and state.constraint_exp_avg_sq[n].dtype == jnp.float32
        )
        assert bool(jnp.all(jnp.isfinite(out[n].astype(jnp.float32))))


def test_an_empty_tensor_and_a_tensor_that_did_not_move_are_left_as_they_are():
    params = {"w": jnp.ones((3, 2)), "empty": jnp.zeros((0, 4)), "still": jnp.full((2, 2), 0.5)}
    state = tj.tpgm_init(params)
    moved = {
        "w": params["w"] + jnp.arange(6.0).reshape(3, 2),
        "empty": params["empty"],
        "still": params["still"],
    }

    def loss_fn(p, batch):
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["still"] ** 3) + jnp.sum(p["empty"])

    out, state = tj.tpgm_step(loss_fn, moved, state, itertools.repeat(None), iters=2)
    assert out["empty"].shape == (0, 4)
    np.testing.assert_array_equal(out["still"], params["still"])
    assert bool(jnp.all(jnp.isfinite(state.constraint["still"]))) and float(state.constraint["empty"]) == 0.0
    assert not np.array_equal(out["w"], moved["w"])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: tj.tpgm_init(p, norm="linf"), ValueError, "norm must be one of"),
        (lambda p: tj.tpgm_init(p, norm=None), ValueError, "norm must be one of"),
        (lambda p: tj.tpgm_init(p, mask={n: False for n in p}), ValueError, "no tensor to constrain.*mask"),
        (lambda p: tj.tpgm_init({}), ValueError, "no tensor to constrain"),
        (lambda p: tj.tpgm_init(None), ValueError, "`params` is required"),
        (lambda p: tj.tpgm_init({**p, "steps": jnp.zeros(2, jnp.int32)}), TypeError, r"\['steps'\].*int32"),
        (lambda p: tj.tpgm_init(p, mask={"fc.weight": True}), ValueError, "mask"),
        (lambda p: tj.tpgm_init(p, row_axis={n: 3 for n in p}), ValueError, "row_axis 3 of"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, lr=-1.0, iters=0), ValueError, "lr"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, lr=float("nan"), iters=0), ValueError, "lr"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, lr=float("inf"), iters=0), ValueError, "lr"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, iters=-1), ValueError, "iters"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, iters=True), ValueError, "iters"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, iters=1.0), ValueError, "iters"),
        (lambda p: tj.tpgm_step("loss", p, tj.tpgm_init(p), None, iters=0), TypeError, "loss_fn"),
        (lambda p: tj.tpgm_step(_loss, p, tj.tpgm_init(p), None, iters=0, jit=1), TypeError, "jit"),
    ],
)
def test_bad_arguments_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_as_jax(_weights()))


def _broken(state, **fields):
    return state._replace(**{k: v(getattr(state, k)) for k, v in fields.items()})


@pytest.mark.parametrize(
    ("make_state", "error", "match"),
    [
        (lambda p: tj.adam_ftp(1e-3).init(p), TypeError, "TPGMState"),
        (lambda p: tj.tpgm_init({**p, "fc.weight": jnp.zeros((4, 6))}), ValueError, r"state\.anchor of \['fc\.weight'\] has shape"),
        (lambda p: tj.tpgm_init({n: v.astype(jnp.float32) for n, v in p.items()}), ValueError, r"\['fc\.bias'\] has dtype float32"),
        (lambda p: tj.tpgm_init({k: v for k, v in p.items() if k != "gain"}), ValueError, "tree structure"),
        (lambda p: _broken(tj.tpgm_init(p), constraint=lambda t: {**t, "fc.bias": jnp.zeros(2)}), ValueError, r"state\.constraint of \['fc\.bias'\] has shape"),
        (lambda p: _broken(tj.tpgm_init(p), constraint_exp_avg=lambda t: {**t, "gain": jnp.zeros((), jnp.float32)}), ValueError, r"constraint_exp_avg of \['gain'\] has dtype float32"),
        (lambda p: _broken(tj.tpgm_init(p), count=lambda c: c.astype(jnp.float32)), ValueError, r"state\.count"),
        (lambda p: _broken(tj.tpgm_init(p), norm=lambda c: c + 7), ValueError, r"state\.norm is 7"),
        (lambda p: _broken(tj.tpgm_init(p), row_axis=lambda t: {**t, "fc.weight": jnp.asarray(2, jnp.int32)}), ValueError, r"row_axis of \['fc\.weight'\] is 2"),
    ],
)  # fmt: skip
def test_a_state_that_does_not_fit_the_parameters_names_the_tensor(make_state, error, match):
    params = _as_jax(_weights())
    with pytest.raises(error, match=match):
        tj.tpgm_step(_loss, params, make_state(params), None, iters=0)
