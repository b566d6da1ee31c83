"""``model.compile(optimizer=...)`` then ``fit`` on the current backend: jit, saving, mixed precision."""

import warnings

import keras
import numpy as np
import pytest

from tether.adapters import keras as tk

BACKEND = keras.backend.backend()
JIT = [False, True] if BACKEND in ("tensorflow", "jax") else [False]


def make_optimizer(name, **kwargs):
    if name == "AdamFTP":
        return tk.AdamFTP(learning_rate=0.01, weight_decay=1e-4, **kwargs)
    if name == "SGDFTP":
        return tk.SGDFTP(learning_rate=0.05, momentum=0.9, **kwargs)
    return tk.AdamSPD(learning_rate=0.01, weight_decay=0.5, **kwargs)


NAMES = ["AdamFTP", "SGDFTP", "AdamSPD"]


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((n, 2))).astype("float32")
    return x, y


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="body"),
            keras.layers.Dense(2, name="head"),
        ],
        name="net",
    )


def weights(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("name", NAMES)
def test_fit_trains_and_anchors_at_first_fit(name, jit):
    x, y = data()
    model = make_model()
    start = weights(model)
    optimizer = make_optimizer(name)
    optimizer.exclude_from_anchor(var_names=["head"])
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    # the anchors are the weights as they were when fit started (TF builds inside the traced step)
    for variable, initial in zip(model.trainable_variables, start):
        anchor = optimizer._anchors[optimizer._get_variable_index(variable)]
        if "head" in variable.path:
            assert anchor is None
        else:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(anchor), initial)
    steps = [int(keras.ops.convert_to_numpy(s)) for s in optimizer._steps]
    assert steps == [12] * 4


@pytest.mark.parametrize("name", NAMES)
def test_save_load_then_continue_equals_uninterrupted(tmp_path, name):
    x, y = data()
    fit = dict(batch_size=16, shuffle=False, verbose=0)

    straight = make_model()
    optimizer = make_optimizer(name, clipnorm=1.0)
    optimizer.exclude_from_anchor(var_list=straight.get_layer("head").trainable_weights)
    straight.compile(optimizer=optimizer, loss="mse")
    straight.fit(x, y, epochs=2, **fit)

    first = make_model()
    optimizer = make_optimizer(name, clipnorm=1.0)
    optimizer.exclude_from_anchor(var_list=first.get_layer("head").trainable_weights)
    first.compile(optimizer=optimizer, loss="mse")
    first.fit(x, y, epochs=1, **fit)
    path = tmp_path / "m.keras"
    first.save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Ss]kipping variable loading.*")
        resumed = keras.saving.load_model(path)
    assert type(resumed.optimizer) is type(optimizer)
    assert resumed.optimizer.get_config() == optimizer.get_config()
    saved = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
    loaded = [keras.ops.convert_to_numpy(v) for v in resumed.optimizer.variables]
    assert len(saved) == len(loaded)
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(a, b)
    resumed.fit(x, y, epochs=1, **fit)
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_mixed_precision_with_loss_scale_optimizer(mixed_float16):
    x, y = data()
    model = make_model()
    model.compile(optimizer=make_optimizer("AdamFTP"), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    inner = model.optimizer.inner_optimizer
    assert all(v.dtype in ("float32", "int32", "int64") for v in inner.variables)


def test_base_optimizer_features():
    """EMA, global clipping, loss scaling and gradient accumulation run through the base class."""
    x, y = data()
    model = make_model()
    optimizer = make_optimizer(
        "AdamSPD", use_ema=True, global_clipnorm=1.0, loss_scale_factor=8.0, gradient_accumulation_steps=2
    )
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    # 8 batches with accumulation over 2: 4 optimizer steps per variable
    assert [int(keras.ops.convert_to_numpy(s)) for s in optimizer._steps] == [4] * 4


@pytest.mark.parametrize("name", NAMES)
def test_embedding_gradients(name):
    """TensorFlow gives an embedding's gradient as IndexedSlices; the step densifies it."""
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 50, (64, 5)), rng.standard_normal((64, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(50, 8),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=make_optimizer(name), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
