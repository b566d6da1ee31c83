"""TPGM, its callback and WiSE-FT for Keras, against `tether.core.reference.ReferenceTPGM` in float64.

The model is `keras_helpers.mlp` with a ReLU (``Linear`` layers: a float64 forward pass on
every backend, kernels ``(in, out)``) and the loss `keras_helpers.exact_mse`; the reference runs
in PyTorch's layout (kernels transposed), with the hand-written gradient of the mean squared
error, so a kernel's MARS rows must be its last axis.
"""

import itertools
from typing import ClassVar

import keras
import numpy as np
import pytest
from keras_helpers import Linear, exact_mse, mlp, numpy, weights

from tether import core
from tether.adapters import keras as tk
from tether.core.reference import ReferenceTPGM

BACKEND = keras.backend.backend()
TOL = 1e-12
LAYERS = ("body", "head")


def torch_layout(model):
    """The model's weights by PyTorch name (``body.weight`` is the transposed kernel)."""
    out = {}
    for layer in LAYERS:
        built = model.get_layer(layer)
        out[f"{layer}.weight"] = numpy(built.kernel).T
        out[f"{layer}.bias"] = numpy(built.bias)
    return out


def batches(count, *, seed=1, size=8, inputs=4, outputs=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, inputs)), rng.standard_normal((size, outputs))) for _ in range(count)]


def gradients_from(sequence):
    """``gradients(params)`` for `ReferenceTPGM`: the MSE gradient on the next batch of ``sequence``."""
    queue = iter(sequence)

    def gradients(p):
        x, y = next(queue)
        hidden = np.maximum(x @ p["body.weight"].T + p["body.bias"], 0.0)
        out = hidden @ p["head.weight"].T + p["head.bias"]
        d_out = 2.0 * (out - y) / out.size
        d_hidden = (d_out @ p["head.weight"]) * (hidden > 0)
        return {
            "body.weight": d_hidden.T @ x,
            "body.bias": d_hidden.sum(axis=0),
            "head.weight": d_out.T @ hidden,
            "head.bias": d_out.sum(axis=0),
        }

    return gradients


def fine_tune(model, rng, scale=0.1):
    """A fixed random move of every weight (what the optimizer would do between two TPGM calls)."""
    for variable in model.trainable_variables:
        variable.assign(variable + scale * rng.standard_normal(variable.shape))


def model_for_tpgm(seed=0, **kwargs):
    return mlp(inputs=4, hidden=5, outputs=3, seed=seed, activation="relu", **kwargs)


def replay(
    norm, lr, iters, *, exclude=None, constrained=None, calls=3, data=None, model=None, seed=0, loss=exact_mse
):
    """TPGM and the reference side by side over ``calls`` calls; the worst deviation of the weights."""
    model = model if model is not None else model_for_tpgm(seed)
    data = data if data is not None else batches(2)
    tpgm = tk.TPGM(model, norm=norm, learning_rate=lr, exclude=exclude)
    names = constrained if constrained is not None else list(torch_layout(model))
    reference = ReferenceTPGM(torch_layout(model), constrained=names, norm=norm, lr=lr)
    cycled = itertools.cycle(data)
    gradients = gradients_from(cycled)
    rng = np.random.default_rng(seed + 100)
    worst = 0.0
    for _ in range(calls):
        fine_tune(model, rng)
        expected = reference.call(torch_layout(model), gradients, iters)
        tpgm.step(data, iters=iters, loss=loss)
        got = torch_layout(model)
        worst = max(worst, max(float(np.max(np.abs(got[n] - expected[n]))) for n in got))
        for n, gamma in zip(names, tpgm.constraints, strict=True):
            np.testing.assert_allclose(numpy(gamma), reference.constraints[n], rtol=0, atol=TOL)
    return worst, tpgm


@pytest.mark.parametrize("norm", ["mars", "l2"])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_follows_the_reference(float64, norm, iters):
    worst, tpgm = replay(norm, 0.01, iters)
    assert worst < TOL
    assert tpgm.steps == 3 * iters


