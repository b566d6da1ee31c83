r"""TPGM and WiSE-FT for Keras 3 (``ALGORITHMS.md`` §7, §8), re-exported by `tether.adapters.keras`.

TPGM learns its constraints with the backend's own autodiff on the model called statelessly
(in a ``keras.StatelessScope``, as ``model.stateless_call`` does, but through ``model(x,
training=False)``): ``tf.GradientTape`` on TensorFlow, ``jax.value_and_grad`` (compiled with
``jax.jit``) on JAX, ``torch.autograd`` on torch. The math is `tether.core`'s, through the
``keras.ops`` namespace.
"""

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from tether import core

from ._keras_common import (
    _check,
    _check_row_axis,
    _float64_kept,
    _is_empty,
    _is_real_floating,
    _listing,
    _no_grad,
    _path,
    _same_path,
    default_row_axis,
)
from ._keras_ops import keras_namespace as _xp

__all__ = ["TPGM", "TPGMCallback", "wise_ft"]

#: The constraints' Adam (PyTorch's Adam, no weight decay), as in the authors' code.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

#: The keys of `TPGM.get_state` that are not per variable.
_STATE_KEYS = ("method", "norm", "learning_rate", "steps", "paths")
_PER_VARIABLE = ("anchor", "constraint", "exp_avg", "exp_avg_sq")


def _check_learning_rate(learning_rate):
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, numbers.Real)
        or not math.isfinite(learning_rate)
        or learning_rate < 0
    ):
        raise ValueError(f"TPGM: `learning_rate` must be a finite number >= 0, got {learning_rate!r}")
    return float(learning_rate)


def _value(variable):
    """A variable's value, cut from any autodiff graph (torch keeps its parameters' ``requires_grad``)."""
    return ops.stop_gradient(ops.convert_to_tensor(variable))


def _wide(x):
    """``x`` in at least float32."""
    return ops.cast(x, _xp.result_type(x.dtype, _xp.float32))


def _copy(variable):
    """A copy of a variable's value in its own buffer (JAX's trainer donates the variables' buffers)."""
    return ops.copy(_value(variable))


def _value_and_gradients(objective, constraints, context):
    """``(L, [∂L/∂γ])`` of ``objective(constraints, context)`` by the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(constraints)
            loss = objective(constraints, context)
        grads = tape.gradient(loss, constraints, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, list(grads)
    if backend == "jax":
        return objective(constraints, context)  # already jax.value_and_grad under jax.jit
    if backend == "torch":
        import torch

        leaves = [g.detach().requires_grad_(True) for g in constraints]
        with torch.enable_grad():
            loss = objective(leaves, context)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(g) if d is None else d for g, d in zip(leaves, grads, strict=True)]
        return loss.detach(), grads
    raise NotImplementedError(f"TPGM does not support the {backend!r} backend")


def _resolve_loss(model, loss):
    """The loss TPGM evaluates: ``loss`` if given, else the model's compiled one (a single output)."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "TPGM: the model was not compiled with a loss; pass `loss=` (a `keras.losses.Loss` or "
                "a function `loss(y_true, y_pred)`)"
            )
        if isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                "TPGM: the model's compiled loss has several outputs; pass `loss=` (a function of "
                "`(y_true, y_pred)` for the model's whole output)"
            )
    try:
        return keras.losses.get(loss) if isinstance(loss, str) else loss
    except ValueError as error:
        raise ValueError(f"TPGM: unknown loss {loss!r}: {error}") from None


def _mean_loss(loss, y, y_pred, sample_weight):
    """A scalar: a `keras.losses.Loss` reduces itself; a function's values are averaged over the batch."""
    if isinstance(loss, keras.losses.Loss):
        return loss(y, y_pred, sample_weight=sample_weight)
    values = loss(y, y_pred)
    if sample_weight is not None:
        values = values * ops.cast(sample_weight, values.dtype)
    return ops.mean(values) if len(values.shape) else values


