r"""tether for Keras 3: FTP and SPD as ``keras.optimizers.Optimizer`` subclasses.

Pass one to ``model.compile(optimizer=...)`` on the TensorFlow, JAX or torch
backend. Each optimizer is bookkeeping only: its state lives in optimizer
variables (so ``model.save`` / ``keras.saving.load_model`` carry it), the Keras
base class owns learning-rate schedules, gradient clipping, EMA, loss scaling,
gradient accumulation and ``jit_compile``, and the math is a call into
`tether.core` through a namespace built on ``keras.ops``. On the torch backend,
float32 and float64 variables are updated in place by the PyTorch adapter's
multi-tensor kernels instead, as Keras's own torch optimizers are (see
``_keras_torch``).

The anchor $\theta_0$ of each variable is captured when the optimizer is
built, which ``fit`` does on its first call: load the pre-trained weights before
that. `exclude_from_anchor` leaves variables (a new head)
unanchored: they take the plain base step.

FTP's MARS norm is per output unit (ALGORITHMS.md §1): Keras keeps a ``Dense`` or
``Conv`` kernel's outputs on its last axis, so `AdamFTP` and `SGDFTP` take each
variable's ``row_axis`` (by default -1 for kernels, 0 for everything else) and the
same model gives the same numbers as in PyTorch.
"""

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from tether import core

from ._keras_common import (
    KERNEL_NAMES,
    _check,
    _check_row_axis,
    _copy_initializer,
    _is_empty,
    _is_real_floating,
    _listing,
    _no_grad,
    _outside_trace,
    _path,
    _same_path,
    default_row_axis,
)
from ._keras_ops import keras_namespace as _xp
from ._keras_tpgm import TPGM, TPGMCallback, wise_ft

if keras.backend.backend() == "torch":
    from . import _keras_torch
else:
    _keras_torch = None

__all__ = [
    "FTP",
    "KERNEL_NAMES",
    "L2SP",
    "MARSSP",
    "SGDFTP",
    "SPD",
    "TPGM",
    "AdamFTP",
    "AdamSPD",
    "TPGMCallback",
    "default_row_axis",
    "wise_ft",
]

ANCHOR_MODES = ("init", "zero")

#: What ``learning_rate`` may be: a float, a schedule, or a callable with no arguments.
LearningRate = float | keras.optimizers.schedules.LearningRateSchedule | Callable[[], Any]


def _float64_on_jax():
    """Let ``floatx="float64"`` mean float64 on JAX.

    Keras on JAX silently truncates float64 variables to float32 unless
    ``jax_enable_x64`` is set. A user who set ``keras.config.set_floatx("float64")``
    before importing this module asked for float64, so turn it on; otherwise
    nothing global is touched.
    """
    if keras.backend.backend() == "jax" and keras.config.floatx() == "float64":
        import jax

        if not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)


_float64_on_jax()


def _dense(gradient):
    """A dense gradient: TensorFlow gives embeddings ``IndexedSlices``; FTP's and SPD's sums span the tensor."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices):
            return tf.convert_to_tensor(gradient)
    return gradient


def _read(variable, dtype):
    """The value of a (model or optimizer) variable, as a tensor of ``dtype``."""
    return ops.cast(ops.convert_to_tensor(variable), dtype)


def _check_learning_rate(learning_rate):
    """A number must be finite and ``>= 0``; a schedule, a callable or a tensor is the base class's."""
    if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        _check("learning_rate", learning_rate, 0.0, math.inf, high_open=True)


def _is_nonzero(variable):
    """Whether any entry of ``variable`` is nonzero now (one host read of a bool; eager on TensorFlow)."""
    if _is_empty(variable):
        return False
    with _outside_trace():
        return bool(ops.any(ops.not_equal(variable.value, 0)))


def _after(value, previous):
    """``value``, computed only once the scalar ``previous`` is: a scheduling hint for XLA, not math.

    ``value − nan_to_num(0·|previous|)`` subtracts an exact +0 (NaN and ±inf included) that
    XLA cannot fold, so every value, −0.0 included, is unchanged. On JAX, each anchored
    variable's step waits for the previous one's last scalar (its decay strength or radius),
    so that XLA:CPU keeps one variable's full-size temporaries alive at a time; that measured
    about 13% off AdamSPD's update (``docs/benchmarks-keras.md``).
    """
    if previous is None:
        return value
    link = ops.nan_to_num(0 * ops.abs(previous), nan=0.0, posinf=0.0, neginf=0.0)
    return value - ops.cast(link, value.dtype)


