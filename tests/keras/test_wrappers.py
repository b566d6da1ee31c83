"""FTP, SPD, L2SP and MARSSP around Keras optimizers: against the reference and the fused optimizers.

Keras's SGD with momentum is PyTorch's at a constant learning rate (``m = −lr·b``), so
``FTP(SGD)``, ``L2SP(SGD)`` and ``MARSSP(SGD)`` follow `ReferenceOptimizer`'s ``sgd_ftp``,
``sgd_l2sp`` and ``sgd_marssp``. On TensorFlow the momentum and Adam's betas are NumPy
float64 (`keras_helpers.f64`): Keras's TensorFlow optimizers cast a Python float through float32.
"""

import warnings

import keras
import numpy as np
import pytest
from keras_helpers import f64, mlp

from tether.adapters import keras as tk
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

BACKEND = keras.backend.backend()
STEPS = 10
WRAPPERS = ["FTP", "SPD", "L2SP", "MARSSP"]


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def sgd(lr=0.05, momentum=0.9, **kwargs):
    return keras.optimizers.SGD(learning_rate=lr, momentum=f64(momentum), **kwargs)


def adam(lr=0.05, **kwargs):
    """Keras's Adam with ε negligible: then its step is PyTorch's (ε is placed differently)."""
    return keras.optimizers.Adam(
        learning_rate=lr, beta_1=f64(0.9), beta_2=f64(0.999), epsilon=1e-30, **kwargs
    )


def wrap(method, inner=None, **kwargs):
    """One wrapper with its own hyperparameter at a typical value."""
    own = {"FTP": {"k": 0.5}, "SPD": {"weight_decay": 1.0}, "L2SP": {"alpha": 0.5}, "MARSSP": {"radius": 0.3}}
    inner = inner if inner is not None else (adam() if method == "SPD" else sgd())
    return getattr(tk, method)(inner, **{**own[method], **kwargs})


def run_closed_loop(optimizer, *, unanchored=(), skip=lambda n, t: False, steps=STEPS, seed=7):
    problem = closed_loop_problem(seed=seed, steps=steps)
    variables = {
        n: keras.Variable(v, dtype="float64", name=n.replace(".", "_")) for n, v in problem.theta0.items()
    }
    if unanchored:
        optimizer.exclude_from_anchor(var_list=[variables[n] for n in unanchored])
    optimizer.build(list(variables.values()))
    trajectory = []
    for t in range(steps):
        grads = {n: None if skip(n, t) else problem.gradient(n, numpy(v), t) for n, v in variables.items()}
        optimizer.apply_gradients(
            [
                (None if g is None else keras.ops.convert_to_tensor(g, dtype="float64"), variables[n])
                for n, g in grads.items()
            ]
        )
        trajectory.append({n: numpy(v) for n, v in variables.items()})
    return trajectory


def run_reference(kind, *, anchor="init", unanchored=(), skip=lambda n, t: False, steps=STEPS, seed=7, **h):
    problem = closed_loop_problem(seed=seed, steps=steps)
    anchors = {n: (None if n in unanchored else anchor) for n in problem.theta0}
    reference = ReferenceOptimizer(kind, problem.theta0, anchors=anchors, **h)
    trajectory = []
    for t in range(steps):
        grads = {n: None if skip(n, t) else problem.gradient(n, p, t) for n, p in reference.params.items()}
        trajectory.append({n: p.copy() for n, p in reference.step(grads).items()})
    return trajectory


def deviation(a, b):
    return max(float(np.max(np.abs(x[n] - y[n]))) for x, y in zip(a, b, strict=True) for n in x)


# -- the numbers ------------------------------------------------------------------------------------

