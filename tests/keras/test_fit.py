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
        np.testing.assert_array_equal(a, b)


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


def wide_model(seed=0):
    """A model whose first kernel has 240 values: more than the 128 TensorFlow captures as a constant."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(40, activation="relu", name="body"),
            keras.layers.Dense(2, name="head"),
        ],
        name="wide",
    )


@pytest.mark.parametrize("jit", [True, "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_jit_compile_equals_eager(float64, name, jit):
    """``fit`` under XLA (torch.compile on torch) builds the optimizer inside the compiled step.

    On TensorFlow an ``"init"`` anchor of more than 128 values used to fail there ("We failed
    to lift variable creations out of this tf.function"); ``"auto"`` turns XLA on with a GPU.
    """
    x, y = (a.astype("float64") for a in data(n=48))
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    results = []
    for eager in (False, True):
        model = wide_model()
        optimizer = make_optimizer(name)
        if eager:
            model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
        else:
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
            assert model.jit_compile == (jit is True or (BACKEND == "jax" and jit == "auto"))
        model.fit(x, y, **fit)
        results.append(weights(model))
        assert int(keras.ops.convert_to_numpy(optimizer._steps[0])) == 6
    for compiled, eager in zip(*results, strict=True):
        np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_save_before_the_first_fit(tmp_path, name):
    """A model saved before its first ``fit`` and loaded back keeps its exclusions and anchors.

    ``load_model`` builds the optimizer when it compiles the model, before it loads the
    weights; the anchors are then taken again from the loaded weights, and the variables
    excluded by object before the save are found again by their paths.
    """
    x, y = data()
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)

    def compiled(model):
        optimizer = make_optimizer(name)
        optimizer.exclude_from_anchor(var_list=model.get_layer("head").trainable_weights)
        model.compile(optimizer=optimizer, loss="mse")
        return model

    straight = compiled(make_model())
    straight.fit(x, y, **fit)

    path = tmp_path / "m.keras"
    compiled(make_model()).save(path)
    start = weights(make_model())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Ss]kipping variable loading.*")
        resumed = keras.saving.load_model(path)
    optimizer = resumed.optimizer
    assert [optimizer.anchor_mode(v) for v in resumed.trainable_variables] == ["init", "init", None, None]
    for variable, initial in zip(resumed.trainable_variables, start):
        anchor = optimizer._anchors[optimizer._get_variable_index(variable)]
        if anchor is not None:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(anchor), initial)
    resumed.fit(x, y, **fit)
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def lora_model():
    """``body`` with Keras's own LoRA: its kernel frozen, ``lora_kernel_a`` random, ``lora_kernel_b`` zero."""
    model = make_model()
    model.get_layer("body").enable_lora(2)
    return model


def lora_a(model):
    return np.array(keras.ops.convert_to_numpy(model.get_layer("body").lora_kernel_a))


@pytest.mark.parametrize("name", ["AdamFTP", "SGDFTP"])
def test_ftp_anchors_a_lora_adapter_at_its_initialisation(name):
    x, y = data()
    model = lora_model()
    start = lora_a(model)
    optimizer = make_optimizer(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not zero.*")
        optimizer.build(model.trainable_variables)  # after enable_lora: the adapter's own init is the anchor
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history["loss"]
    assert history[-1] < history[0]
    moved = np.linalg.norm(lora_a(model) - start)
    assert 0 < moved < 0.1 * np.linalg.norm(start)


@pytest.mark.parametrize("name", ["AdamFTP", "SGDFTP"])
def test_ftp_warns_about_a_zero_anchor_for_a_lora_adapter(name):
    """FTP's radius starts at 1e-8: around a zero anchor, the random ``A`` is wiped at step 1."""
    x, y = data()
    model = lora_model()
    start = lora_a(model)
    optimizer = make_optimizer(name, anchor="zero")
    with pytest.warns(UserWarning, match="lora_kernel_a") as caught:
        optimizer.build(model.trainable_variables)
    message = str(caught[0].message)
    assert "lora_kernel_b" not in message and "body/bias" not in message  # zero at build
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    assert np.max(np.abs(lora_a(model))) < 1e-6 * np.max(np.abs(start))


def test_spd_takes_a_zero_anchor_without_a_warning():
    model = lora_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not zero.*")
        make_optimizer("AdamSPD", anchor="zero").build(model.trainable_variables)
