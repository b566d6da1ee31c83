"""FTP's rows are output units: a Keras layer gives the numbers of the same PyTorch layer.

Keras keeps a ``Dense`` kernel as ``(in, out)`` and a ``Conv2D`` kernel as
``(kh, kw, in, out)``; PyTorch as ``(out, in)`` and ``(out, in, kh, kw)``. Each test
steps a Keras layer in float64 and the reference (`tether.core.reference`) on the
PyTorch-layout weights with the same gradients, and compares every step (1e-12). On the
torch backend, float64 variables take the in-place path, with the rows moved first.
"""

import keras
import numpy as np
import pytest
from test_parity import OPTIMIZERS, TOL, numpy

from tether.adapters import keras as tk
from tether.core.reference import ReferenceOptimizer, closed_loop_problem

FTP = ["adam_ftp", "sgd_ftp"]
HPARAMS = {
    "adam_ftp": dict(lr=0.05, weight_decay=0.01),
    "sgd_ftp": dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
}
# a Keras kernel to PyTorch's layout: outputs first
TO_TORCH = {2: (1, 0), 4: (3, 2, 0, 1)}


def keras_hparams(kind):
    renames = {"lr": "learning_rate"}
    return {renames.get(k, k): v for k, v in HPARAMS[kind].items()}


def dense():
    layer = keras.layers.Dense(3, name="dense")
    layer.build((None, 5))
    return layer


def conv():
    layer = keras.layers.Conv2D(4, 3, name="conv")
    layer.build((None, 6, 6, 2))
    return layer


def run_against_reference(kind, variables, layouts, steps=8, **kwargs):
    """Step ``variables`` (name → Keras variable) and the reference on ``layouts`` (name → axes).

    ``layouts[name]`` permutes the Keras value into the reference's (PyTorch's) layout.
    Returns the largest deviation of any variable at any step.
    """
    shapes = {n: tuple(v.shape) for n, v in variables.items()}
    problem = closed_loop_problem(seed=31, steps=steps, shapes=shapes)
    for n, v in variables.items():
        v.assign(problem.theta0[n])
    optimizer = OPTIMIZERS[kind](**keras_hparams(kind), **kwargs)
    to_ref = {n: (lambda x, axes=layouts[n]: np.transpose(x, axes)) for n in variables}
    reference = ReferenceOptimizer(
        kind, {n: to_ref[n](p) for n, p in problem.theta0.items()}, **HPARAMS[kind]
    )
    worst = 0.0
    for t in range(steps):
        grads = {n: problem.gradient(n, numpy(v), t) for n, v in variables.items()}
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grads[n]), v) for n, v in variables.items()])
        expected = reference.step({n: to_ref[n](g) for n, g in grads.items()})
        for n, v in variables.items():
            worst = max(worst, float(np.max(np.abs(to_ref[n](numpy(v)) - expected[n]))))
    return worst


@pytest.mark.parametrize("make", [dense, conv])
@pytest.mark.parametrize("kind", FTP)
def test_keras_layer_equals_the_pytorch_layer(float64, kind, make):
    layer = make()
    variables = {"kernel": layer.kernel, "bias": layer.bias}
    layouts = {"kernel": TO_TORCH[len(layer.kernel.shape)], "bias": (0,)}
    assert run_against_reference(kind, variables, layouts) <= TOL


@pytest.mark.parametrize("kind", FTP)
def test_row_axis_zero_keeps_the_first_axis(float64, kind):
    """``row_axis=0`` overrides the rule: the kernel's rows are its input units, as before."""
    layer = dense()
    variables = {"kernel": layer.kernel, "bias": layer.bias}
    assert run_against_reference(kind, variables, {"kernel": (0, 1), "bias": (0,)}, row_axis=0) <= TOL


