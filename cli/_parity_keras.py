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
from tether.adapters._keras_common import _float64_kept

from ._parity_cases import MLP, MODEL_KINDS, SameModel, finetuning_steps, full_hparams
from ._workers import devices


def _default_device():
    """The device a backend puts new tensors on: its GPU when it has one."""
    return devices(f"keras/{keras.backend.backend()}")[-1]


FUSED = {"adam_ftp": tk.AdamFTP, "sgd_ftp": tk.SGDFTP, "adam_spd": tk.AdamSPD}
#: The wrappers whose case has an SGD base, and the wrapper's own hyperparameter.
SGD_WRAPPERS = {"ftp": (tk.FTP, "k"), "l2sp": (tk.L2SP, "alpha"), "marssp": (tk.MARSSP, "radius")}


def build(case):
    """The case's Keras optimizer, its hyperparameters renamed from PyTorch's to Keras's.

    `None` (n/a) where Keras has no base step equal to PyTorch's: the wrappers around Adam
    (``keras.optimizers.Adam`` adds ε before the bias correction of the second moment, PyTorch
    after it) and SGD with dampening or coupled weight decay.
    """
    h = full_hparams(case)
    if case.wrapper:
        return _wrapper(case, h)
    h["learning_rate"] = h.pop("lr")
    if "betas" in h:
        h["beta_1"], h["beta_2"] = h.pop("betas")
        h["epsilon"] = h.pop("eps")
    return FUSED[case.kind](**h, anchor=case.anchor)


def _exact(value):
    """A hyperparameter as Keras's TensorFlow optimizers keep it exactly in float64.

    They cast a Python float through float32 (0.9 becomes 0.8999999762); a NumPy float64
    keeps its value. Elsewhere a Python float (``torch.compile`` rejects a NumPy scalar).
    """
    return np.float64(value) if keras.backend.backend() == "tensorflow" else value


def _wrapper(case, h):
    """The wrapper around Keras's own base optimizer, or `None` where it differs from the case's.

    Around ``keras.optimizers.SGD``, whose momentum step is PyTorch's at a constant rate:
    Keras's ``m ← μm − lr·g; θ ← θ + m`` is PyTorch's ``b ← μb + g; θ ← θ − lr·b`` with
    ``m = −lr·b`` (the first step included, as ``b₁ = g``). Around ``keras.optimizers.Adam``
    and ``AdamW`` only in the `Case.epsilon_hat` cases (Keras adds ε before the bias
    correction); ``AdamW``'s decoupled decay ``θ ← θ − lr·wd·θ`` is Adam-FTP's term.
    """
    if case.wrapper in ("ftp", "spd") and case.kind != "sgd_ftp":
        if not case.epsilon_hat:
            return None
        beta_1, beta_2 = (_exact(b) for b in h["betas"])
        adam = dict(learning_rate=h["lr"], beta_1=beta_1, beta_2=beta_2, epsilon=_exact(h["eps"]))
        adam["amsgrad"] = h["amsgrad"]
        if case.wrapper == "spd":
            return tk.SPD(keras.optimizers.Adam(**adam), weight_decay=h["weight_decay"], anchor=case.anchor)
        inner = keras.optimizers.AdamW(weight_decay=_exact(h["weight_decay"]), **adam)
        return tk.FTP(inner, k=h["k"], anchor=case.anchor)
    if case.wrapper not in SGD_WRAPPERS or h.get("dampening", 0) or h.get("weight_decay", 0):
        return None
    momentum = _exact(h["momentum"])
    inner = keras.optimizers.SGD(learning_rate=h["lr"], momentum=momentum, nesterov=h["nesterov"])
    cls, own = SGD_WRAPPERS[case.wrapper]
    return cls(inner, anchor=case.anchor, **{own: h[own]})


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
    beside = case.kind in MODEL_KINDS
    if beside and not isinstance(problem, (MLP, SameModel)):
        return None  # TPGM and WiSE-FT need a model and its loss
    opt = None if beside else build(case)
    if opt is None and not beside:
        return None
    # a device scope only where it changes something: under torch, keras.device("cpu:0") on a
    # CPU-only machine leaves train_on_batch with no gradients
    scope = contextlib.nullcontext() if device == _default_device() else keras.device(f"{device}:0")
    # Keras's own forward pass kept in float64 (it folds float64 to float32 on JAX and torch)
    with scope, _float64_kept():
        if beside:
            return _beside_finetuning(case, problem, dtype)
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