@pytest.mark.parametrize("norm", ["mars", "l2"])
def test_keras_s_own_dense_and_mean_squared_error_are_evaluated_in_float64(float64, norm):
    """Keras 3.15 computes them in float32 on torch and JAX (keras-team/keras#23704); TPGM does not.

    Keras's own promotion is back once the call returns.
    """
    promoted = keras.backend.result_type("float64", "float64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="relu", name="body"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(0.5 * rng.standard_normal(variable.shape))
    worst, _ = replay(norm, 0.01, 3, model=model, loss=keras.losses.MeanSquaredError())
    assert worst < TOL
    assert keras.backend.result_type("float64", "float64") == promoted


def test_a_kernel_s_rows_are_its_last_axis(float64):
    """The reference is in PyTorch's layout: the MARS test above passes only with these axes."""
    tpgm = tk.TPGM(model_for_tpgm())
    assert tpgm.row_axes == [1, 0, 1, 0]
    assert tk.TPGM(model_for_tpgm(), row_axis=0).row_axes == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="row_axis"):
        tk.TPGM(model_for_tpgm(), row_axis=2)


@pytest.mark.parametrize(
    "exclude",
    [
        "head",
        ["head"],
        lambda model: model.get_layer("head").trainable_weights,
        lambda model: [model.get_layer("head").kernel, "head/bias"],
    ],
)
def test_excluded_variables_have_no_constraint(float64, exclude):
    model = model_for_tpgm()
    exclude = exclude(model) if callable(exclude) else exclude
    worst, tpgm = replay(
        "mars", 0.02, 2, exclude=exclude, constrained=["body.weight", "body.bias"], model=model
    )
    assert worst < TOL
    assert len(tpgm.constraints) == 2 and all("body" in p for p in tpgm.paths)


def test_an_excluded_variable_is_not_projected(float64):
    model = model_for_tpgm()
    tpgm = tk.TPGM(model, exclude="head/kernel")
    fine_tune(model, np.random.default_rng(0), scale=1.0)
    moved = numpy(model.get_layer("head").kernel)
    tpgm.step(batches(1), iters=0)
    np.testing.assert_array_equal(numpy(model.get_layer("head").kernel), moved)


def test_the_first_call_sets_each_constraint_to_half_the_smallest_norm(float64):
    model = model_for_tpgm()
    anchors = weights(model)
    tpgm = tk.TPGM(model, norm="mars")
    fine_tune(model, np.random.default_rng(3))
    moved = weights(model)
    tpgm.step(batches(1), iters=0)
    assert tpgm.steps == 0
    for variable, anchor, value, gamma, axis in zip(
        model.trainable_variables, anchors, moved, tpgm.constraints, tpgm.row_axes, strict=True
    ):
        c = value - anchor
        n = (
            np.abs(c).sum(axis=0 if axis == 1 else 1, keepdims=True)
            if c.ndim == 2
            else np.abs(c).sum(keepdims=True)
        )
        expected = np.clip(n.min() / 2, 1e-8, n.max())
        np.testing.assert_allclose(numpy(gamma), expected, rtol=1e-15)
        np.testing.assert_allclose(
            numpy(variable), anchor + np.clip(expected / (n + 1e-8), 0, 1) * c, atol=TOL
        )


@keras.saving.register_keras_serializable(package="tether_tests")
class Recorder(keras.layers.Layer):
    """Identity that records the ``training`` flag it is called with (training unless told otherwise)."""

    seen: ClassVar[list] = []

    def call(self, x, training=True):
        Recorder.seen.append(training)
        return x