@pytest.mark.parametrize("kind", FTP)
def test_row_axis_as_an_int_and_as_a_callable(float64, kind):
    names = {"w": (4, 6), "v": (2, 3, 5), "b": (6,)}
    layouts = {"w": (1, 0), "v": (2, 0, 1), "b": (0,)}
    every = {n: keras.Variable(np.zeros(s), name=n) for n, s in names.items()}
    assert run_against_reference(kind, every, layouts, row_axis=-1) <= TOL
    # per variable: the last axis of `w` only; `v` keeps axis 0
    chosen = {n: keras.Variable(np.zeros(s), name=n) for n, s in names.items()}
    layouts["v"] = (0, 1, 2)
    assert run_against_reference(kind, chosen, layouts, row_axis=lambda v: 1 if v.name == "w" else 0) <= TOL


def short(variable):
    """``layer/name``, whatever the model's name scope."""
    return "/".join(variable.path.split("/")[-2:])


def test_default_rule():
    """Kernels (and their LoRA factors) have their rows last; embeddings, biases, the rest first."""
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 6, name="embedding")(inputs)
    x = keras.layers.Conv1D(5, 2, name="conv")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("head").enable_lora(2)
    optimizer = tk.SGDFTP()
    optimizer.build(model.trainable_variables)
    axes = {short(v): optimizer.row_axis_of(v) for v in model.trainable_variables}
    assert axes == {
        "embedding/embeddings": 0,
        "conv/kernel": 2,
        "conv/bias": 0,
        "head/bias": 0,
        "head/lora_kernel_a": 1,
        "head/lora_kernel_b": 1,
    }
    for variable in model.trainable_variables:
        expected = [1] * len(variable.shape)
        if len(variable.shape) >= 2:
            axis = axes[short(variable)]
            expected[axis] = variable.shape[axis]
        state = optimizer._ftp[optimizer._get_variable_index(variable)]
        assert tuple(state.prev_inv_norm.shape) == tuple(expected)
    assert tk.default_row_axis(keras.Variable(np.zeros((2, 3), "float32"), name="kernel")) == -1
    assert tk.default_row_axis(keras.Variable(np.zeros(3, "float32"), name="kernel")) == 0
    assert tk.default_row_axis(keras.Variable(np.zeros((2, 3), "float32"), name="weights")) == 0


@pytest.mark.parametrize(
    ("row_axis", "error"),
    [(2, ValueError), (-3, ValueError), (lambda v: 2, ValueError), (lambda v: "last", TypeError)],
)
def test_a_row_axis_out_of_range_raises_at_build_naming_the_variable(row_axis, error):
    variables = [keras.Variable(np.ones((2, 3), "float32"), name="w"), keras.Variable(np.ones(3, "float32"))]
    optimizer = tk.AdamFTP(row_axis=row_axis)
    with pytest.raises(error, match="`row_axis` of `w`"):
        optimizer.apply_gradients([(keras.ops.ones(v.shape), v) for v in variables])
    assert not optimizer.built and len(optimizer.variables) == optimizer._unbuilt_variable_count
    for variable in variables:
        np.testing.assert_array_equal(numpy(variable), np.ones(variable.shape))


@pytest.mark.parametrize("row_axis", ["-1", 1.0, True])
def test_row_axis_of_the_wrong_type_raises(row_axis):
    with pytest.raises(ValueError, match="row_axis"):
        tk.SGDFTP(row_axis=row_axis)


def test_row_axis_in_the_config():
    layer = dense()
    assert tk.AdamFTP(row_axis=-1).get_config()["row_axis"] == -1
    assert "row_axes" not in tk.AdamFTP().get_config()
    assert "row_axis" not in tk.AdamSPD().get_config()
    # a callable cannot be saved before the optimizer is built ...
    optimizer = tk.AdamFTP(row_axis=lambda v: 0)
    with pytest.raises(ValueError, match="callable `row_axis`"):
        optimizer.get_config()
    # ... once built, the axes it gave stand for it
    optimizer.build([layer.kernel, layer.bias])
    config = optimizer.get_config()
    assert config["row_axis"] is None and config["row_axes"] == [0, 0]
    restored = tk.AdamFTP.from_config(config)
    assert restored.get_config() == config
    again = dense()
    restored.build([again.kernel, again.bias])
    assert [restored.row_axis_of(again.kernel), restored.row_axis_of(again.bias)] == [0, 0]
    assert tuple(restored._ftp[0].prev_inv_norm.shape) == (5, 1)
    assert restored.get_config() == config
