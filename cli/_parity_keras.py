"""`tether parity` driver for Keras 3 on the backend `KERAS_BACKEND` names (one process each)."""

import contextlib
import os

if os.environ.get("KERAS_BACKEND") == "jax":  # float64 cases need x64 before any array exists
    import jax

    jax.config.update("jax_enable_x64", True)

import keras
import numpy as np
from keras import ops

from tether.adapters import keras as tk

from ._parity_cases import MLP, SameModel, full_hparams
from ._workers import devices


def _default_device():
    """The device a backend puts new tensors on: its GPU when it has one."""
    return devices(f"keras/{keras.backend.backend()}")[-1]


FUSED = {"adam_ftp": tk.AdamFTP, "sgd_ftp": tk.SGDFTP, "adam_spd": tk.AdamSPD}


def build(case):
    """The case's Keras optimizer, its hyperparameters renamed from PyTorch's to Keras's."""
    if case.wrapper:
        return None  # Keras has no wrapper form: the fused optimizers are the API
    h = full_hparams(case)
    h["learning_rate"] = h.pop("lr")
    if "betas" in h:
        h["beta_1"], h["beta_2"] = h.pop("betas")
        h["epsilon"] = h.pop("eps")
    return FUSED[case.kind](**h, anchor=case.anchor)


class _Network(keras.Model):
    """The parity MLP with PyTorch's (out, in) weight layout."""

    def __init__(self, theta0, dtype):
        super().__init__(dtype=dtype)
        self.names = list(theta0)
        for n, v in theta0.items():  # plain attributes: every backend tracks them (a dict is not, on torch)
            weight = self.add_weight(
                shape=v.shape,
                initializer=keras.initializers.Constant(v),
                dtype=dtype,
                name=n.replace(".", "_"),
            )
            setattr(self, n.replace(".", "_"), weight)

    @property
    def weights_by_name(self):
        return {n: getattr(self, n.replace(".", "_")) for n in self.names}

    def call(self, x):
        w = self.weights_by_name
        hidden = ops.tanh(ops.matmul(x, ops.transpose(w["fc.weight"])) + w["fc.bias"])
        return ops.matmul(hidden, ops.transpose(w["head.weight"])) + w["head.bias"]


def run(case, problem, dtype, device):
    keras.config.set_floatx(dtype)  # before the optimizer: its learning-rate variable takes floatx
    opt = build(case)
    if opt is None:
        return None
    # a device scope only where it changes something: under torch, keras.device("cpu:0") on a
    # CPU-only machine leaves train_on_batch with no gradients
    scope = contextlib.nullcontext() if device == _default_device() else keras.device(f"{device}:0")
    with scope:
        if isinstance(problem, SameModel):
            return _run_same_model(case, problem, dtype, opt)
        if isinstance(problem, MLP):
            return _run_mlp(case, problem, dtype, opt)
        return _run_closed_loop(case, problem, dtype, opt)


def _run_closed_loop(case, problem, dtype, opt):
    variables = {
        n: keras.Variable(v, dtype=dtype, name=n.replace(".", "_")) for n, v in problem.theta0.items()
    }
    if case.unanchored:
        opt.exclude_from_anchor(var_list=[variables[n] for n in case.unanchored])
    var_list = list(variables.values())
    opt.build(var_list)
    trajectory = {n: [] for n in variables}
    for t in range(problem.steps):
        grads = problem.gradients({n: ops.convert_to_numpy(v) for n, v in variables.items()}, t)
        opt.apply_gradients([(ops.convert_to_tensor(grads[n], dtype=dtype), v) for n, v in variables.items()])
        for n, v in variables.items():
            trajectory[n].append(ops.convert_to_numpy(v).astype(np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}


def _run_mlp(case, problem, dtype, opt):
    model = _Network(problem.theta0, dtype)
    x, y = problem.x.astype(dtype), problem.y.astype(dtype)
    model(x[:1])
    if case.unanchored:
        opt.exclude_from_anchor(var_list=[model.weights_by_name[n] for n in case.unanchored])
    model.compile(optimizer=opt, loss="mse", run_eagerly=True)
    trajectory = {n: [] for n in model.names}
    for _ in range(problem.steps):
        model.train_on_batch(x, y)
        for n, v in model.weights_by_name.items():
            trajectory[n].append(ops.convert_to_numpy(v).astype(np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}


def _run_same_model(case, problem, dtype, opt):
    """The case on `SameModel` built from Keras layers, in Keras's layout; the trajectory in PyTorch's."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype=dtype),
            layers.Conv2D(4, 3, activation="tanh", name="conv", dtype=dtype),
            layers.GlobalAveragePooling2D(dtype=dtype),
            layers.Dense(8, activation="tanh", name="fc", dtype=dtype),
            layers.Dense(3, name="head", dtype=dtype),
        ]
    )
    variables = {}
    for layer in ("conv", "fc", "head"):
        built = model.get_layer(layer)
        variables[f"{layer}.weight"], variables[f"{layer}.bias"] = built.kernel, built.bias
    for name, variable in variables.items():
        variable.assign(SameModel.to_channels_last(name, problem.theta0[name]).astype(dtype))
    if case.unanchored:
        opt.exclude_from_anchor(var_list=[variables[n] for n in case.unanchored])
    model.compile(optimizer=opt, loss="mse", run_eagerly=True)
    x = SameModel.to_channels_last("x", problem.x).astype(dtype)
    y = problem.y.astype(dtype)
    trajectory = {n: [] for n in variables}
    for _ in range(problem.steps):
        model.train_on_batch(x, y)
        for n, v in variables.items():
            value = ops.convert_to_numpy(v).astype(np.float64)
            trajectory[n].append(SameModel.from_channels_last(n, value))
    return {n: np.stack(v) for n, v in trajectory.items()}
