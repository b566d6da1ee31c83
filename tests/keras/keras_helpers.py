"""Models and a loss for the Keras tests whose float64 computation is float64 on every backend.

Keras 3.15 folds ``result_type(float64, float64)`` to float32 on the JAX and torch backends,
so ``keras.ops.matmul`` (hence ``Dense``) computes a float64 network in float32 on torch, and
``keras.ops.mean`` (hence ``MeanSquaredError``) on JAX; XLA's float64 ``tanh`` on a CPU is
8e-8 from NumPy's. `Linear` is ``Dense`` written as a broadcast product and a sum, which every
backend computes in the inputs' dtype; its kernel is ``(in, out)`` and named ``kernel``, so
`tether.adapters.keras.default_row_axis` puts its rows on the last axis. `exact_mse` is the
mean squared error as a sum divided by the count.
"""

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def f64(value):
    """A hyperparameter as Keras's TensorFlow optimizers keep it exactly in float64.

    They cast a Python float through float32 (0.9 becomes 0.8999999762); a NumPy float64 keeps
    its value. Elsewhere a Python float (``torch.compile`` rejects NumPy scalars as ``alpha``).
    """
    return np.float64(value) if BACKEND == "tensorflow" else value


@keras.saving.register_keras_serializable(package="tether_tests")
class Linear(keras.layers.Layer):
    """``x @ kernel + bias`` as ``sum(x[..., None] * kernel, axis=-2) + bias``."""

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return self.activation(ops.sum(ops.expand_dims(x, -1) * self.kernel, axis=-2) + self.bias)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, activation=keras.activations.serialize(self.activation))
        return config


def exact_mse(y_true, y_pred):
    """The mean of ``(y_pred − y_true)²`` over every entry (the batch and the outputs)."""
    d = y_pred - ops.cast(y_true, y_pred.dtype)
    return ops.sum(d * d) / float(np.prod(tuple(d.shape)))


def mlp(inputs=6, hidden=16, outputs=2, *, seed=0, dtype=None, name="net", activation="tanh"):
    """``Linear(hidden, activation)`` (``body``) then ``Linear(outputs)`` (``head``), random weights."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((inputs,), dtype=dtype),
            Linear(hidden, activation=activation, name="body", dtype=dtype),
            Linear(outputs, name="head", dtype=dtype),
        ],
        name=name,
    )
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(0.5 * rng.standard_normal(variable.shape))
    return model


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def weights(model):
    return [numpy(v) for v in model.weights]