def test_the_model_is_evaluated_in_inference_mode(float64):
    """``training=False``: the dropout is off (the reference has none) and every layer is told so."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            Linear(5, activation="relu", name="body"),
            keras.layers.Dropout(0.5),
            Recorder(),
            Linear(3, name="head"),
        ]
    )
    for variable, value in zip(model.weights, weights(model_for_tpgm()), strict=True):
        variable.assign(value)
    Recorder.seen.clear()
    worst, _ = replay("l2", 0.01, 2, model=model, calls=1)
    assert worst < TOL
    assert Recorder.seen and all(flag is False for flag in Recorder.seen)


def test_the_batches_are_one_iterator_across_calls(float64):
    """Three batches, two updates a call: b0 b1 | b2 b0 | b1 b2; another object starts from its first."""
    model = model_for_tpgm()
    data, other = batches(3, seed=1), batches(1, seed=2)
    tpgm = tk.TPGM(model, norm="mars", learning_rate=0.05)
    reference = ReferenceTPGM(
        torch_layout(model), constrained=list(torch_layout(model)), norm="mars", lr=0.05
    )
    order = [data[0], data[1], data[2], data[0], data[1], data[2], other[0], other[0]]
    gradients = gradients_from(order)
    rng = np.random.default_rng(5)
    for source in (data, data, data, other):
        fine_tune(model, rng)
        expected = reference.call(torch_layout(model), gradients, 2)
        tpgm.step(source, iters=2, loss=exact_mse)
        got = torch_layout(model)
        for n in got:
            np.testing.assert_allclose(got[n], expected[n], rtol=0, atol=TOL)


def test_a_one_shot_generator_that_runs_out_raises_and_changes_nothing(float64):
    model = model_for_tpgm()
    tpgm = tk.TPGM(model)
    fine_tune(model, np.random.default_rng(0))
    before = weights(model)
    with pytest.raises(ValueError, match="cannot be restarted"):
        tpgm.step((b for b in batches(1)), iters=2, loss="mse")
    assert tpgm.constraints is None and tpgm.steps == 0
    for a, b in zip(before, weights(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_compiled_loss_is_the_default(float64):
    results = []
    for compiled in (True, False):
        model = model_for_tpgm()
        if compiled:
            model.compile(optimizer="sgd", loss="mse")
        tpgm = tk.TPGM(model)
        fine_tune(model, np.random.default_rng(0))
        tpgm.step(batches(2), iters=2, loss=None if compiled else keras.losses.MeanSquaredError())
        results.append(weights(model))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sample_weights_and_loss_functions(float64):
    """``(x, y, sample_weight)`` batches; a function's values are averaged, a Loss reduces itself."""
    ((x, y),) = batches(1)
    weight = np.linspace(0.5, 1.5, len(x))
    results = []
    for loss in (keras.losses.MeanSquaredError(), keras.losses.mean_squared_error):
        model = model_for_tpgm()
        tpgm = tk.TPGM(model)
        fine_tune(model, np.random.default_rng(0))
        value = tpgm.step([(x, y, weight)], iters=1, loss=loss)
        results.append((float(numpy(value)), weights(model)))
    tol = 1e-14
    assert results[0][0] == pytest.approx(results[1][0], rel=tol)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    model = model_for_tpgm()
    tpgm = tk.TPGM(model)
    fine_tune(model, np.random.default_rng(0))
    unweighted = tpgm.step([(x, y)], iters=1, loss=keras.losses.MeanSquaredError())
    assert abs(float(numpy(unweighted)) - results[0][0]) > 1e-3


def test_resume_continues_exactly(float64, tmp_path):
    """``get_state`` through ``np.savez`` into a new TPGM on the reloaded weights, then two more calls."""
    data = batches(2)
    deltas = np.random.default_rng(9)
    moves = [
        [0.1 * deltas.standard_normal(v.shape) for v in model_for_tpgm().trainable_variables]
        for _ in range(4)
    ]

    def calls(model, tpgm, which):
        for i in which:
            for variable, move in zip(model.trainable_variables, moves[i], strict=True):
                variable.assign(variable + move)
            tpgm.step(data, iters=2, loss="mse")

    straight = model_for_tpgm()
    tpgm = tk.TPGM(straight, norm="mars", learning_rate=0.05, exclude="head/bias")
    calls(straight, tpgm, range(4))

    first = model_for_tpgm()
    tpgm_first = tk.TPGM(first, norm="mars", learning_rate=0.05, exclude="head/bias")
    calls(first, tpgm_first, range(2))
    path = tmp_path / "tpgm.npz"
    np.savez(path, **tpgm_first.get_state())
    saved = first.get_weights()

    resumed = model_for_tpgm(seed=1)  # other weights: the anchors must come from the state
    resumed.set_weights(saved)
    tpgm_resumed = tk.TPGM(resumed, norm="l2", learning_rate=1.0, exclude="head/bias")
    with np.load(path) as state:
        tpgm_resumed.set_state(dict(state))
    assert (tpgm_resumed.norm, tpgm_resumed.learning_rate, tpgm_resumed.steps) == ("mars", 0.05, 4)
    calls(resumed, tpgm_resumed, range(2, 4))
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tpgm.constraints, tpgm_resumed.constraints, strict=True):
        np.testing.assert_array_equal(numpy(a), numpy(b))