class TPGM:
    r"""Trainable Projected Gradient Method: per-variable constraints learned on validation data.

    Tian et al., "Trainable Projected Gradient Method for Robust Fine-Tuning", CVPR 2023
    (``ALGORITHMS.md`` §7). Each anchored variable (a trainable variable of ``model`` when
    TPGM is made, i.e. the pre-trained weights, unless ``exclude`` names it) has a
    constraint $\gamma$. One call of `step`, with the fine-tuned weights $\theta$ held fixed:

    $$
    c = \theta - \theta_0, \quad n = \mathrm{norm}(c), \quad
    r = \mathrm{clip}\Big(\frac{\gamma}{n + 10^{-8}}, 0, 1\Big), \quad
    \theta_p = \theta_0 + r \odot c
    $$

    ``iters`` times: $\gamma \leftarrow \mathrm{clip}(\gamma, 10^{-8}, \max n)$, the loss of
    the model at $\theta_p$ (in inference mode, ``training=False``) on the next validation
    batch, one Adam step (learning rate ``learning_rate``, $\beta = (0.9, 0.999)$,
    $\epsilon = 10^{-8}$, one step count for all constraints, kept across calls) on every
    $\gamma$ with $\partial L / \partial \gamma$; then the projection
    $\theta \leftarrow \theta_0 + \mathrm{clip}(\gamma / (n + 10^{-8}), 0, 1) \odot c$,
    assigned to the variables. On the first call $\gamma = \min(n) / 2$.

    TPGM runs beside any optimizer: every ``f`` optimizer steps (the ResNet recipe, with
    `TPGMCallback`) or once at the end of fine-tuning (the ViT recipe, ``tpgm.step(...)``
    after ``fit``). The gradient with respect to the constraints comes from the backend's
    own autodiff on ``model.stateless_call`` (compiled with ``jax.jit`` on JAX); the model's
    variables are not touched until the projection.

    Args:
        model: the model being fine-tuned, built, with its pre-trained weights loaded (the
            anchors are copied now).
        norm: ``"mars"`` (per row: a row is an output unit, on the axis ``row_axis`` gives;
            a bias is one row) or ``"l2"`` (the whole variable).
        learning_rate: the constraints' Adam learning rate $\mu_p$.
        exclude: variables without a constraint (a new head): a variable, a name, or a list
            of them; a name excludes every trainable variable whose name or path contains
            it (``"head"``). An entry that matches no trainable variable is an error.
        row_axis: the axis of each variable's output units for ``norm="mars"``: ``None`` for
            `default_row_axis` (-1 for a kernel, so that a ``Dense`` kernel ``(in, out)`` has
            the rows of the same PyTorch ``Linear``; 0 for everything else), an int, or a
            callable ``variable -> int``.

    Raises:
        ValueError: an unknown ``norm``, a negative or non-finite ``learning_rate``, an
            exclusion that matches nothing, an unbuilt model, a ``row_axis`` out of range, or
            no trainable (non-excluded, non-empty) variable.
        TypeError: an anchored variable that is not real floating-point.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        norm: str = "mars",
        learning_rate: float = 1e-2,
        exclude: Any = None,
        row_axis: int | Callable[[Any], int] | None = None,
    ):
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"TPGM: model must be a keras.Model, got {type(model).__name__}")
        self.norm = core.check_norm(norm)
        self.learning_rate = _check_learning_rate(learning_rate)
        self.row_axis = _check_row_axis(row_axis)
        if not model.built:
            raise ValueError("TPGM: build the model first (call it on a batch, or `model.build(shape)`)")
        trainable = list(model.trainable_variables)
        excluded = _excluded(trainable, exclude)
        variables = [v for v in trainable if id(v) not in excluded and not _is_empty(v)]
        for variable in variables:
            if not _is_real_floating(variable.dtype):
                raise TypeError(
                    f"TPGM: `{_path(variable)}` is {keras.backend.standardize_dtype(variable.dtype)}; "
                    "TPGM constrains real floating-point variables (exclude it)"
                )
        if not variables:
            raise ValueError("TPGM: the model has no trainable variable to constrain")
        self.row_axes = [self._resolve_row_axis(v) for v in variables]
        self.model = model
        self.variables = variables
        self.anchors = [_copy(v) for v in variables]
        self.constraints = None  # set on the first call: γ = min(n) / 2
        self.exp_avg = self.exp_avg_sq = None
        self.steps = 0
        self._source = self._iterator = None
        self._compiled = None  # JAX: (loss, layout, the compiled value and gradient)

    def _resolve_row_axis(self, variable):
        if self.row_axis is None:
            axis = default_row_axis(variable)
        elif callable(self.row_axis):
            axis = self.row_axis(variable)
        else:
            axis = self.row_axis
        try:
            resolved = core.row_axis_of(len(variable.shape), axis)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"TPGM: `row_axis` of `{_path(variable)}` (shape {tuple(variable.shape)}): {error}"
            ) from None
        return 0 if resolved is None else resolved

    @property
    def paths(self) -> list[str]:
        """The paths of the constrained variables, in the order of the constraints."""
        return [_path(v) for v in self.variables]

    # -- one call ----------------------------------------------------------------------------------

    def step(self, batches: Iterable, iters: int = 1, loss: Any = None) -> Any:
        """One TPGM call: ``iters`` projection updates on validation batches, then the projection.

        Args:
            batches: any iterable of validation batches ``(x, y)`` or ``(x, y, sample_weight)``
                (a list, a ``tf.data.Dataset``, a ``keras.utils.PyDataset``...). TPGM keeps one
                iterator over it across calls (while the same object is passed) and restarts
                it when it is exhausted.
            iters: projection updates before the projection; 0 only projects.
            loss: ``loss(y_true, y_pred)``: a `keras.losses.Loss` (it reduces itself) or a
                function (its values are averaged over the batch), or the name of one;
                ``None`` takes the loss the model was compiled with. The model's
                regularization losses are not added.

        Returns:
            The last projection update's loss (a 0-d tensor), or ``None`` when ``iters == 0``.

        Raises:
            ValueError: ``iters`` is not an integer ``>= 0``, there is no loss, the batches
                cannot be restarted, or a constrained variable left the model or changed shape.
        """
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
            raise ValueError(f"TPGM: `iters` must be an integer >= 0, got {iters!r}")
        loss_fn = _resolve_loss(self.model, loss) if iters else None
        self._check_variables()
        with _no_grad():
            # at least float32 (ALGORITHMS.md §9): a 16-bit variable's θ_p is rounded once, at the end
            anchors = [_wide(a) for a in self.anchors]
            displacements = [_wide(_value(v)) - a for v, a in zip(self.variables, anchors, strict=True)]
            norms = [
                core.tpgm_norm(c, self.norm, row_axis=axis, xp=_xp)
                for c, axis in zip(displacements, self.row_axes, strict=True)
            ]
            # local until the end: an error in a batch or the loss leaves TPGM as it was
            if self.constraints is None:
                constraints = [core.initial_constraint(n, xp=_xp) for n in norms]
                exp_avg = [ops.zeros_like(g) for g in constraints]
                exp_avg_sq = [ops.zeros_like(g) for g in constraints]
            else:
                constraints, exp_avg, exp_avg_sq = self.constraints, self.exp_avg, self.exp_avg_sq
            steps = self.steps
        value = None
        for _ in range(iters):
            batch = self._next(batches)
            constraints = [
                core.clip_constraint(g, n, xp=_xp) for g, n in zip(constraints, norms, strict=True)
            ]
            value, grads = self._value_and_gradients(
                loss_fn, constraints, anchors, displacements, norms, batch
            )
            steps += 1
            with _no_grad():
                for i, grad in enumerate(grads):
                    direction, state = core.adam_direction(
                        ops.cast(grad, constraints[i].dtype),
                        core.AdamState(exp_avg[i], exp_avg_sq[i]),
                        steps,
                        lr=self.learning_rate,
                        beta1=BETA1,
                        beta2=BETA2,
                        eps=EPS,
                        xp=_xp,
                    )
                    exp_avg[i], exp_avg_sq[i] = state.exp_avg, state.exp_avg_sq
                    constraints[i] = constraints[i] - direction
        with _no_grad():
            constraints = [
                core.clip_constraint(g, n, xp=_xp) for g, n in zip(constraints, norms, strict=True)
            ]
            for variable, anchor, c, n, gamma in zip(
                self.variables, anchors, displacements, norms, constraints, strict=True
            ):
                projected = core.tpgm_projected(anchor, c, core.projection_ratio(gamma, n, xp=_xp), xp=_xp)
                variable.assign(ops.cast(projected, variable.dtype))
        self.constraints, self.exp_avg, self.exp_avg_sq, self.steps = constraints, exp_avg, exp_avg_sq, steps
        return value

    def _value_and_gradients(self, loss_fn, constraints, anchors, displacements, norms, batch):
        """The validation loss at ``θ_p(γ)`` on ``batch`` and its gradient with respect to each ``γ``."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        if y is None:
            raise ValueError("TPGM: a validation batch must be (x, y) or (x, y, sample_weight)")
        # every variable of the model is an input (under jax.jit, one read inside would be a constant)
        variables = tuple(self.model.variables)
        constrained = {id(v): i for i, v in enumerate(self.variables)}
        slots = tuple((j, constrained[id(v)]) for j, v in enumerate(variables) if id(v) in constrained)
        values = [_value(v) for v in variables]
        context = (anchors, displacements, norms, values, x, y, sample_weight)
        return _value_and_gradients(self._objective(loss_fn, variables, slots), list(constraints), context)

    def _objective(self, loss_fn, variables, slots):
        """``(γs, context) -> L``; on JAX, its value and gradient compiled once per loss and layout.

        The model is called as usual (``model(x, training=False)``, so that its layers see
        inference mode whatever its ``call`` passes on) in a ``keras.StatelessScope`` that
        gives every variable the value in ``context``, the constrained ones ``θ_p``.
        """
        model = self.model

        def objective(constraints, context):
            anchors, displacements, norms, values, x, y, sample_weight = context
            values = list(values)
            for j, i in slots:
                ratio = core.projection_ratio(constraints[i], norms[i], xp=_xp)
                projected = core.tpgm_projected(anchors[i], displacements[i], ratio, xp=_xp)
                values[j] = ops.cast(projected, variables[j].dtype)
            with (
                _float64_kept(),
                keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))),
            ):
                y_pred = model(x, training=False)
                return _mean_loss(loss_fn, y, y_pred, sample_weight)

        if keras.backend.backend() != "jax":
            return objective
        layout = (tuple(id(v) for v in variables), slots)
        cached = self._compiled
        if cached is None or cached[0] is not loss_fn or cached[1] != layout:
            import jax

            # one kept, the latest (it holds the loss, so an `is` test cannot see a recycled id)
            cached = self._compiled = (loss_fn, layout, jax.jit(jax.value_and_grad(objective)))
        return cached[2]

    def _check_variables(self):
        """Every constrained variable is still the model's, with its anchor's shape."""
        known = {id(v) for v in self.model.variables}
        missing = [_path(v) for v in self.variables if id(v) not in known]
        if missing:
            raise ValueError(f"TPGM: the model no longer has the variables {_listing(missing)}")
        for variable, anchor in zip(self.variables, self.anchors, strict=True):
            if tuple(variable.shape) != tuple(anchor.shape):
                raise ValueError(
                    f"TPGM: `{_path(variable)}` is {tuple(variable.shape)}, its anchor {tuple(anchor.shape)}"
                )

    def _next(self, batches):
        """The next validation batch: one iterator per ``batches`` object, restarted when exhausted."""
        if batches is not self._source:
            self._source, self._iterator = batches, iter(batches)
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(batches)
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(
                "TPGM: batches is exhausted and cannot be restarted (pass a list, a tf.data.Dataset "
                "or a PyDataset, not a one-shot generator)"
            ) from None

    # -- state ----------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """TPGM's state as a flat dict of NumPy arrays: ``np.savez(path, **tpgm.get_state())`` saves it.

        Keys: ``method``, ``norm``, ``learning_rate``, ``steps``, ``paths`` (the constrained
        variables' paths), and per constrained variable ``i``: ``anchor/i`` and, once TPGM was
        called, ``constraint/i``, ``exp_avg/i``, ``exp_avg_sq/i``.
        """
        state = {
            "method": np.asarray("TPGM"),
            "norm": np.asarray(self.norm),
            "learning_rate": np.asarray(self.learning_rate, dtype=np.float64),
            "steps": np.asarray(self.steps, dtype=np.int64),
            "paths": np.asarray(self.paths),
        }
        for i, anchor in enumerate(self.anchors):
            state[f"anchor/{i}"] = ops.convert_to_numpy(anchor)
            if self.constraints is not None:
                state[f"constraint/{i}"] = ops.convert_to_numpy(self.constraints[i])
                state[f"exp_avg/{i}"] = ops.convert_to_numpy(self.exp_avg[i])
                state[f"exp_avg_sq/{i}"] = ops.convert_to_numpy(self.exp_avg_sq[i])
        return state

    def set_state(self, state: dict) -> None:
        """Load a `get_state` (or the ``np.load`` of its ``.npz``), checked before anything changes.

        The variables are matched by position and their paths (up to the model's name, which
        ``keras.saving.load_model`` leaves out); ``norm``, ``learning_rate`` and the step count
        are restored too.

        Raises:
            ValueError: another method's state, other variables, a missing key or an array of
                the wrong shape (naming the variable and key).
        """
        if "method" not in state or str(np.asarray(state["method"])) != "TPGM":
            raise ValueError("TPGM: not a TPGM state (its 'method' is not 'TPGM')")
        paths = [str(p) for p in np.asarray(state["paths"]).reshape(-1)]
        mine = self.paths
        if len(paths) != len(mine) or not all(_same_path(a, b) for a, b in zip(paths, mine, strict=True)):
            raise ValueError(f"TPGM: the state constrains {_listing(paths)}, this TPGM {_listing(mine)}")
        norm = core.check_norm(str(np.asarray(state["norm"])))
        learning_rate = _check_learning_rate(float(np.asarray(state["learning_rate"])))
        steps = int(np.asarray(state["steps"]))
        if steps < 0:
            raise ValueError(f"TPGM: the state's steps must be >= 0, got {steps}")
        started = "constraint/0" in state
        keys = _PER_VARIABLE if started else ("anchor",)
        unknown = (
            set(state) - set(_STATE_KEYS) - {f"{k}/{i}" for k in _PER_VARIABLE for i in range(len(mine))}
        )
        if unknown:
            raise ValueError(f"TPGM: the state has unknown keys {sorted(unknown)}")
        for i, variable in enumerate(self.variables):
            for key in keys:
                if f"{key}/{i}" not in state:
                    raise ValueError(f"TPGM: the state has no {key!r} for `{mine[i]}`")
                expected = tuple(variable.shape) if key == "anchor" else ()
                if tuple(np.shape(state[f"{key}/{i}"])) != expected:
                    raise ValueError(
                        f"TPGM: the saved {key!r} of `{mine[i]}` is {tuple(np.shape(state[f'{key}/{i}']))}, "
                        f"expected {expected}"
                    )
        if not started and any(k.startswith(("constraint/", "exp_avg")) for k in state):
            raise ValueError("TPGM: the state has constraints for some variables only")
        self.norm, self.learning_rate, self.steps = norm, learning_rate, steps
        self.anchors = [
            ops.convert_to_tensor(np.array(state[f"anchor/{i}"]), dtype=v.dtype)
            for i, v in enumerate(self.variables)
        ]
        if started:
            dtypes = [_xp.result_type(v.dtype, _xp.float32) for v in self.variables]
            self.constraints, self.exp_avg, self.exp_avg_sq = (
                [ops.convert_to_tensor(np.array(state[f"{key}/{i}"]), dtype=d) for i, d in enumerate(dtypes)]
                for key in ("constraint", "exp_avg", "exp_avg_sq")
            )
        else:
            self.constraints = self.exp_avg = self.exp_avg_sq = None


def _excluded(trainable, exclude):
    """The ids of the trainable variables ``exclude`` names (a variable, a name, or a list of them)."""
    if exclude is None:
        return set()
    entries = [exclude] if isinstance(exclude, str) or hasattr(exclude, "shape") else list(exclude)
    excluded = set()
    for entry in entries:
        if isinstance(entry, str):
            matched = {id(v) for v in trainable if entry in str(v.name) or entry in _path(v)}
            what = f"the name {entry!r}"
        elif hasattr(entry, "shape"):
            matched = {id(v) for v in trainable if v is entry}
            what = f"the variable `{_path(entry)}`"
        else:
            raise TypeError(f"TPGM: `exclude` takes variables or names, got {entry!r}")
        if not matched:
            raise ValueError(f"TPGM: `exclude` has {what}, which matches no trainable variable of the model")
        excluded |= matched
    return excluded


class TPGMCallback(keras.callbacks.Callback):
    """Calls `TPGM.step` during ``fit``, every ``every`` optimizer steps (the ResNet recipe).

    The schedule counts training batches (optimizer steps) from the optimizer's
    ``iterations`` when ``fit`` begins, so that it continues across ``fit`` calls and after
    a model is reloaded: a call happens after each batch whose count is a multiple of
    ``every`` (with ``steps_per_execution > 1``, at the end of the execution that reaches
    it). On JAX, the callback syncs the trainer's state into the model's variables before
    TPGM reads them, and the next step reads the projected weights back.

    For the ViT recipe (one call at the end of fine-tuning), call ``tpgm.step(...)`` after
    ``fit`` instead.

    Args:
        tpgm: the `TPGM` of the model being fitted.
        batches: the validation batches, as `TPGM.step` takes them (one iterator kept across calls).
        every: optimizer steps between two calls, ``>= 1``.
        iters: projection updates per call (`TPGM.step`'s ``iters``).
        loss: `TPGM.step`'s ``loss`` (``None``: the compiled loss).
    """

    def __init__(self, tpgm: TPGM, batches: Iterable, every: int = 1, iters: int = 1, loss: Any = None):
        super().__init__()
        if not isinstance(tpgm, TPGM):
            raise TypeError(f"TPGMCallback: tpgm must be a TPGM, got {type(tpgm).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"TPGMCallback: `every` must be an integer >= 1, got {every!r}")
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
            raise ValueError(f"TPGMCallback: `iters` must be an integer >= 0, got {iters!r}")
        self.tpgm, self.batches, self.every, self.iters, self.loss = (
            tpgm,
            batches,
            int(every),
            int(iters),
            loss,
        )
        self.calls = 0  # TPGM calls made by this callback
        self._seen = self._epoch_start = 0

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        self._seen = int(ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._seen

    def on_train_batch_end(self, batch, logs=None):
        seen = self._epoch_start + batch + 1
        due = seen // self.every > self._seen // self.every
        self._seen = seen
        if due:
            _ = self.model  # on JAX, reading `model` syncs the trainer's state into the variables
            self.tpgm.step(self.batches, iters=self.iters, loss=self.loss)
            self.calls += 1


def wise_ft(model: keras.Model, anchor_weights: list, alpha: float) -> list:
    r"""WiSE-FT: the fine-tuned model's weights interpolated with the pre-trained ones.

    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (``ALGORITHMS.md`` §8).
    For every floating-point weight of the model (``model.get_weights()``: trainable
    variables and non-trainable ones such as BatchNormalization's moving statistics):

    $$
    \theta = (1 - \alpha)\,\theta_0 + \alpha\,\theta_{ft}
    $$

    computed in at least float32 and stored in the weight's dtype; integer weights come from
    the fine-tuned model. The model is not changed: apply the result with
    ``model.set_weights(wise_ft(model, anchor_weights, alpha))``, so that several ``α`` can
    be tried from the same fine-tuned weights (keep ``model.get_weights()`` to go back).

    Args:
        model: the fine-tuned model.
        anchor_weights: ``model.get_weights()`` as it returned before fine-tuning (the same
            number of arrays, with the same shapes).
        alpha: in ``[0, 1]``; 0 is the pre-trained model, 1 the fine-tuned one.

    Returns:
        A list of NumPy arrays, one per weight of ``model.get_weights()``.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or the anchor weights' count or shapes differ
            from the model's.
    """
    alpha = _check("alpha", alpha, 0.0, 1.0)
    finetuned = model.get_weights()
    anchor_weights = list(anchor_weights)
    if len(anchor_weights) != len(finetuned):
        raise ValueError(
            f"wise_ft: the model has {len(finetuned)} weights, `anchor_weights` {len(anchor_weights)}"
        )
    paths = [_path(w) for w in model.weights]
    mixed = []
    for path, anchor, value in zip(paths, anchor_weights, finetuned, strict=True):
        if tuple(np.shape(anchor)) != tuple(value.shape):
            raise ValueError(
                f"wise_ft: the anchor of `{path}` is {tuple(np.shape(anchor))}, the model's {tuple(value.shape)}"
            )
        if _is_real_floating(value.dtype):
            mixed.append(core.wise_ft(np.asarray(anchor, dtype=value.dtype), value, alpha))
        else:
            mixed.append(np.array(value, copy=True))
    return mixed