CASES = [
    # (wrapper, its kwargs, SGD kwargs, reference kind, reference hparams, anchor, unanchored)
    ("FTP", dict(k=0.5), dict(lr=0.1), "sgd_ftp", dict(lr=0.1, momentum=0.9, k=0.5), "init", ["head.weight"]),
    ("FTP", dict(), dict(lr=0.05, nesterov=True), "sgd_ftp", dict(lr=0.05, momentum=0.9, nesterov=True), "init", []),
    ("FTP", dict(k=0.8), dict(lr=0.05, momentum=0.0), "sgd_ftp", dict(lr=0.05, k=0.8), "zero", ["scale"]),
    ("L2SP", dict(alpha=0.5), dict(), "sgd_l2sp", dict(lr=0.05, momentum=0.9, alpha=0.5), "init", ["head.weight"]),
    ("L2SP", dict(alpha=0.1), dict(nesterov=True), "sgd_l2sp", dict(lr=0.05, momentum=0.9, nesterov=True, alpha=0.1), "zero", []),
    ("MARSSP", dict(radius=0.3), dict(), "sgd_marssp", dict(lr=0.05, momentum=0.9, radius=0.3), "init", []),
    ("MARSSP", dict(radius=0.05), dict(lr=0.1, momentum=0.5), "sgd_marssp", dict(lr=0.1, momentum=0.5, radius=0.05), "zero", ["fc.bias"]),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:FTP\\(anchor='zero'\\)")  # the closed loop's variables are not zero
@pytest.mark.parametrize(("name", "own", "base", "kind", "hparams", "anchor", "unanchored"), CASES)
def test_sgd_wrappers_follow_the_reference(float64, name, own, base, kind, hparams, anchor, unanchored):
    optimizer = getattr(tk, name)(sgd(**base), anchor=anchor, **own)
    got = run_closed_loop(optimizer, unanchored=unanchored)
    expected = run_reference(kind, anchor=anchor, unanchored=unanchored, **hparams)
    assert deviation(got, expected) < 1e-12


ADAM_CASES = [
    # (wrapper, its kwargs, Keras base, its kwargs, reference kind, reference hparams, unanchored)
    ("FTP", dict(), "AdamW", dict(weight_decay=0.01), "adam_ftp", dict(weight_decay=0.01), []),
    ("FTP", dict(k=0.5), "Adam", dict(amsgrad=True), "adam_ftp", dict(amsgrad=True, k=0.5), ["head.weight"]),
    ("SPD", dict(weight_decay=1.0), "Adam", dict(), "adam_spd", dict(weight_decay=1.0), ["head.weight"]),
    ("SPD", dict(weight_decay=0.5), "Adam", dict(amsgrad=True), "adam_spd", dict(weight_decay=0.5, amsgrad=True), []),
]  # fmt: skip


@pytest.mark.parametrize("epsilon", [1e-8, 1e-2])
@pytest.mark.parametrize(("name", "own", "base", "base_kwargs", "kind", "hparams", "unanchored"), ADAM_CASES)
def test_adam_wrappers_follow_the_reference_with_keras_epsilon(
    float64, name, own, base, base_kwargs, kind, hparams, unanchored, epsilon
):
    """Around Keras's Adam and AdamW, whose ε is added before the bias correction (`epsilon_hat`)."""
    decay = {"weight_decay": f64(base_kwargs["weight_decay"])} if "weight_decay" in base_kwargs else {}
    kwargs = {**base_kwargs, **decay}
    inner = getattr(keras.optimizers, base)(
        learning_rate=0.05, beta_1=f64(0.9), beta_2=f64(0.999), epsilon=f64(epsilon), **kwargs
    )
    got = run_closed_loop(getattr(tk, name)(inner, **own), unanchored=unanchored)
    expected = run_reference(kind, unanchored=unanchored, epsilon_hat=True, lr=0.05, eps=epsilon, **hparams)
    assert deviation(got, expected) < 1e-12


@pytest.mark.parametrize("name", ["FTP", "L2SP", "MARSSP"])
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_a_variable_without_a_gradient_is_left_alone(float64, name):
    """No step for a None gradient: FTP's step count does not advance (the reference skips it too)."""
    kind = {"FTP": "sgd_ftp", "L2SP": "sgd_l2sp", "MARSSP": "sgd_marssp"}[name]
    own = {"FTP": {"k": 0.5}, "L2SP": {"alpha": 0.5}, "MARSSP": {"radius": 0.3}}[name]

    def skip(n, t):
        return n == "fc.weight" and t in (0, 3, 4)

    got = run_closed_loop(wrap(name, **own), skip=skip)
    expected = run_reference(kind, lr=0.05, momentum=0.9, skip=skip, **own)
    assert deviation(got, expected) < 1e-12


def test_ftp_around_sgd_equals_the_fused_sgdftp(float64):
    wrapped = run_closed_loop(tk.FTP(sgd(0.1), k=0.5), unanchored=["head.weight"])
    fused = run_closed_loop(tk.SGDFTP(0.1, momentum=0.9, k=0.5), unanchored=["head.weight"])
    assert deviation(wrapped, fused) < 1e-12


def test_ftp_around_adamw_equals_the_fused_adamftp(float64):
    """Keras's AdamW decays θ before its Adam step; AdamFTP adds lr·wd·θ to its direction: the same θ̃."""
    inner = keras.optimizers.AdamW(
        learning_rate=0.05, weight_decay=f64(0.01), beta_1=f64(0.9), beta_2=f64(0.999), epsilon=1e-30
    )  # fmt: skip
    wrapped = run_closed_loop(tk.FTP(inner))
    fused = run_closed_loop(tk.AdamFTP(0.05, weight_decay=0.01, epsilon=1e-30))
    assert deviation(wrapped, fused) < 1e-12


def test_spd_around_adam_equals_the_fused_adamspd(float64):
    wrapped = run_closed_loop(tk.SPD(adam(), weight_decay=1.0), unanchored=["head.weight"])
    fused = run_closed_loop(tk.AdamSPD(0.05, weight_decay=1.0, epsilon=1e-30), unanchored=["head.weight"])
    assert deviation(wrapped, fused) < 1e-12


@pytest.mark.parametrize("name", ["FTP", "SPD"])
def test_the_method_sees_the_gradient_the_wrapped_optimizer_steps_with(float64, name):
    """Clipped by the wrapped optimizer: FTP's radius gradient and SPD's condition take it, as the
    fused optimizers take the base class's clipped gradient."""
    if name == "FTP":
        wrapped = tk.FTP(sgd(0.1, clipnorm=0.5), k=0.5)
        fused = tk.SGDFTP(0.1, momentum=0.9, k=0.5, clipnorm=0.5)
    else:
        wrapped = tk.SPD(adam(clipvalue=0.2), weight_decay=1.0)
        fused = tk.AdamSPD(0.05, weight_decay=1.0, epsilon=1e-30, clipvalue=0.2)
    assert deviation(run_closed_loop(wrapped), run_closed_loop(fused)) < 1e-12


def test_a_learning_rate_schedule_of_the_wrapped_optimizer(float64):
    """The wrapped optimizer evaluates its schedule at its own iteration count, as SGDFTP does at its own."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    wrapped = tk.FTP(keras.optimizers.SGD(schedule), k=0.5)
    fused = tk.SGDFTP(schedule, k=0.5)
    assert deviation(run_closed_loop(wrapped), run_closed_loop(fused)) < 1e-12
    assert int(numpy(wrapped.iterations)) == STEPS
    np.testing.assert_allclose(numpy(wrapped.learning_rate), 0.1 * 0.5 ** (STEPS / 2))


def test_the_learning_rate_is_the_wrapped_optimizer_s():
    inner = sgd(0.05)
    optimizer = tk.L2SP(inner, alpha=0.1)
    optimizer.learning_rate = 0.01  # as a LearningRateScheduler callback sets it
    np.testing.assert_allclose(numpy(inner.learning_rate), 0.01)
    assert optimizer.iterations is inner.iterations


def test_l2sp_adds_the_penalty_to_the_gradient(float64):
    """One SGD step from θ ≠ θ₀: θ ← θ − lr·(g + α(θ − θ₀)), only for anchored variables."""
    kernel = keras.Variable(np.array([[1.0, 2.0], [3.0, 4.0]]), dtype="float64", name="kernel")
    head = keras.Variable(np.array([1.0, -1.0]), dtype="float64", name="head")
    optimizer = tk.L2SP(keras.optimizers.SGD(0.1), alpha=0.5)
    optimizer.exclude_from_anchor(var_list=[head])
    optimizer.build([kernel, head])
    kernel.assign(kernel + 1.0)
    head.assign(head + 1.0)
    g = np.full((2, 2), 0.2)
    optimizer.apply_gradients(
        [(keras.ops.convert_to_tensor(g), kernel), (keras.ops.ones(2, dtype="float64"), head)]
    )
    np.testing.assert_allclose(
        numpy(kernel), np.array([[2.0, 3.0], [4.0, 5.0]]) - 0.1 * (g + 0.5), atol=1e-15
    )
    np.testing.assert_allclose(numpy(head), np.array([2.0, 0.0]) - 0.1, atol=1e-15)


def test_marssp_projects_each_row_onto_the_ball(float64):
    """A Keras kernel's rows are its output units, on the last axis (`default_row_axis`)."""
    kernel = keras.Variable(np.zeros((3, 2)), dtype="float64", name="kernel")
    optimizer = tk.MARSSP(keras.optimizers.SGD(1.0), radius=0.5)
    optimizer.build([kernel])
    assert optimizer.row_axis_of(kernel) == 1
    step = np.array([[0.1, 1.0], [0.1, 1.0], [0.1, 2.0]])  # column sums 0.3 (inside) and 4 (outside)
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(-step), kernel)])
    np.testing.assert_allclose(numpy(kernel), step * [1.0, 0.5 / 4.0], atol=1e-15)