def test_state_before_the_first_call(float64):
    model = model_for_tpgm()
    state = tk.TPGM(model).get_state()
    assert not any(k.startswith("constraint") for k in state)
    fine_tune(model, np.random.default_rng(0))
    tpgm = tk.TPGM(model)
    tpgm.set_state(state)
    tpgm.step(batches(1), iters=0)
    np.testing.assert_array_equal(numpy(tpgm.anchors[0]), state["anchor/0"])


def test_set_state_checks_before_changing_anything(float64):
    model = model_for_tpgm()
    tpgm = tk.TPGM(model)
    tpgm.step(batches(1), iters=1, loss="mse")
    state = tpgm.get_state()
    wrong_shape = {**state, "anchor/0": np.zeros((2, 2))}
    missing = {k: v for k, v in state.items() if k != "exp_avg/1"}
    with pytest.raises(ValueError, match="anchor"):
        tpgm.set_state(wrong_shape)
    with pytest.raises(ValueError, match="exp_avg"):
        tpgm.set_state(missing)
    with pytest.raises(ValueError, match="TPGM"):
        tpgm.set_state({**state, "method": np.asarray("FTP")})
    with pytest.raises(ValueError, match="constrains"):
        tk.TPGM(model, exclude="head").set_state(state)
    assert tpgm.get_state().keys() == state.keys()
    for key, value in tpgm.get_state().items():
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit is JAX's")
def test_one_compilation_across_calls(float64):
    model = model_for_tpgm()
    tpgm = tk.TPGM(model)
    loss = keras.losses.MeanSquaredError()
    rng = np.random.default_rng(0)
    for _ in range(3):
        fine_tune(model, rng)
        tpgm.step(batches(2), iters=2, loss=loss)
    assert tpgm._compiled[2]._cache_size() == 1


def test_constraints_are_at_least_float32():
    model = model_for_tpgm(dtype="float16")
    tpgm = tk.TPGM(model)
    fine_tune(model, np.random.default_rng(0))
    tpgm.step([(x.astype("float16"), y.astype("float16")) for x, y in batches(1)], iters=2, loss="mse")
    assert all(keras.backend.standardize_dtype(g.dtype) == "float32" for g in tpgm.constraints)
    assert all(keras.backend.standardize_dtype(v.dtype) == "float16" for v in model.weights)
    assert all(np.all(np.isfinite(w)) for w in weights(model))


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(norm="l1"), ValueError, "norm"),
        (dict(learning_rate=-0.1), ValueError, "learning_rate"),
        (dict(learning_rate=float("nan")), ValueError, "learning_rate"),
        (dict(learning_rate=float("inf")), ValueError, "learning_rate"),
        (dict(learning_rate="0.1"), ValueError, "learning_rate"),
        (dict(exclude="nothing_is_called_this"), ValueError, "nothing_is_called_this"),
        (dict(exclude=[3]), TypeError, "exclude"),
        (dict(exclude=keras.Variable(np.ones(2), name="stranger")), ValueError, "stranger"),
        (dict(exclude=["body", "head"]), ValueError, "no trainable variable"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.TPGM(model_for_tpgm(), **kwargs)


def test_models_it_cannot_constrain():
    frozen = model_for_tpgm()
    frozen.trainable = False
    with pytest.raises(ValueError, match="no trainable variable"):
        tk.TPGM(frozen)
    with pytest.raises(ValueError, match="build the model"):
        tk.TPGM(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match=r"keras\.Model"):
        tk.TPGM("model")


@pytest.mark.parametrize("iters", [-1, 1.5, True, "2"])
def test_iters_must_be_a_count(iters):
    tpgm = tk.TPGM(model_for_tpgm())
    with pytest.raises(ValueError, match="iters"):
        tpgm.step(batches(1), iters=iters, loss="mse")


def test_a_loss_is_needed_to_learn_but_not_to_project():
    model = model_for_tpgm()
    tpgm = tk.TPGM(model)
    with pytest.raises(ValueError, match="loss"):
        tpgm.step(batches(1), iters=1)
    assert tpgm.constraints is None
    tpgm.step(batches(1), iters=0)
    assert tpgm.constraints is not None


# -- the callback --------------------------------------------------------------------------------------


def training_data(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)), rng.standard_normal((n, 3))


