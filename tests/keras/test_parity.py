"""Float64 trajectories of the Keras optimizers equal the NumPy reference run of the core (1e-12).

Each test drives the public API on a closed-loop problem (``g = h ⊙ (θ − target) +
noise``), feeds the same gradients to :class:`tether.core.reference.ReferenceOptimizer`
and compares every variable after every step.
"""

import keras
import numpy as np
import pytest

from tether.adapters import keras as tk
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

OPTIMIZERS = {"adam_ftp": tk.AdamFTP, "sgd_ftp": tk.SGDFTP, "adam_spd": tk.AdamSPD}
TOL = 1e-12
STEPS = 12

CONFIGS = [
    ("adam_ftp", dict(lr=0.05), "init", ["head.weight"]),
    ("adam_ftp", dict(lr=0.05, weight_decay=0.01, amsgrad=True, k=0.5), "init", []),
    ("adam_ftp", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6), "zero", ["scale"]),
    ("sgd_ftp", dict(lr=0.1, momentum=0.9), "init", ["head.weight"]),
    ("sgd_ftp", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, k=0.8), "init", []),
    ("sgd_ftp", dict(lr=0.05, momentum=0.5, dampening=0.3), "zero", []),
    ("sgd_ftp", dict(lr=0.05), "init", []),
    ("adam_spd", dict(lr=0.05, weight_decay=1.0), "init", ["head.weight"]),
    ("adam_spd", dict(lr=0.05, weight_decay=0.5, amsgrad=True), "zero", []),
]


def keras_hparams(hparams):
    """Reference (PyTorch) hyperparameter names to the Keras optimizers' names."""
    renames = {"lr": "learning_rate", "eps": "epsilon"}
    out = {}
    for name, value in hparams.items():
        if name == "betas":
            out["beta_1"], out["beta_2"] = value
        else:
            out[renames.get(name, name)] = value
    return out


def make_variables(problem):
    return {
        n: keras.Variable(p, dtype="float64", name=n.replace(".", "_")) for n, p in problem.theta0.items()
    }


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def radius_of(optimizer, variable):
    return numpy(optimizer._ftp[optimizer._get_variable_index(variable)].radius)


def run_pair(kind, hparams, anchor, unanchored, *, steps=STEPS, skip=lambda n, t: False, **opt_kwargs):
    """Run the Keras optimizer and the reference side by side; return the worst deviation."""
    problem = closed_loop_problem(seed=7, steps=steps)
    variables = make_variables(problem)
    names = list(variables)
    optimizer = OPTIMIZERS[kind](anchor=anchor, **keras_hparams(hparams), **opt_kwargs)
    if unanchored:
        optimizer.exclude_from_anchor(var_list=[variables[n] for n in unanchored])
    optimizer.build(list(variables.values()))
    anchors = {n: (None if n in unanchored else anchor) for n in names}
    reference = ReferenceOptimizer(kind, problem.theta0, anchors=anchors, **hparams)
    worst = 0.0
    for t in range(steps):
        grads = {n: None if skip(n, t) else problem.gradient(n, numpy(variables[n]), t) for n in names}
        optimizer.apply_gradients(
            [
                (None if g is None else keras.ops.convert_to_tensor(g, dtype="float64"), variables[n])
                for n, g in grads.items()
            ]
        )
        expected = reference.step(grads)
        for n in names:
            worst = max(worst, float(np.max(np.abs(numpy(variables[n]) - expected[n]))))
            if kind.endswith("ftp") and anchors[n]:
                radius = radius_of(optimizer, variables[n])
                worst = max(worst, float(np.abs(radius - reference.radius(n))))
    return worst


@pytest.mark.filterwarnings("ignore:.*anchors variables that are not zero")  # parity on purpose
@pytest.mark.parametrize(("kind", "hparams", "anchor", "unanchored"), CONFIGS)
def test_trajectory_matches_reference(float64, kind, hparams, anchor, unanchored):
    assert run_pair(kind, hparams, anchor, unanchored) <= TOL


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_each_variable_counts_its_own_steps(float64, kind):
    """A variable whose gradient is None in a step neither moves nor advances its step count."""
    skipped = {("fc.bias", 1), ("fc.bias", 2), ("scale", 3), ("head.weight", 0)}
    hparams = dict(lr=0.05, momentum=0.9) if kind == "sgd_ftp" else dict(lr=0.05, weight_decay=0.1)
    worst = run_pair(kind, hparams, "init", ["head.weight"], skip=lambda n, t: (n, t) in skipped)
    assert worst <= TOL


def test_anchor_is_the_weights_at_build(float64):
    problem = closed_loop_problem(seed=3, steps=1)
    variables = make_variables(problem)
    optimizer = tk.AdamSPD(weight_decay=1.0)
    optimizer.exclude_from_anchor(var_names=["head"])
    optimizer.build(list(variables.values()))
    for n, variable in variables.items():
        anchor = optimizer._anchors[optimizer._get_variable_index(variable)]
        if n.startswith("head"):
            assert anchor is None
        else:
            np.testing.assert_array_equal(numpy(anchor), problem.theta0[n])
    # the anchor is a copy, not a view of the weights
    variables["fc.weight"].assign(np.zeros_like(problem.theta0["fc.weight"]))
    index = optimizer._get_variable_index(variables["fc.weight"])
    np.testing.assert_array_equal(numpy(optimizer._anchors[index]), problem.theta0["fc.weight"])