def test_ftp_keeps_its_state_per_anchored_variable_only():
    body = keras.Variable(np.ones((3, 2)), name="kernel")
    head = keras.Variable(np.ones(2), name="head_bias")
    optimizer = tk.FTP(sgd())
    optimizer.exclude_from_anchor(var_names="head")
    optimizer.build([body, head])
    assert optimizer.anchor_mode(body) == "init" and optimizer.anchor_mode(head) is None
    assert optimizer._ftp[1] is None and optimizer._steps[1] is None and optimizer._anchors[1] is None
    for name in ("L2SP", "MARSSP", "SPD"):  # no step counts: nothing reads them
        other = wrap(name)
        other.build([keras.Variable(np.ones(2))])
        assert other._steps == [None]


# -- fit, jit, saving --------------------------------------------------------------------------------


def data(n=48, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(dtype)
    y = (x @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((n, 2))).astype(dtype)
    return x, y


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh", name="body"),
            keras.layers.Dense(2, name="head"),
        ],
        name="net",
    )


def weights(model):
    return [numpy(v) for v in model.weights]


def compiled(model, name, inner=None, **compile_kwargs):
    optimizer = wrap(name, inner)
    optimizer.exclude_from_anchor(var_list=model.get_layer("head").trainable_weights)
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


@pytest.mark.parametrize("name", WRAPPERS)
def test_jit_compile_equals_eager(float64, name):
    """XLA on TensorFlow and JAX (``stateless_apply``), ``torch.compile`` on torch.

    The model's forward pass is float64 on every backend (`keras_helpers.Linear`). On JAX, Keras's
    own SGD alone moves 3e-8 between an eager and a compiled ``fit`` of this model in float64:
    the tolerance there is 1e-6 (`test_compiled_step_follows_the_reference` checks the step itself).
    """
    x, y = data(dtype="float64")
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    eager = compiled(mlp(), name, run_eagerly=True)
    eager.fit(x, y, **fit)
    jitted = compiled(mlp(), name, jit_compile=True)
    assert jitted.jit_compile
    jitted.fit(x, y, **fit)
    for a, b in zip(weights(eager), weights(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 if BACKEND == "jax" else 1e-10)


@pytest.mark.skipif(BACKEND == "torch", reason="XLA is TensorFlow's and JAX's")
@pytest.mark.parametrize("name", WRAPPERS)
def test_compiled_step_follows_the_reference(float64, name):
    """The wrapped step traced by XLA: ``tf.function(jit_compile=True)`` of ``apply``, ``jax.jit`` of
    ``stateless_apply`` (the wrapper's variables and then the wrapped optimizer's)."""
    steps = 6
    problem = closed_loop_problem(seed=13, steps=steps)
    variables = {
        n: keras.Variable(v, dtype="float64", name=n.replace(".", "_")) for n, v in problem.theta0.items()
    }
    names, var_list = list(variables), list(variables.values())
    optimizer = wrap(name)
    optimizer.exclude_from_anchor(var_names=["head"])
    optimizer.build(var_list)
    anchors = {n: (None if n.startswith("head") else "init") for n in names}
    if name == "SPD":
        reference = tk.AdamSPD(0.05, weight_decay=1.0, epsilon=1e-30)
        reference.exclude_from_anchor(var_names=["head"])
        shadow = {
            n: keras.Variable(v, dtype="float64", name=n.replace(".", "_")) for n, v in problem.theta0.items()
        }
        reference.build(list(shadow.values()))
    else:
        kind = {"FTP": "sgd_ftp", "L2SP": "sgd_l2sp", "MARSSP": "sgd_marssp"}[name]
        own = {"FTP": {"k": 0.5}, "L2SP": {"alpha": 0.5}, "MARSSP": {"radius": 0.3}}[name]
        reference = ReferenceOptimizer(kind, problem.theta0, anchors=anchors, lr=0.05, momentum=0.9, **own)
    if BACKEND == "jax":
        import jax

        step = jax.jit(optimizer.stateless_apply)
        values = [v.value for v in var_list]
        state = [v.value for v in optimizer.variables]
    else:
        import tensorflow as tf

        step = tf.function(lambda grads: optimizer.apply(grads, var_list), jit_compile=True)
    for t in range(steps):
        params = [np.asarray(v) for v in values] if BACKEND == "jax" else [numpy(v) for v in var_list]
        grads = {n: problem.gradient(n, p, t) for n, p in zip(names, params)}
        tensors = [keras.ops.convert_to_tensor(grads[n], dtype="float64") for n in names]
        if BACKEND == "jax":
            values, state = step(state, tensors, values)
            got = [np.asarray(v) for v in values]
        else:
            step(tensors)
            got = [numpy(v) for v in var_list]
        if name == "SPD":
            reference.apply_gradients([(g, shadow[n]) for g, n in zip(tensors, names)])
            expected = {n: numpy(v) for n, v in shadow.items()}
        else:
            expected = reference.step(grads)
        for n, g in zip(names, got):
            np.testing.assert_allclose(g, expected[n], rtol=0, atol=1e-12)


def test_fit_with_ftp_around_sgd_equals_sgdftp(float64):
    x, y = data(dtype="float64")
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    wrapped = make_model()
    wrapped.compile(optimizer=tk.FTP(sgd(0.1), k=0.5), loss="mse")
    wrapped.fit(x, y, **fit)
    fused = make_model()
    fused.compile(optimizer=tk.SGDFTP(0.1, momentum=0.9, k=0.5), loss="mse")
    fused.fit(x, y, **fit)
    for a, b in zip(weights(wrapped), weights(fused), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def python_floats(name):
    """The base of `wrap` with Python-float hyperparameters, which a saved config gives back as they were.

    A NumPy float64 (`f64`) comes back as a Python float, and TensorFlow computes Adam's
    ``1 − β`` from a float32 ``β`` then: the resumed steps would be one float32 ulp off.
    """
    if name == "SPD":
        return keras.optimizers.Adam(learning_rate=0.05, epsilon=1e-30)
    return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)


@pytest.mark.parametrize("name", WRAPPERS)
def test_save_load_then_continue_equals_uninterrupted(tmp_path, name):
    """Bit for bit: the weights, the wrapper's and the wrapped optimizer's variables and config."""
    x, y = data()
    fit = dict(batch_size=16, shuffle=False, verbose=0)
    straight = compiled(make_model(), name, python_floats(name))
    straight.fit(x, y, epochs=2, **fit)

    first = compiled(make_model(), name, python_floats(name))
    first.fit(x, y, epochs=1, **fit)
    path = tmp_path / "m.keras"
    first.save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Ss]kipping variable loading.*")
        resumed = keras.saving.load_model(path)
    optimizer = resumed.optimizer
    assert type(optimizer) is type(first.optimizer)
    assert type(optimizer.inner_optimizer) is type(first.optimizer.inner_optimizer)
    assert optimizer.get_config() == first.optimizer.get_config()
    for a, b in zip(first.optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(numpy(a), numpy(b))
    assert [optimizer.anchor_mode(v) for v in resumed.trainable_variables] == ["init", "init", None, None]
    resumed.fit(x, y, epochs=1, **fit)
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["FTP", "MARSSP"])
def test_save_before_the_first_fit(tmp_path, name):
    """The file of an unbuilt wrapper loads into the built one (no 'skipping'), anchors from the loaded weights."""
    x, y = data()
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    straight = compiled(make_model(), name, python_floats(name))
    straight.fit(x, y, **fit)
    path = tmp_path / "m.keras"
    compiled(make_model(), name, python_floats(name)).save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Ss]kipping variable loading.*")
        resumed = keras.saving.load_model(path)
    optimizer = resumed.optimizer
    for variable, initial in zip(resumed.trainable_variables, weights(make_model())):
        anchor = optimizer._anchors[optimizer._get_variable_index(variable)]
        if anchor is not None:
            np.testing.assert_array_equal(numpy(anchor), initial)
    resumed.fit(x, y, **fit)
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", WRAPPERS)
def test_config_round_trip(name):
    optimizer = wrap(name, anchor="zero", name="mine")
    optimizer.exclude_from_anchor(var_names=["head"])
    config = optimizer.get_config()
    assert config["optimizer"]["class_name"] in ("SGD", "Adam")
    assert "learning_rate" not in config and "clipnorm" not in config
    restored = type(optimizer).from_config(config)
    assert restored.get_config() == config
    assert type(restored.inner_optimizer) is type(optimizer.inner_optimizer)
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == f"tether>{name}"
    assert keras.optimizers.deserialize(serialized).get_config() == config