def test_the_callback_calls_tpgm_every_f_optimizer_steps(float64):
    """As a manual loop that calls TPGM after every third batch; the count continues in a second ``fit``.

    On JAX the trainer keeps the weights in its own state during ``fit``: the projection must reach
    the next step (the callback syncs the state before TPGM reads it).
    """
    x, y = training_data()
    val = batches(2, seed=4)

    fitted = model_for_tpgm()
    fitted.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    tpgm = tk.TPGM(fitted, learning_rate=0.05)
    callback = tk.TPGMCallback(tpgm, val, every=3, iters=2)
    fitted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert (callback.calls, tpgm.steps) == (3, 6)  # after batches 3, 6, 9 of 10

    manual = model_for_tpgm()
    manual.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    tpgm_manual = tk.TPGM(manual, learning_rate=0.05)
    for i in range(10):
        manual.train_on_batch(x[(i % 5) * 8 : (i % 5) * 8 + 8], y[(i % 5) * 8 : (i % 5) * 8 + 8])
        if (i + 1) % 3 == 0:
            tpgm_manual.step(val, iters=2)
    for a, b in zip(weights(fitted), weights(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)

    fitted.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    assert callback.calls == 5  # after batches 12 and 15


def test_the_callback_s_arguments():
    tpgm = tk.TPGM(model_for_tpgm())
    with pytest.raises(ValueError, match="every"):
        tk.TPGMCallback(tpgm, batches(1), every=0)
    with pytest.raises(ValueError, match="iters"):
        tk.TPGMCallback(tpgm, batches(1), iters=-1)
    with pytest.raises(TypeError, match="TPGM"):
        tk.TPGMCallback("tpgm", batches(1))


# -- WiSE-FT -------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="tether_tests")
class Counter(keras.layers.Layer):
    """An identity with an integer weight (a step count, say)."""

    def build(self, input_shape):
        self.count = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False, name="count"
        )

    def call(self, x):
        return x


def wise_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            Linear(5, name="body"),
            keras.layers.BatchNormalization(name="norm"),
            Counter(name="counter"),
            Linear(3, name="head"),
        ]
    )


def test_wise_ft_mixes_every_floating_weight(float64):
    model = wise_model()
    anchor = model.get_weights()
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "count" in variable.path:
            variable.assign(7)
        else:  # the moving statistics too
            variable.assign(variable + rng.standard_normal(variable.shape))
    finetuned = model.get_weights()
    for alpha in (0.0, 0.3, 1.0):
        mixed = tk.wise_ft(model, anchor, alpha)
        for path, a, f, m in zip([w.path for w in model.weights], anchor, finetuned, mixed, strict=True):
            assert m.dtype == f.dtype
            if "count" in path:
                assert m == 7
            else:
                np.testing.assert_array_equal(m, (1 - alpha) * a + alpha * f)
    for a, b in zip(finetuned, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the model is left alone
    model.set_weights(tk.wise_ft(model, anchor, 0.0))
    for path, a, b in zip([w.path for w in model.weights], anchor, model.get_weights(), strict=True):
        np.testing.assert_array_equal(b, 7 if "count" in path else a)


def test_wise_ft_computes_16_bit_weights_in_float32():
    model = mlp(dtype="bfloat16")
    anchor = model.get_weights()
    for variable in model.weights:
        variable.assign(variable * 1.01 + 0.003)
    mixed = tk.wise_ft(model, anchor, 0.37)
    for a, f, m in zip(anchor, model.get_weights(), mixed, strict=True):
        assert m.dtype == f.dtype
        expected = core.wise_ft(a.astype(np.float32), f.astype(np.float32), 0.37).astype(f.dtype)
        np.testing.assert_array_equal(m, expected)


def test_wise_ft_errors():
    model = wise_model()
    anchor = model.get_weights()
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            tk.wise_ft(model, anchor, alpha)
    with pytest.raises(ValueError, match="weights"):
        tk.wise_ft(model, anchor[:-1], 0.5)
    with pytest.raises(ValueError, match="body/kernel"):
        tk.wise_ft(model, [np.zeros((2, 2)), *anchor[1:]], 0.5)