class _AnchoredOptimizer(keras.optimizers.Optimizer):
    """What the three optimizers share: anchors, per-variable step counts, the update loop.

    Subclasses make their method's slots in `_build_slots`, return the base
    direction ``d`` (``θ̃ = θ − d``) from `_direction` and apply their constraint
    to anchored variables in `_constrain`. The FTP optimizers set `_uses_rows`: their
    MARS norm needs each variable's row axis.
    """

    #: whether the method's norm is per row (FTP's MARS), so that each variable has a row axis
    _uses_rows = False

    def __init__(self, learning_rate, *, weight_decay, anchor, **kwargs):
        _check_learning_rate(learning_rate)
        # The base class's own decoupled decay must never act: `weight_decay` is the
        # method's (see each class), applied inside `update_step`.
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        if anchor not in ANCHOR_MODES:
            raise ValueError(f"`anchor` must be one of {ANCHOR_MODES}, got {anchor!r}")
        # None is Keras's "no decay"
        self.weight_decay = _check(
            "weight_decay", 0.0 if weight_decay is None else weight_decay, 0.0, math.inf, high_open=True
        )
        self.anchor = anchor
        self.row_axis = None  # the FTP optimizers' (see `_FTP`)
        self._anchor_excluded_keys = set()
        # paths of the variables given by object, for the config (matching is by `_var_key`)
        self._anchor_excluded_var_paths = ()
        self._anchor_excluded_names = ()
        # from a saved config (see `get_config`): positions in the built variable list, and
        # the paths of variables excluded by object before the optimizer was built
        self._anchor_excluded_indices = set()
        self._anchor_excluded_paths = set()
        # each variable's row axis from a saved config, by position (see `get_config`)
        self._saved_row_axes = None
        # during a step on JAX: the scalar the next anchored variable waits for (see `_after`)
        self._link = None
        # what an optimizer saved before it was built holds (the iteration count, the rate)
        self._unbuilt_variable_count = len(self.variables)

    def _apply_weight_decay(self, variables):
        """A no-op: each method applies its own ``weight_decay`` (the base's would decay twice)."""

    def exclude_from_anchor(
        self, var_list: list | None = None, var_names: str | list[str] | None = None
    ) -> None:
        """Leave variables unanchored: no projection or selective decay, just the base step.

        Call it before the optimizer is built (before the first ``fit``), as with
        ``exclude_from_weight_decay``. Each call replaces the previous exclusions.
        The config records them (the variables of ``var_list`` by their paths until the
        optimizer is built, then every excluded variable by its position in the variable
        list, as Keras saves the optimizer's variables), so a model saved with
        ``model.save`` and reloaded with ``keras.saving.load_model`` keeps them, before or
        after the first ``fit``.

        Args:
            var_list: variables to exclude, for example ``model.get_layer("head").weights``
                (or one variable).
            var_names: a string or a list of strings; a variable whose name or path
                contains any of them is excluded (``"head"`` matches every weight of a
                layer named ``head``).
        """
        if self.built:
            raise ValueError(
                "`exclude_from_anchor()` must be called before the optimizer is built "
                "(before the first `fit` or `apply_gradients`): the anchors are made in `build()`."
            )
        if var_list is not None and hasattr(var_list, "shape"):  # one variable, not a list of them
            var_list = [var_list]
        if isinstance(var_names, str):  # one name, not its characters
            var_names = [var_names]
        var_list = list(var_list or ())
        self._anchor_excluded_keys = {self._var_key(v) for v in var_list}
        self._anchor_excluded_var_paths = tuple(_path(v) for v in var_list)
        self._anchor_excluded_names = tuple(str(n) for n in (var_names or ()))
        self._anchor_excluded_indices = set()
        self._anchor_excluded_paths = set()

    def anchor_mode(self, variable) -> str | None:
        """``"init"``, ``"zero"`` or ``None`` (unanchored) for a model variable."""
        if self.built and self._var_key(variable) in self._trainable_variables_indices:
            return self._modes[self._get_variable_index(variable)]
        return None if self._excluded(variable) else self.anchor

    def _excluded(self, variable, index=None):
        path = _path(variable)
        return (
            index in self._anchor_excluded_indices
            or self._var_key(variable) in self._anchor_excluded_keys
            or any(_same_path(saved, path) for saved in self._anchor_excluded_paths)
            or any(n in variable.name or n in path for n in self._anchor_excluded_names)
        )

    def _slot(self, variable, name, shape=None, dtype=None, initializer="zeros"):
        """An optimizer variable for ``variable``, named as ``add_variable_from_reference`` names it."""
        if shape is None and dtype is None and initializer == "zeros":
            return self.add_variable_from_reference(variable, name=name)
        prefix = getattr(variable, "path", None) or str(variable.name).replace(":", "_")
        return self.add_variable(
            shape=variable.shape if shape is None else shape,
            initializer=initializer,
            dtype=variable.dtype if dtype is None else dtype,
            name=f"{prefix.replace('/', '_')}_{name}",
        )

    def _check_variables(self, var_list):
        """A ``TypeError`` naming the first variable that is not real floating-point (complex, int, bool)."""
        for variable in var_list:
            if not _is_real_floating(variable.dtype):
                raise TypeError(
                    f"{type(self).__name__} updates real floating-point variables; "
                    f"`{_path(variable)}` is {keras.backend.standardize_dtype(variable.dtype)}"
                )

    def build(self, var_list):
        """Make the state of every variable: its step count, its anchor, and the method's slots.

        Everything that can be wrong with ``var_list`` (a complex or integer variable, a
        ``row_axis`` out of range) raises before any state is made.
        """
        if self.built:
            return
        var_list = list(var_list)
        self._check_variables(var_list)
        row_axes = self._resolve_row_axes(var_list, self._saved_row_axes) if self._uses_rows else None
        super().build(var_list)
        self._row_axes = row_axes
        self._modes, self._steps, self._anchors = [], [], []
        for index, variable in enumerate(var_list):
            used = not self._overwrite_variable_with_gradient(variable)
            mode = None if not used or self._excluded(variable, index) else self.anchor
            self._modes.append(mode)
            # Each variable counts its own steps (ALGORITHMS.md §0): one whose gradient
            # is None in a step is filtered out by the base class and must not advance,
            # which `self.iterations + 1` would get wrong.
            counted = used and self._counts_steps(mode)
            self._steps.append(self._slot(variable, "step", shape=(), dtype="int") if counted else None)
            anchor = None
            if mode == "init":
                # made outside the traced train step (TensorFlow), so jit_compile can lift it
                with _outside_trace():
                    anchor = self._slot(variable, "anchor", initializer=_copy_initializer(variable))
            self._anchors.append(anchor)
        self._build_slots(var_list)

    def _counts_steps(self, mode):
        """Whether a variable in anchor ``mode`` (``None``: unanchored) keeps a step count."""
        return True

    def _build_slots(self, var_list):
        raise NotImplementedError

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # an empty variable has nothing to update (and no step to count)
        pairs = [(g, v) for g, v in zip(grads, trainable_variables) if not _is_empty(v)]
        # checked for every variable before the first is updated: nothing is half-done
        for gradient, variable in pairs:
            if not _is_real_floating(gradient.dtype):
                raise TypeError(
                    f"{type(self).__name__}: the gradient of `{_path(variable)}` is "
                    f"{keras.backend.standardize_dtype(gradient.dtype)}, not real floating-point"
                )
        if not pairs:
            return
        grads, trainable_variables = (list(x) for x in zip(*pairs))
        with _no_grad():
            if _keras_torch is not None:
                # in place, multi-tensor, as Keras's own torch optimizers do
                _keras_torch.update(self, grads, trainable_variables, learning_rate)
            else:
                self._link = None
                super()._backend_update_step(grads, trainable_variables, learning_rate)
                self._link = None

    def _torch_step(self, mode, indices, params, grads, t, lr):
        """One in-place step of a bucket of variables on the torch backend (`_keras_torch.update`)."""
        raise NotImplementedError

    def update_step(self, gradient, variable, learning_rate):
        """One step of one variable: base direction, then the method's constraint if anchored."""
        index = self._get_variable_index(variable)
        # At least float32: a bfloat16/float16 variable and its state are stored in
        # their dtype and stepped in float32 (TensorFlow does not promote mixed dtypes).
        dtype = _xp.result_type(variable.dtype, _xp.float32)
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(_dense(gradient), dtype)
        param = _read(variable, dtype)
        step = ops.convert_to_tensor(self._steps[index]) + 1
        direction = self._direction(index, grad, param, step, lr)
        mode = self._modes[index]
        if mode is None:
            new_param = param - direction
        else:
            anchor = _read(self._anchors[index], dtype) if mode == "init" else None
            param = _after(param, self._link)
            new_param, link = self._constrain(index, param, direction, anchor, grad, step)
            if keras.backend.backend() == "jax":
                self._link = link
        self.assign(self._steps[index], step)
        self.assign(variable, new_param)

    def _direction(self, index, grad, param, step, lr):
        raise NotImplementedError

    def _constrain(self, index, param, direction, anchor, grad, step):
        """The new value of an anchored variable, and a scalar computed last (for `_after`)."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(self._anchor_config())
        return config

    def _anchor_config(self):
        """``anchor`` and, when any, the exclusions (see `exclude_from_anchor`)."""
        config = {"anchor": self.anchor}
        # Variables themselves cannot go in a config. Before the optimizer is built, those
        # given by object are recorded by path; once it is built, every excluded one by its
        # position (`load_model` rebuilds on the same variable list, as the optimizer's own
        # variables are saved by position too).
        indices = sorted(self._anchor_excluded_indices)
        paths = sorted(set(self._anchor_excluded_var_paths) | self._anchor_excluded_paths)
        if self.built:
            indices = [i for i, mode in enumerate(self._modes) if mode is None]
            paths = []
        if indices or paths or self._anchor_excluded_names:
            config["anchor_exclusions"] = {
                "var_names": list(self._anchor_excluded_names),
                "var_paths": paths,
                "var_indices": indices,
            }
        return config

    def load_own_variables(self, store):
        """Load the optimizer's state from a ``.keras`` file (``keras.saving.load_model``).

        ``load_model`` builds the optimizer when it compiles the model, before the weights
        are loaded. When the file's optimizer had not been built yet (the model was saved
        before its first ``fit``), its anchors are taken again now, from the weights just
        loaded (Keras loads a model's layers before its optimizer): the anchors a ``fit``
        would have taken from them.
        """
        unbuilt = self._unbuilt_variables()
        if not (self.built and len(store.keys()) == len(unbuilt) < len(self.variables)):
            super().load_own_variables(store)
            return
        for i, variable in enumerate(unbuilt):
            variable.assign(store[str(i)])
        for anchor, variable in zip(self._anchors, self._trainable_variables):
            if anchor is not None:
                # a copy: on JAX a shared buffer would be donated twice by the train step
                anchor.assign(_copy_initializer(variable)(anchor.shape, anchor.dtype))

    def _unbuilt_variables(self):
        """The variables an unbuilt optimizer has (and saves), in the order it saves them."""
        return self.variables[: self._unbuilt_variable_count]

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        exclusions = config.pop("anchor_exclusions", None)
        row_axes = config.pop("row_axes", None)
        optimizer = super().from_config(config, custom_objects=custom_objects)
        if exclusions:
            optimizer._anchor_excluded_names = tuple(exclusions.get("var_names", ()))
            optimizer._anchor_excluded_paths = set(exclusions.get("var_paths", ()))
            optimizer._anchor_excluded_indices = set(exclusions.get("var_indices", ()))
        if row_axes is not None:
            optimizer._saved_row_axes = [int(a) for a in row_axes]
        return optimizer


class _Rows:
    """The row axis of a MARS norm (a mixin before the optimizer's base): FTP's and MARS-SP's.

    Each variable's axis is resolved in ``build`` from ``row_axis`` (see `default_row_axis`)
    and recorded in the config by position.
    """

    _uses_rows = True

    def _resolve_row_axes(self, var_list, saved=None):
        """Each variable's row axis, non-negative (0 below 2 axes): ``saved`` by position, else the rule."""
        if saved is not None and len(saved) != len(var_list):
            saved = None  # another variable list than the one the config was saved with
        axes = []
        for index, variable in enumerate(var_list):
            if saved is not None:
                axis = saved[index]
            elif self.row_axis is None:
                axis = default_row_axis(variable)
            elif callable(self.row_axis):
                axis = self.row_axis(variable)
            else:
                axis = self.row_axis
            try:
                resolved = core.row_axis_of(len(variable.shape), axis)
            except (TypeError, ValueError) as error:
                raise type(error)(
                    f"`row_axis` of `{_path(variable)}` (shape {tuple(variable.shape)}): {error}"
                ) from None
            axes.append(0 if resolved is None else resolved)
        return axes

    def row_axis_of(self, variable) -> int:
        """The row axis (non-negative) of a model variable's MARS norm: resolved once built, else the rule."""
        if self.built and self._var_key(variable) in self._trainable_variables_indices:
            return self._row_axes[self._get_variable_index(variable)]
        return self._resolve_row_axes([variable])[0]

    def get_config(self):
        """``row_axis`` (an int or None), and once built each variable's resolved axis by position.

        A callable cannot be saved: once the optimizer is built, the axes it gave stand for
        it; before that, saving it raises.
        """
        config = super().get_config()
        config["row_axis"] = None if callable(self.row_axis) else self.row_axis
        row_axes = self._row_axes if self.built else self._saved_row_axes
        if row_axes is not None:
            config["row_axes"] = list(row_axes)
        elif callable(self.row_axis):
            raise ValueError(
                f"{type(self).__name__}: a callable `row_axis` cannot be saved in a config; build "
                "the optimizer first (`optimizer.build(model.trainable_variables)`, or after the "
                "first `fit`), and the config records the axis it gave each variable"
            )
        return config


class _FTP(_Rows):
    """FTP's part of `AdamFTP`, `SGDFTP` and `FTP` (a mixin before their base): its slots, its
    projection, and the warning about zero anchors.
    """

    def _build_ftp_slots(self, var_list):
        """FTP's radius (γ, m_γ, v_γ: 0-d, at least float32), c_prev and s_prev per anchored variable.

        ``s_prev = 1 / n`` is shaped by `core.mars_shape` on the variable's row axis and, as
        the radius, at least float32: in float16, ``1 / n`` overflows for small rows.
        """
        self._ftp = []
        for variable, mode, axis in zip(var_list, self._modes, self._row_axes):
            if mode is None:
                self._ftp.append(None)
                continue
            scalar = core.radius_dtype(variable.dtype, xp=_xp)
            inv_norm_shape = core.mars_shape(variable.shape, axis)
            self._ftp.append(
                core.FTPState(
                    radius=self._slot(variable, "radius", shape=(), dtype=scalar),
                    radius_exp_avg=self._slot(variable, "radius_exp_avg", shape=(), dtype=scalar),
                    radius_exp_avg_sq=self._slot(variable, "radius_exp_avg_sq", shape=(), dtype=scalar),
                    prev_displacement=self._slot(variable, "prev_displacement"),
                    prev_inv_norm=self._slot(variable, "prev_inv_norm", shape=inv_norm_shape, dtype=scalar),
                )
            )
        if self.anchor == "zero":
            self._warn_zero_anchor(var_list)

    def _ftp_constrain(self, index, param, direction, anchor, grad, step):
        slots = self._ftp[index]
        row_axis = self._row_axes[index]
        state = core.FTPState(*(_read(s, grad.dtype) for s in slots))
        if keras.backend.backend() == "jax":
            # the new displacement waits for ∇γ, the last read of the old one, so that XLA
            # writes it into the donated buffer instead of copying both (CSE merges the two ∇γ)
            radius_grad = core.radius_gradient(
                grad, state.prev_displacement, state.prev_inv_norm, k=self.k, row_axis=row_axis, xp=_xp
            )
            direction = _after(direction, radius_grad)
        new_param, new_state = core.ftp_project(
            param, direction, anchor, grad, state, step, k=self.k, row_axis=row_axis, xp=_xp
        )
        for slot, value in zip(slots, new_state):
            self.assign(slot, value)
        return new_param, new_state.radius

    def _warn_zero_anchor(self, var_list):
        """Warn when FTP projects a variable that is not zero around a zero anchor (it would be wiped)."""
        nonzero = [_path(v) for v, mode in zip(var_list, self._modes) if mode == "zero" and _is_nonzero(v)]
        if nonzero:
            warnings.warn(
                f"{type(self).__name__}(anchor='zero') anchors variables that are not zero: "
                f"{_listing(nonzero)}. FTP's radius starts at 1e-8, so their first step projects "
                "them to within 1e-8 of zero (a LoRA `A` factor would be wiped). For FTP, "
                "anchor them at their own initialisation (anchor='init', built after "
                "`enable_lora`); a zero anchor is SPD's recipe (decay toward zero).",
                UserWarning,
                stacklevel=3,
            )

    _constrain = _ftp_constrain


class _AdamBase(_AnchoredOptimizer):
    """Adam's hyperparameters, slots and direction (PyTorch's form, ALGORITHMS.md §3)."""

    def __init__(self, learning_rate, beta_1, beta_2, epsilon, amsgrad, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = _check("beta_1", beta_1, 0.0, 1.0, high_open=True)
        self.beta_2 = _check("beta_2", beta_2, 0.0, 1.0, high_open=True)
        self.epsilon = _check("epsilon", epsilon, 0.0, math.inf, high_open=True)
        if not isinstance(amsgrad, bool):
            raise ValueError(f"`amsgrad` must be a bool, got {amsgrad!r}")
        self.amsgrad = amsgrad

    def _build_adam_slots(self, var_list):
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self._velocity_hats = [None] * len(var_list)
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def _direction(self, index, grad, param, step, lr, weight_decay=0.0):
        slots = (self._momentums[index], self._velocities[index], self._velocity_hats[index])
        state = core.AdamState(*(None if s is None else _read(s, grad.dtype) for s in slots))
        direction, new_state = core.adam_direction(
            grad,
            state,
            step,
            lr=lr,
            beta1=self.beta_1,
            beta2=self.beta_2,
            eps=self.epsilon,
            amsgrad=self.amsgrad,
            weight_decay=weight_decay,
            param=param,
            xp=_xp,
        )
        for slot, value in zip(slots, new_state):
            if slot is not None:
                self.assign(slot, value)
        return direction

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, amsgrad=self.amsgrad)
        return config


@keras.saving.register_keras_serializable(package="tether")
class AdamFTP(_FTP, _AdamBase):
    r"""Adam with Fast Trainable Projection (FTP).

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023.
    Each anchored variable keeps its displacement from the anchor $\theta_0$
    inside a per-row (MARS) ball whose radius $\gamma$ is learned online by a
    small Adam of its own on $\partial L / \partial \gamma$:

    $$
    \begin{aligned}
    d &= \text{Adam}(g) + lr \cdot wd \cdot \theta \qquad
    c = (\theta - d) - \theta_0 \qquad n = \operatorname{MARS}(c) + 10^{-8} \\
    \nabla\gamma &= \textstyle\sum \operatorname{rowdot}(g, c_{prev}) \odot s_{prev}
    \quad (\times k \text{ when positive}) \\
    \gamma &\leftarrow \operatorname{clip}(\gamma - \text{AdamUtil}(\nabla\gamma),
    10^{-8}, \max n) \qquad
    \theta \leftarrow \theta_0 + \operatorname{clip}(\gamma / n, 0, 1) \odot c
    \end{aligned}
    $$

    with Adam in PyTorch's form,
    $\text{Adam}(g) = \frac{lr}{1 - \beta_1^t} \cdot \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}$.
    On a variable's first step $\gamma = 10^{-8}$, so it stays at its anchor;
    the radius grows from the second step on. Unanchored variables take
    $\theta \leftarrow \theta - d$. A row is an output unit: a kernel's last
    axis by default (see ``row_axis``). The radius, its moments and $s_{prev}$
    are at least float32; a 16-bit variable keeps its dtype.

    ``epsilon`` defaults to ``1e-8`` (Keras's ``Adam`` uses ``1e-7`` and places it
    differently) so that the same numbers come out as tether's PyTorch and JAX
    optimizers and the authors' code. The anchor is taken when the optimizer is
    built (the first ``fit``): load the pre-trained weights before that.

    Args:
        learning_rate: a float, a ``keras.optimizers.schedules.LearningRateSchedule``
            or a callable taking no arguments.
        beta_1: decay rate of the first moment, in ``[0, 1)``.
        beta_2: decay rate of the second moment, in ``[0, 1)``.
        epsilon: added to the bias-corrected $\sqrt{v}$ (PyTorch's placement).
        weight_decay: decoupled decay $wd$, inside the direction, so that it is
            projected too. Keras's own ``weight_decay`` mechanism is not used.
        amsgrad: use $\max(v^*, v)$ in place of $v$.
        k: in ``[0, 1]``; positive radius gradients (which would shrink
            $\gamma$) are multiplied by ``k``.
        anchor: ``"init"`` (the weights when the optimizer is built) or ``"zero"``
            (project around zero; for FTP, a LoRA adapter's natural anchor is its
            own initialisation, ``"init"``: see the docs).
        row_axis: the axis of each variable's output units, over which the MARS norm
            keeps one value per row: an int for every variable, a callable
            ``variable -> int``, or ``None`` for `default_row_axis` (-1 for a kernel,
            so that a ``Dense`` layer has the norms of the same PyTorch ``Linear``; 0
            for everything else).
        **kwargs: the base optimizer's arguments (``clipnorm``, ``global_clipnorm``,
            ``clipvalue``, ``use_ema``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        k: float = 1.0,
        anchor: str = "init",
        row_axis: int | Callable[[Any], int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate,
            beta_1,
            beta_2,
            epsilon,
            amsgrad,
            weight_decay=weight_decay,
            anchor=anchor,
            **kwargs,
        )
        self.k = _check("k", k, 0.0, 1.0)
        self.row_axis = _check_row_axis(row_axis)

    def _build_slots(self, var_list):
        self._build_adam_slots(var_list)
        self._build_ftp_slots(var_list)

    def _direction(self, index, grad, param, step, lr):
        return super()._direction(index, grad, param, step, lr, weight_decay=self.weight_decay)

    def _torch_step(self, mode, indices, params, grads, t, lr):
        _keras_torch.adam_ftp(self, mode, indices, params, grads, t, lr)

    def get_config(self):
        config = super().get_config()
        config["k"] = self.k
        return config


@keras.saving.register_keras_serializable(package="tether")
class SGDFTP(_FTP, _AnchoredOptimizer):
    r"""SGD with Fast Trainable Projection (FTP).

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023.
    The base step is SGD in PyTorch's form (coupled decay, momentum buffer set to
    the first step's update):

    $$
    \begin{aligned}
    u &= g + wd \cdot \theta \qquad
    b = u \text{ (first step)}, \; b \leftarrow \mu b + (1 - \tau) u \qquad
    u \leftarrow u + \mu b \text{ (nesterov) else } b \qquad d = lr \cdot u
    \end{aligned}
    $$

    then, for each anchored variable, FTP's projection as in `AdamFTP`:
    $c = (\theta - d) - \theta_0$, the radius $\gamma$ updated by its own
    Adam, $\theta \leftarrow \theta_0 + \operatorname{clip}(\gamma / n, 0, 1) \odot c$.
    Unanchored variables take $\theta \leftarrow \theta - d$.

    Args:
        learning_rate: a float, a ``LearningRateSchedule`` or a callable.
        momentum: $\mu \ge 0$; no momentum buffer is kept when it is 0.
        dampening: $\tau$, in ``[0, 1]``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: coupled L2 decay $wd$ added to the gradient.
        k: in ``[0, 1]``; positive radius gradients are multiplied by ``k``.
        anchor: ``"init"`` or ``"zero"``.
        row_axis: the axis of each variable's output units, as in `AdamFTP`.
        **kwargs: the base optimizer's arguments.
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.01,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        k: float = 1.0,
        anchor: str = "init",
        row_axis: int | Callable[[Any], int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(learning_rate, weight_decay=weight_decay, anchor=anchor, **kwargs)
        self.momentum = _check("momentum", momentum, 0.0, math.inf, high_open=True)
        self.dampening = _check("dampening", dampening, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"`nesterov` must be a bool, got {nesterov!r}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs `momentum > 0` and `dampening == 0`")
        self.nesterov = nesterov
        self.k = _check("k", k, 0.0, 1.0)
        self.row_axis = _check_row_axis(row_axis)

    def _build_slots(self, var_list):
        self._momentums = [None] * len(var_list)
        if self.momentum != 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._build_ftp_slots(var_list)

    def _direction(self, index, grad, param, step, lr):
        slot = self._momentums[index]
        state = core.SGDState(None if slot is None else _read(slot, grad.dtype))
        direction, new_state = core.sgd_direction(
            grad,
            param,
            state,
            step,
            lr=lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
            xp=_xp,
        )
        if slot is not None:
            self.assign(slot, new_state.momentum_buffer)
        return direction

    def _torch_step(self, mode, indices, params, grads, t, lr):
        _keras_torch.sgd_ftp(self, mode, indices, params, grads, t, lr)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov, k=self.k)
        return config


@keras.saving.register_keras_serializable(package="tether")
class AdamSPD(_AdamBase):
    r"""Adam with Selective Projection Decay (SPD).

    Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation
    Models", NeurIPS 2024. After Adam's step $\tilde\theta = \theta - d$ (no
    decay term), an anchored variable whose gradient pushes it away from its anchor
    is decayed toward the anchor, by how much this step moved it away:

    $$
    \begin{aligned}
    c &= -\langle g, \theta - \theta_0 \rangle \qquad
    r = \operatorname{clip}\Big(\frac{\|\tilde\theta - \theta_0\|_2
    - \|\theta - \theta_0\|_2}{\|\tilde\theta - \theta_0\|_2}, 0, 1\Big) \\
    \theta &\leftarrow \tilde\theta - \lambda \, r \, (\tilde\theta - \theta_0)
    \text{ if } c < 0 \text{, else } \tilde\theta
    \end{aligned}
    $$

    $\lambda$ is ``weight_decay``, not multiplied by the learning rate.
    Unanchored variables take the plain Adam step with no decay at all (give a new
    head ``anchor="zero"`` through a second optimizer to decay it toward zero).

    ``epsilon`` defaults to ``1e-8`` (Keras's ``Adam`` uses ``1e-7`` and places it
    differently) so that the same numbers come out as tether's PyTorch and JAX
    optimizers and the authors' code. The anchor is taken when the optimizer is
    built (the first ``fit``): load the pre-trained weights before that.

    Args:
        learning_rate: a float, a ``LearningRateSchedule`` or a callable.
        beta_1: decay rate of the first moment, in ``[0, 1)``.
        beta_2: decay rate of the second moment, in ``[0, 1)``.
        epsilon: added to the bias-corrected $\sqrt{v}$ (PyTorch's placement).
        weight_decay: $\lambda \ge 0$, the strength of the selective decay.
        amsgrad: use $\max(v^*, v)$ in place of $v$.
        anchor: ``"init"`` (the weights when the optimizer is built) or ``"zero"``.
        **kwargs: the base optimizer's arguments.
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        anchor: str = "init",
        **kwargs: Any,
    ):
        super().__init__(
            learning_rate,
            beta_1,
            beta_2,
            epsilon,
            amsgrad,
            weight_decay=weight_decay,
            anchor=anchor,
            **kwargs,
        )

    def _build_slots(self, var_list):
        self._build_adam_slots(var_list)

    def _constrain(self, index, param, direction, anchor, grad, step):
        # core.spd_step, with the decay strength at hand for `_after`
        statistics = core.spd_statistics(param, anchor, grad, xp=_xp)
        new_param = param - direction
        displacement = new_param if anchor is None else new_param - anchor
        strength = core.decay_strength(
            statistics, core.l2_norm(displacement, xp=_xp), self.weight_decay, xp=_xp
        )
        return core.decay_toward_anchor(new_param, anchor, strength, xp=_xp), strength

    def _torch_step(self, mode, indices, params, grads, t, lr):
        _keras_torch.adam_spd(self, mode, indices, params, grads, t, lr)


class _Wrapper(_AnchoredOptimizer):
    """Around a Keras optimizer (ALGORITHMS.md §6, §8): the anchors and the method's state here,
    the base step the wrapped optimizer's own ``apply``, as ``LossScaleOptimizer`` wraps one.

    The wrapped optimizer owns the learning rate (and its schedule), the iteration count,
    gradient clipping, loss scaling, EMA and gradient accumulation; ``variables`` is the
    wrapper's and then the wrapped optimizer's, so ``model.save`` and ``stateless_apply``
    (JAX) carry both. Subclasses adjust the gradients in `_before` and the variables in
    `_after`.
    """

    #: whether the method changes θ after the wrapped step: the wrapped optimizer must then apply
    #: every step (no gradient accumulation) and average no unprojected weights (no EMA)
    _changes_weights = True

    def __init__(self, optimizer, *, anchor="init", weight_decay=0.0, name=None):
        _check_wrapped(type(self).__name__, optimizer, self._changes_weights)
        # the learning rate is the wrapped optimizer's (see `learning_rate`)
        super().__init__(0.0, weight_decay=weight_decay, anchor=anchor, name=name)
        self.inner_optimizer = optimizer
        # what an unbuilt wrapper saves: its iteration count and rate, then the wrapped optimizer's
        self._unbuilt_counts = (len(self._variables), len(optimizer.variables))

    def __dir__(self):
        # `keras.saving` saves and loads the children it finds in dir(): the wrapped optimizer's
        # variables are in the wrapper's own (`variables`) already, so a file holds them once and
        # an unbuilt wrapper's file loads into a built one (`load_own_variables`)
        return [name for name in super().__dir__() if name != "inner_optimizer"]

    @property
    def variables(self):
        inner = getattr(self, "inner_optimizer", None)
        return self._variables[:] + ([] if inner is None else inner.variables)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def loss_scale_factor(self):
        inner = getattr(self, "inner_optimizer", None)
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # a LossScaleOptimizer around the wrapper turns the wrapped optimizer's scaling off
        inner = getattr(self, "inner_optimizer", None)
        if inner is not None:
            inner.loss_scale_factor = value

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def _counts_steps(self, mode):
        return False

    def _build_slots(self, var_list):
        self.inner_optimizer.build(var_list)

    def _unbuilt_variables(self):
        own, inner = self._unbuilt_counts
        return self._variables[:own] + self.inner_optimizer.variables[:inner]

    def apply(self, grads, trainable_variables=None):
        """The method's work before the wrapped optimizer's ``apply`` and after it.

        Everything that can be wrong with the gradients (one that is not real floating-point)
        raises before any variable is updated.
        """
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    f"{type(self).__name__}: pass the variables, or build the optimizer first "
                    "(`optimizer.build(model.trainable_variables)`)"
                )
            variables = self._trainable_variables
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
            self._check_variables_are_known(variables)
        if len(grads) != len(variables):
            raise ValueError(f"{type(self).__name__}: {len(grads)} gradients for {len(variables)} variables")
        for gradient, variable in zip(grads, variables):
            if gradient is not None and not _is_real_floating(gradient.dtype):
                raise TypeError(
                    f"{type(self).__name__}: the gradient of `{_path(variable)}` is "
                    f"{keras.backend.standardize_dtype(gradient.dtype)}, not real floating-point"
                )
        # (position, index, variable) of each anchored variable this step moves
        work = []
        for position, (gradient, variable) in enumerate(zip(grads, variables)):
            index = self._get_variable_index(variable)
            if gradient is not None and not _is_empty(variable) and self._modes[index] is not None:
                work.append((position, index, variable))
        with _no_grad():
            grads, context = self._before(grads, variables, work)
            self.inner_optimizer.apply(grads, trainable_variables)
            self._after(work, context)

    def _before(self, grads, variables, work):
        """The gradients the wrapped optimizer steps with, and what `_after` needs."""
        return grads, None

    def _after(self, work, context):
        """The method's update of the anchored variables after the wrapped step."""

    def _processed(self, grads, variables):
        """The gradients as the wrapped optimizer steps with them (unscaled, clipped), by position.

        FTP's radius gradient and SPD's condition take them, as the fused optimizers take the
        gradient the base class hands their ``update_step``.
        """
        inner = self.inner_optimizer
        kept = [
            i
            for i, (g, v) in enumerate(zip(grads, variables))
            if g is not None and not inner._overwrite_variable_with_gradient(v)
        ]
        values = [_dense(grads[i]) for i in kept]
        if inner.loss_scale_factor is not None:
            values = [g / inner.loss_scale_factor for g in values]
        processed = [None] * len(grads)
        for i, value in zip(kept, inner._clip_gradients(values)):
            processed[i] = value
        return processed

    def _compute(self, variable, index):
        """``(dtype, θ, θ₀)``: at least float32 (a 16-bit variable is computed in float32)."""
        dtype = _xp.result_type(variable.dtype, _xp.float32)
        anchor = _read(self._anchors[index], dtype) if self._modes[index] == "init" else None
        return dtype, _read(variable, dtype), anchor

    def get_config(self):
        """The wrapped optimizer (serialized), ``anchor`` and the exclusions; the subclass's own arguments."""
        config = {"name": self.name, "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}
        config.update(self._anchor_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        return super().from_config(config, custom_objects=custom_objects)


def _check_wrapped(owner, optimizer, changes_weights):
    """Raise unless ``optimizer`` is an unbuilt Keras optimizer the wrapper can step."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            f"{owner}: optimizer must be a keras.optimizers.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            f"{owner}: wrap the optimizer itself, not a LossScaleOptimizer (`compile` puts one "
            "around the wrapper under the mixed_float16 policy)"
        )
    if isinstance(optimizer, _AnchoredOptimizer):
        raise ValueError(f"{owner}: wrap a Keras optimizer, not tether's {type(optimizer).__name__}")
    if optimizer.built:
        raise ValueError(f"{owner}: the wrapped optimizer is already built; wrap a new one")
    if changes_weights and optimizer.use_ema:
        raise ValueError(
            f"{owner}: the wrapped optimizer has use_ema=True; its average would be of the weights "
            "before the projection"
        )
    if changes_weights and optimizer.gradient_accumulation_steps:
        raise ValueError(
            f"{owner}: the wrapped optimizer has gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps}; the method must follow every update it applies"
        )


@keras.saving.register_keras_serializable(package="tether")
class FTP(_FTP, _Wrapper):
    r"""Fast Trainable Projection around any Keras optimizer.

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023
    (``ALGORITHMS.md`` §6). After the wrapped optimizer's step $\tilde\theta$, each anchored
    variable is projected with the learned radius $\gamma$ of `AdamFTP`:

    $$
    c = \tilde\theta - \theta_0, \quad n = \operatorname{MARS}(c) + 10^{-8}, \quad
    \gamma \leftarrow \operatorname{clip}(\gamma - \text{AdamUtil}(\nabla\gamma), 10^{-8}, \max n),
    \quad \theta \leftarrow \theta_0 + \operatorname{clip}(\gamma / n, 0, 1) \odot c
    $$

    with $\nabla\gamma = \sum \operatorname{rowdot}(g, c_{prev}) \odot s_{prev}$ ($\times k$
    when positive). The base's own weight decay (``AdamW``'s), if any, is inside
    $\tilde\theta$ and projected too. ``FTP(keras.optimizers.SGD(...))`` equals `SGDFTP` up
    to rounding where the two base steps are the same (SGD with momentum and a constant
    learning rate; Keras's ``Adam`` places $\epsilon$ differently from tether's).

    $g$ is the gradient as the wrapped optimizer steps with it (unscaled and clipped by
    it). The learning rate, its schedule, clipping and the iteration count are the wrapped
    optimizer's; its ``use_ema`` and ``gradient_accumulation_steps`` must be off.

    Args:
        optimizer: the base ``keras.optimizers.Optimizer``, not built yet.
        k: in ``[0, 1]``; positive radius gradients are multiplied by ``k``.
        anchor: ``"init"`` (the weights when the optimizer is built) or ``"zero"``.
        row_axis: the axis of each variable's output units, as in `AdamFTP`.
        name: the optimizer's name.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        *,
        k: float = 1.0,
        anchor: str = "init",
        row_axis: int | Callable[[Any], int] | None = None,
        name: str | None = None,
    ):
        k = _check("k", k, 0.0, 1.0)
        row_axis = _check_row_axis(row_axis)
        super().__init__(optimizer, anchor=anchor, name=name)
        self.k = k
        self.row_axis = row_axis

    def _counts_steps(self, mode):
        return mode is not None

    def _build_slots(self, var_list):
        super()._build_slots(var_list)
        self._build_ftp_slots(var_list)

    def _before(self, grads, variables, work):
        return grads, self._processed(grads, variables)

    def _after(self, work, processed):
        for position, index, variable in work:
            dtype, param, anchor = self._compute(variable, index)
            step = ops.convert_to_tensor(self._steps[index]) + 1
            grad = ops.cast(processed[position], dtype)
            # θ̃ is the variable now: a zero direction makes core.ftp_project's c = θ̃ − θ₀ exactly
            new_param, _ = self._ftp_constrain(index, param, ops.zeros((), dtype), anchor, grad, step)
            self.assign(self._steps[index], step)
            self.assign(variable, new_param)

    def get_config(self):
        config = super().get_config()
        config["k"] = self.k
        return config


@keras.saving.register_keras_serializable(package="tether")
class SPD(_Wrapper):
    r"""Selective Projection Decay around any Keras optimizer that does not decay weights itself.

    Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models",
    NeurIPS 2024 (``ALGORITHMS.md`` §6). Before the wrapped step it measures
    $\langle g, \theta - \theta_0 \rangle$ and $\|\theta - \theta_0\|_2$ per anchored
    variable; after it, where $c = -\langle g, \theta - \theta_0 \rangle < 0$:

    $$
    \theta \leftarrow \tilde\theta - \lambda\, r\, (\tilde\theta - \theta_0), \qquad
    r = \operatorname{clip}\Big(\frac{\|\tilde\theta - \theta_0\|_2 - \|\theta - \theta_0\|_2}
    {\|\tilde\theta - \theta_0\|_2}, 0, 1\Big)
    $$

    ``SPD(adam_like, weight_decay=λ)`` equals `AdamSPD` up to rounding where the two Adam
    steps are the same (Keras's ``Adam`` adds $\epsilon$ before the second moment's bias
    correction, tether's after it: equal when $\epsilon$ is negligible). $g$ is the gradient
    as the wrapped optimizer steps with it.

    Args:
        optimizer: the base ``keras.optimizers.Optimizer``, not built yet, whose own
            ``weight_decay`` is unset (SPD replaces weight decay; ``AdamW`` decays by default).
        weight_decay: SPD's $\lambda \ge 0$ (not multiplied by the learning rate).
        anchor: ``"init"`` or ``"zero"``.
        name: the optimizer's name.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        *,
        weight_decay: float,
        anchor: str = "init",
        name: str | None = None,
    ):
        own = getattr(optimizer, "weight_decay", None)
        if own:
            raise ValueError(
                f"SPD: the wrapped optimizer has weight_decay={own!r}; SPD replaces weight decay, "
                "so the base's must be None or 0"
            )
        super().__init__(optimizer, anchor=anchor, weight_decay=weight_decay, name=name)

    def _before(self, grads, variables, work):
        processed = self._processed(grads, variables)
        statistics = []
        for position, index, variable in work:
            dtype, param, anchor = self._compute(variable, index)
            statistics.append(
                core.spd_statistics(param, anchor, ops.cast(processed[position], dtype), xp=_xp)
            )
        return grads, statistics

    def _after(self, work, statistics):
        for (_, index, variable), measured in zip(work, statistics, strict=True):
            _, new_param, anchor = self._compute(variable, index)
            self.assign(variable, core.spd_decay(new_param, anchor, measured, self.weight_decay, xp=_xp))

    def get_config(self):
        config = super().get_config()
        config["weight_decay"] = self.weight_decay
        return config


@keras.saving.register_keras_serializable(package="tether")
class L2SP(_Wrapper):
    r"""L2-SP around any Keras optimizer: an L2 penalty toward the anchor, seen as a gradient term.

    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks", ICML 2018 (``ALGORITHMS.md`` §8). The loss gains
    $\frac{\alpha}{2} \|\theta - \theta_0\|_2^2$ over the anchored variables, so the wrapped
    optimizer steps on

    $$
    g \leftarrow g + \alpha\,(\theta - \theta_0)
    $$

    and its momentum or Adam's moments see the penalty; so do its gradient clipping (as if
    the penalty were in the loss) and its gradient accumulation and EMA, which L2-SP allows.
    Unanchored variables (a new head) take the plain step.

    Args:
        optimizer: the base ``keras.optimizers.Optimizer``, not built yet.
        alpha: the penalty's strength $\alpha \ge 0$.
        anchor: ``"init"`` or ``"zero"`` (the plain L2 penalty $\frac{\alpha}{2}\|\theta\|^2$).
        name: the optimizer's name.
    """

    _changes_weights = False

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        *,
        alpha: float,
        anchor: str = "init",
        name: str | None = None,
    ):
        alpha = _check("alpha", alpha, 0.0, math.inf, high_open=True)
        super().__init__(optimizer, anchor=anchor, name=name)
        self.alpha = alpha

    def _before(self, grads, variables, work):
        # the wrapped optimizer divides by its loss scale: the penalty is scaled to match
        scale = self.inner_optimizer.loss_scale_factor
        alpha = self.alpha if scale is None else self.alpha * scale
        grads = list(grads)
        for position, index, variable in work:
            gradient = _dense(grads[position])
            dtype, param, anchor = self._compute(variable, index)
            penalized = core.l2_sp_gradient(ops.cast(gradient, dtype), param, anchor, alpha, xp=_xp)
            grads[position] = ops.cast(penalized, gradient.dtype)
        return grads, None

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config


@keras.saving.register_keras_serializable(package="tether")
class MARSSP(_Rows, _Wrapper):
    r"""MARS-SP around any Keras optimizer: after each step, the projection onto a fixed MARS ball.

    Gouk, Hospedales, Pontil, "Distance-Based Regularisation of Deep Networks for Fine-Tuning",
    ICLR 2021 (``ALGORITHMS.md`` §8). After the wrapped optimizer's step $\tilde\theta$, each
    anchored variable is projected, row by row (the output units), onto the ball of radius
    $\gamma$:

    $$
    c = \tilde\theta - \theta_0, \quad n = \operatorname{MARS}(c), \quad
    \theta \leftarrow \theta_0 + \operatorname{clip}(\gamma / n, 0, 1) \odot c
    $$

    Rows inside the ball are untouched. FTP (`FTP`, `AdamFTP`) learns this radius per
    variable instead. The wrapped optimizer's ``use_ema`` and ``gradient_accumulation_steps``
    must be off.

    Args:
        optimizer: the base ``keras.optimizers.Optimizer``, not built yet.
        radius: the fixed radius $\gamma \ge 0$ of every anchored variable's rows.
        anchor: ``"init"`` or ``"zero"``.
        row_axis: the axis of each variable's output units, as in `AdamFTP` (``None``: -1 for
            a kernel, 0 for everything else).
        name: the optimizer's name.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        *,
        radius: float,
        anchor: str = "init",
        row_axis: int | Callable[[Any], int] | None = None,
        name: str | None = None,
    ):
        radius = _check("radius", radius, 0.0, math.inf, high_open=True)
        row_axis = _check_row_axis(row_axis)
        super().__init__(optimizer, anchor=anchor, name=name)
        self.radius = radius
        self.row_axis = row_axis

    def _after(self, work, context):
        for _, index, variable in work:
            _, new_param, anchor = self._compute(variable, index)
            projected = core.mars_sp_project(
                new_param, anchor, self.radius, row_axis=self._row_axes[index], xp=_xp
            )
            self.assign(variable, projected)

    def get_config(self):
        config = super().get_config()
        config["radius"] = self.radius
        return config