def test_mixed_precision_with_loss_scale_optimizer(mixed_float16):
    """``compile`` puts a LossScaleOptimizer around the wrapper; the wrapped optimizer's scaling goes off."""
    x, y = data()
    model = make_model()
    model.compile(optimizer=tk.FTP(sgd(0.05, loss_scale_factor=8.0)), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer.inner_optimizer.loss_scale_factor is None
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]


@pytest.mark.parametrize("name", ["FTP", "L2SP"])
def test_the_wrapped_optimizer_s_loss_scale(float64, name):
    """A loss scale on the wrapped optimizer changes nothing: L2-SP's penalty is scaled to match."""
    x, y = data(dtype="float64")
    fit = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
    results = []
    for scale in (None, 64.0):
        model = make_model()
        model.compile(optimizer=wrap(name, sgd(loss_scale_factor=scale)), loss="mse")
        model.fit(x, y, **fit)
        results.append(weights(model))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_l2sp_allows_the_wrapped_optimizer_s_ema_and_accumulation():
    x, y = data()
    model = make_model()
    inner = sgd(use_ema=True, gradient_accumulation_steps=2)
    model.compile(optimizer=tk.L2SP(inner, alpha=0.1), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert int(numpy(model.optimizer.iterations)) == 6  # updates, with 2 batches each


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("FTP", dict(k=-0.1), "`k`"),
        ("FTP", dict(k=1.5), "`k`"),
        ("SPD", dict(weight_decay=-1.0), "`weight_decay`"),
        ("SPD", dict(weight_decay=float("nan")), "`weight_decay`"),
        ("L2SP", dict(alpha=-0.5), "`alpha`"),
        ("L2SP", dict(alpha=float("inf")), "`alpha`"),
        ("MARSSP", dict(radius=-1.0), "`radius`"),
        ("MARSSP", dict(radius="1"), "`radius`"),
        ("FTP", dict(anchor="pretrained"), "anchor"),
        ("MARSSP", dict(row_axis=1.5), "row_axis"),
    ],
)
def test_invalid_arguments_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        wrap(name, **kwargs)