def test_learning_rate_schedule(float64):
    """A schedule is evaluated at the iteration count before each step, as Keras does."""
    steps = 8
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=3, decay_rate=0.5)
    problem = closed_loop_problem(seed=11, steps=steps)
    variables = make_variables(problem)
    optimizer = tk.AdamFTP(learning_rate=schedule, weight_decay=0.01)
    reference = ReferenceOptimizer("adam_ftp", problem.theta0, lr=0.05, weight_decay=0.01)
    for t in range(steps):
        grads = {n: problem.gradient(n, numpy(v), t) for n, v in variables.items()}
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grads[n]), v) for n, v in variables.items()])
        reference.hparams["lr"] = float(numpy(schedule(t)))  # ≈ 0.05 · 0.5^(t/3), as Keras rounds it
        expected = reference.step(grads)
        for n, v in variables.items():
            np.testing.assert_allclose(numpy(v), expected[n], rtol=0, atol=TOL)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_clipnorm_and_gradient_accumulation(float64, clip):
    """The base class's gradient processing happens before the step: clip per tensor, average over 2."""
    steps = 8
    # Keras's own clipping uses ops.maximum, which computes float64 in float32 on torch
    tol = 1e-7 if clip and keras.backend.backend() == "torch" else TOL
    problem = closed_loop_problem(seed=12, steps=steps)
    variables = make_variables(problem)
    optimizer = tk.AdamSPD(learning_rate=0.05, weight_decay=1.0, clipnorm=clip, gradient_accumulation_steps=2)
    reference = ReferenceOptimizer("adam_spd", problem.theta0, lr=0.05, weight_decay=1.0)
    pending = None
    for t in range(steps):
        grads = {n: problem.gradient(n, numpy(v), t) for n, v in variables.items()}
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grads[n]), v) for n, v in variables.items()])
        if pending is None:
            pending = grads
            expected = reference.params
        else:
            mean = {n: (grads[n] + pending[n]) / 2 for n in grads}
            if clip:
                mean = {n: g * clip / max(np.sqrt(np.sum(g * g)), clip) for n, g in mean.items()}
            expected = reference.step(mean)
            pending = None
        for n, v in variables.items():
            np.testing.assert_allclose(numpy(v), expected[n], rtol=0, atol=tol)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="jit_compile is TensorFlow's and JAX's")
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_compiled_step_matches_reference(float64, kind):
    """The step traced by XLA (tf.function(jit_compile=True), or jax.jit of stateless_apply)."""
    steps = 6
    hparams = dict(lr=0.1, momentum=0.9) if kind == "sgd_ftp" else dict(lr=0.05, weight_decay=0.5)
    problem = closed_loop_problem(seed=13, steps=steps)
    variables = make_variables(problem)
    names, var_list = list(variables), list(variables.values())
    optimizer = OPTIMIZERS[kind](**keras_hparams(hparams))
    optimizer.exclude_from_anchor(var_names=["head"])
    optimizer.build(var_list)
    anchors = {n: (None if n.startswith("head") else "init") for n in names}
    reference = ReferenceOptimizer(kind, problem.theta0, anchors=anchors, **hparams)
    if keras.backend.backend() == "jax":
        import jax

        step = jax.jit(optimizer.stateless_apply)
        values = [v.value for v in var_list]
        state = [v.value for v in optimizer.variables]
    else:
        import tensorflow as tf

        step = tf.function(lambda grads: optimizer.apply(grads, var_list), jit_compile=True)
    for t in range(steps):
        params = (
            [np.asarray(values[i]) for i in range(len(names))]
            if keras.backend.backend() == "jax"
            else [numpy(v) for v in var_list]
        )
        grads = {n: problem.gradient(n, p, t) for n, p in zip(names, params)}
        tensors = [keras.ops.convert_to_tensor(grads[n], dtype="float64") for n in names]
        if keras.backend.backend() == "jax":
            values, state = step(state, tensors, values)
            got = [np.asarray(v) for v in values]
        else:
            step(tensors)
            got = [numpy(v) for v in var_list]
        expected = reference.step(grads)
        for n, g in zip(names, got):
            np.testing.assert_allclose(g, expected[n], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_variables(kind, dtype):
    """16-bit variables keep their dtype and are stepped in float32 (close to a float32 run)."""
    steps = 4
    hparams = dict(lr=0.1, momentum=0.9) if kind == "sgd_ftp" else dict(lr=0.05, weight_decay=0.5)
    problem = closed_loop_problem(seed=5, steps=steps, shapes={"w": (4, 6), "b": (4,)}, dtype=np.float32)
    variables = {n: keras.Variable(p, dtype=dtype, name=n) for n, p in problem.theta0.items()}
    start = {n: numpy(v).astype(np.float32) for n, v in variables.items()}  # the values after rounding
    optimizer = OPTIMIZERS[kind](**keras_hparams(hparams))
    reference = ReferenceOptimizer(kind, start, **hparams)
    for t in range(steps):
        grads = {n: problem.gradient(n, numpy(v).astype(np.float32), t) for n, v in variables.items()}
        optimizer.apply_gradients(
            [(keras.ops.convert_to_tensor(grads[n], dtype=dtype), v) for n, v in variables.items()]
        )
        expected = reference.step(grads)
    for n, v in variables.items():
        assert keras.backend.standardize_dtype(v.dtype) == dtype
        np.testing.assert_allclose(numpy(v).astype(np.float32), expected[n], rtol=0, atol=0.05)