def _mlp(problem, dtype):
    """The MLP, its weights by PyTorch name, and the fixed batch."""
    model = _Network(problem.theta0, dtype)
    x, y = problem.x.astype(dtype), problem.y.astype(dtype)
    model(x[:1])
    return model, model.weights_by_name, x, y


def _run_mlp(case, problem, dtype, opt):
    model, _, x, y = _mlp(problem, dtype)
    if case.unanchored:
        opt.exclude_from_anchor(var_list=[model.weights_by_name[n] for n in case.unanchored])
    model.compile(optimizer=opt, loss="mse", run_eagerly=True)
    trajectory = {n: [] for n in model.names}
    for _ in range(problem.steps):
        model.train_on_batch(x, y)
        for n, v in model.weights_by_name.items():
            trajectory[n].append(ops.convert_to_numpy(v).astype(np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}


def _same_model(problem, dtype):
    """`SameModel` built from Keras layers in Keras's layout, its weights by PyTorch name, the batch."""
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
    x = SameModel.to_channels_last("x", problem.x).astype(dtype)
    return model, variables, x, problem.y.astype(dtype)


def _run_same_model(case, problem, dtype, opt):
    """The case on `SameModel` built from Keras layers, in Keras's layout; the trajectory in PyTorch's."""
    model, variables, x, y = _same_model(problem, dtype)
    if case.unanchored:
        opt.exclude_from_anchor(var_list=[variables[n] for n in case.unanchored])
    model.compile(optimizer=opt, loss="mse", run_eagerly=True)
    trajectory = {n: [] for n in variables}
    for _ in range(problem.steps):
        model.train_on_batch(x, y)
        for n, v in variables.items():
            value = ops.convert_to_numpy(v).astype(np.float64)
            trajectory[n].append(SameModel.from_channels_last(n, value))
    return {n: np.stack(v) for n, v in trajectory.items()}


def _beside_finetuning(case, problem, dtype):
    """TPGM calls (`tk.TPGM`) or WiSE-FT mixes (`tk.wise_ft`) after fixed fine-tuning steps.

    The steps (`finetuning_steps`, PyTorch's layout) are added to the weights in the model's
    layout; TPGM learns on the problem's fixed batch with the mean squared error; the trajectory
    is the projected weights, or the mixed ones (the fine-tuned weights keep accumulating).
    """
    same = isinstance(problem, SameModel)
    model, variables, x, y = (_same_model if same else _mlp)(problem, dtype)
    to_model = SameModel.to_channels_last if same else (lambda name, value: value)
    from_model = SameModel.from_channels_last if same else (lambda name, value: value)
    h = case.hparams
    tpgm = anchor = None
    if case.kind == "tpgm":
        excluded = [variables[n] for n in case.unanchored]
        tpgm = tk.TPGM(model, norm=h["norm"], learning_rate=h["lr"], exclude=excluded)
    else:
        anchor = model.get_weights()
        position = {n: next(i for i, w in enumerate(model.weights) if w is v) for n, v in variables.items()}
    loss = keras.losses.MeanSquaredError()
    trajectory = {n: [] for n in variables}
    for delta in finetuning_steps(problem):
        for n, v in variables.items():
            v.assign(v + to_model(n, delta[n]).astype(dtype))
        if tpgm is not None:
            tpgm.step([(x, y)], iters=h["iters"], loss=loss)
            shown = {n: ops.convert_to_numpy(v) for n, v in variables.items()}
        else:
            mixed = tk.wise_ft(model, anchor, h["alpha"])
            shown = {n: mixed[position[n]] for n in variables}
        for n, value in shown.items():
            trajectory[n].append(from_model(n, np.asarray(value, np.float64)))
    return {n: np.stack(v) for n, v in trajectory.items()}