def test_spd_rejects_a_base_that_decays_weights():
    with pytest.raises(ValueError, match="weight_decay"):
        tk.SPD(keras.optimizers.AdamW(), weight_decay=1.0)  # AdamW decays by default
    tk.SPD(keras.optimizers.AdamW(weight_decay=0.0), weight_decay=1.0)


@pytest.mark.parametrize("name", WRAPPERS)
def test_the_wrapped_optimizer_is_checked(name):
    with pytest.raises(TypeError, match=r"keras\.optimizers\.Optimizer"):
        wrap(name, inner="sgd")
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        wrap(name, inner=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="tether"):
        wrap(name, inner=tk.SGDFTP())
    built = keras.optimizers.SGD()
    built.build([keras.Variable(np.ones(2))])
    with pytest.raises(ValueError, match="already built"):
        wrap(name, inner=built)
    with pytest.raises(TypeError):
        wrap(name, clipnorm=1.0)  # the wrapped optimizer's argument


@pytest.mark.parametrize("name", ["FTP", "SPD", "MARSSP"])
def test_methods_that_change_the_weights_refuse_ema_and_accumulation(name):
    base = adam if name == "SPD" else sgd
    with pytest.raises(ValueError, match="use_ema"):
        wrap(name, inner=base(use_ema=True))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        wrap(name, inner=base(gradient_accumulation_steps=2))


def test_a_bad_gradient_raises_before_any_update():
    first = keras.Variable(np.ones(3), name="first")
    second = keras.Variable(np.ones(3), name="second")
    optimizer = tk.FTP(sgd())
    optimizer.build([first, second])
    with pytest.raises(TypeError, match="second"):
        optimizer.apply([keras.ops.ones(3), keras.ops.ones(3, dtype="int32")], [first, second])
    np.testing.assert_array_equal(numpy(first), np.ones(3))
    assert int(numpy(optimizer.iterations)) == 0
