r"""FTP and SPD as optax gradient transformations.

Each function here returns an `optax.GradientTransformationExtraArgs` that
chains, jits and injects like any optax optimizer; the math is a call into
`tether.core` per parameter tensor (`ALGORITHMS.md` §3–§6).

- `adam_ftp`, `sgd_ftp`: Adam / SGD (PyTorch's forms) with Fast
  Trainable Projection (Tian et al., "Fast Trainable Projection for Robust
  Fine-Tuning", NeurIPS 2023).
- `adam_spd`: Adam with Selective Projection Decay (Tian et al., "Rethinking
  Weight Decay for Robust Fine-Tuning of Foundation Models", NeurIPS 2024).
- `ftp`, `spd`: the same projections around any optax transformation.

Conventions shared by all five:

- `update(grads, state, params)` needs `params`, and returns
  `updates = new_params − params` (`optax.apply_updates` adds them).
- `anchor="init"` anchors each tensor at its value in `init(params)` (the
  pre-trained weights); `anchor="zero"` anchors it at the origin and stores
  nothing (PEFT / LoRA adapters).
- `mask` follows `optax.add_decayed_weights`: a pytree of bools with the
  structure of the parameters (or a prefix of it), or a callable returning one.
  `False` leaves are unanchored: they take the plain base step.
- The state is a NamedTuple of params-shaped trees of arrays, with an int32
  `count`; absent entries (no anchor, no projection) are `optax.MaskedNode`.
- `amsgrad`, `nesterov`, `anchor` and `mask` are static; the numeric
  hyperparameters may be arrays, so `optax.inject_hyperparams` works (pass a
  callable `mask` through `static_args`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import core
from ._jax_tree import (
    ABSENT,
    check_anchor,
    check_bool,
    check_grads,
    check_inner,
    check_learning_rate,
    check_mask,
    check_number,
    check_state_leaves,
    flatten_params,
    is_absent,
    line_up,
    merge,
    resolve_mask,
    split,
    unflatten,
)

__all__ = [
    "AdamFTPState",
    "AdamSPDState",
    "FTPProjectionState",
    "FTPWrapperState",
    "SGDFTPState",
    "SPDWrapperState",
    "adam_ftp",
    "adam_spd",
    "ftp",
    "sgd_ftp",
    "spd",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None

_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


class FTPProjectionState(NamedTuple):
    """FTP's per-tensor state (`ALGORITHMS.md` §4), one params-shaped tree per field.

    Leaves of unanchored tensors are `optax.MaskedNode()`.

    Attributes:
        radius: The learned radius `γ` of each tensor (0-d, at least float32).
        radius_exp_avg: `m_γ`, the first moment of the radius's own Adam (0-d).
        radius_exp_avg_sq: `v_γ`, its second moment (0-d).
        prev_displacement: `c` of the previous step, `θ̃ − θ₀` (shape of `θ`).
        prev_inv_norm: `1 / n` of the previous step (MARS-shaped: `(d₀, 1, …)`).
    """

    radius: optax.Params
    radius_exp_avg: optax.Params
    radius_exp_avg_sq: optax.Params
    prev_displacement: optax.Params
    prev_inv_norm: optax.Params


class AdamFTPState(NamedTuple):
    """State of `adam_ftp`.

    Attributes:
        count: Steps taken (int32); step `t = count + 1`.
        exp_avg: Adam's first moments `m`.
        exp_avg_sq: Adam's second moments `v`.
        max_exp_avg_sq: `max v` with `amsgrad`, else `optax.MaskedNode()`.
        anchor: `θ₀` per anchored tensor (`MaskedNode` for `anchor="zero"` and unanchored).
        projection: FTP's radius and previous displacement per anchored tensor.
    """

    count: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates
    max_exp_avg_sq: optax.Updates
    anchor: optax.Params
    projection: FTPProjectionState


class SGDFTPState(NamedTuple):
    """State of `sgd_ftp`.

    Attributes:
        count: Steps taken (int32).
        momentum_buffer: The momentum buffers `b` (`optax.MaskedNode()` when `momentum == 0`).
        anchor: `θ₀` per anchored tensor (`MaskedNode` for `anchor="zero"` and unanchored).
        projection: FTP's radius and previous displacement per anchored tensor.
    """

    count: jax.Array
    momentum_buffer: optax.Updates
    anchor: optax.Params
    projection: FTPProjectionState


class AdamSPDState(NamedTuple):
    """State of `adam_spd`.

    Attributes:
        count: Steps taken (int32).
        exp_avg: Adam's first moments `m`.
        exp_avg_sq: Adam's second moments `v`.
        max_exp_avg_sq: `max v` with `amsgrad`, else `optax.MaskedNode()`.
        anchor: `θ₀` per anchored tensor (`MaskedNode` for `anchor="zero"` and unanchored).
    """

    count: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates
    max_exp_avg_sq: optax.Updates
    anchor: optax.Params


class FTPWrapperState(NamedTuple):
    """State of `ftp`.

    Attributes:
        count: Steps taken (int32), for the radius's bias corrections.
        inner_state: The wrapped transformation's state.
        anchor: `θ₀` per anchored tensor.
        projection: FTP's radius and previous displacement per anchored tensor.
    """

    count: jax.Array
    inner_state: optax.OptState
    anchor: optax.Params
    projection: FTPProjectionState


class SPDWrapperState(NamedTuple):
    """State of `spd`.

    Attributes:
        inner_state: The wrapped transformation's state.
        anchor: `θ₀` per anchored tensor.
    """

    inner_state: optax.OptState
    anchor: optax.Params


# --------------------------------------------------------------------------------------------------
# Shared bookkeeping: anchors, FTP state, validation of the state against the parameters.


def _has(value):
    """False only for a Python number equal to 0 (as `tether.core`: an array may be 0 at run time)."""
    return not (isinstance(value, (int, float)) and value == 0)


def _check_common(where, anchor, mask):
    check_anchor(anchor, where)
    check_mask(mask, where)


def _check_adam(where, learning_rate, b1, b2, eps, weight_decay, amsgrad):
    check_learning_rate(learning_rate, where)
    check_number("b1", b1, where, low=0.0, high=1.0, high_open=True)
    check_number("b2", b2, where, low=0.0, high=1.0, high_open=True)
    check_number("eps", eps, where, low=0.0)
    check_number("weight_decay", weight_decay, where, low=0.0)
    check_bool("amsgrad", amsgrad, where)


def _check_state(state, cls, where):
    if not isinstance(state, cls):
        raise TypeError(
            f"{where}: expected the {cls.__name__} made by this transformation's init, "
            f"got {type(state).__name__}"
        )


def _init_anchor(leaves, anchored, mode):
    """A copy of each anchored tensor for `"init"` (a copy, so that donating the params is safe)."""
    stored = [flag and mode == "init" for flag in anchored]
    return unflatten(
        leaves, [jnp.array(p, copy=True) if s else ABSENT for p, s in zip(leaves.values, stored, strict=True)]
    )


def _anchors(leaves, tree, anchored, mode, where):
    """Per leaf: the stored anchor array, or `None` (a zero anchor, or an unanchored tensor)."""
    values = line_up(leaves, tree, "state.anchor", where)
    stored = [flag and mode == "init" for flag in anchored]
    check_state_leaves(leaves, values, "state.anchor", where, present=stored)
    return [v if s else None for v, s in zip(values, stored, strict=True)]


def _init_projection(leaves, anchored):
    rows = [
        core.ftp_init(p, xp=jnp) if flag else ABSENT for p, flag in zip(leaves.values, anchored, strict=True)
    ]
    return merge(leaves, rows, FTPProjectionState)


def _projections(leaves, tree, anchored, where):
    if not isinstance(tree, tuple) or len(tree) != len(FTPProjectionState._fields):
        raise TypeError(f"{where}: state.projection is not an FTPProjectionState")
    rows = split(leaves, tree, core.FTPState, "state.projection", where)
    check_state_leaves(leaves, rows, "state.projection", where, shaped_like_param=False, present=anchored)
    check_state_leaves(
        leaves, [r if is_absent(r) else r.prev_displacement for r in rows], "state.projection", where
    )
    return rows


def _param_shaped(leaves, tree, what, where):
    values = line_up(leaves, tree, what, where)
    check_state_leaves(leaves, values, what, where, present=[True] * len(values))
    return values


def _adam_moments(leaves, state, amsgrad, where):
    exp_avg = _param_shaped(leaves, state.exp_avg, "state.exp_avg", where)
    exp_avg_sq = _param_shaped(leaves, state.exp_avg_sq, "state.exp_avg_sq", where)
    if amsgrad:
        max_sq = _param_shaped(leaves, state.max_exp_avg_sq, "state.max_exp_avg_sq", where)
    else:
        max_sq = [None] * len(exp_avg)
    return [core.AdamState(m, v, w) for m, v, w in zip(exp_avg, exp_avg_sq, max_sq, strict=True)]


def _init_adam(leaves, amsgrad):
    return _merge_adam(leaves, [core.adam_init(p, amsgrad=amsgrad, xp=jnp) for p in leaves.values], amsgrad)


def _merge_adam(leaves, moments, amsgrad):
    """Per-leaf `core.AdamState`s → the `(exp_avg, exp_avg_sq, max_exp_avg_sq)` trees of the state."""
    max_sq = unflatten(leaves, [m.max_exp_avg_sq for m in moments]) if amsgrad else ABSENT
    return (
        unflatten(leaves, [m.exp_avg for m in moments]),
        unflatten(leaves, [m.exp_avg_sq for m in moments]),
        max_sq,
    )


def _after(value, previous):
    """`value`, computed only once `previous` is: a scheduling hint for XLA, not math.

    `value − nan_to_num(0·|x|)` subtracts an exact +0 that XLA cannot fold (NaN and ±inf
    included), so every value, −0.0 included, is unchanged; `x` is the sum of `previous`
    (one read of it), not an element of it, which a sharded array may not give without
    communication. Uses:

    - SPD chains its tensors, so that the full-size temporaries of its statistics (which
      XLA:CPU materializes) live one tensor at a time, not all at once (twice the model's
      size, page-faulted in at every step);
    - FTP reads the previous displacement before it makes the new one, so that with a donated
      state XLA writes the new one in place instead of copying both.
    """
    if previous is None:
        return value
    link = jnp.nan_to_num(0 * jnp.abs(jnp.sum(previous)), nan=0.0, posinf=0.0, neginf=0.0)
    return value - link.astype(value.dtype)


def _learning_rate(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _ftp_leaf(param, direction, anchor, grad, projection, step, k, anchored):
    """FTP's step for one tensor as an optax update; an unanchored tensor takes `θ − d`."""
    if not anchored:
        return -direction, ABSENT
    # The new displacement waits for ∇γ (the last read of the old one); XLA's CSE merges this ∇γ
    # with the identical one in ftp_project.
    radius_grad = core.radius_gradient(
        grad, projection.prev_displacement, projection.prev_inv_norm, k=k, xp=jnp
    )
    direction = _after(direction, radius_grad)
    new_param, projection = core.ftp_project(param, direction, anchor, grad, projection, step, k=k, xp=jnp)
    return new_param - param, projection


# --------------------------------------------------------------------------------------------------
# The fused optimizers.


def adam_ftp(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    k: float = 1.0,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam (PyTorch's AdamW form) with Fast Trainable Projection.

    Per tensor, with `t` the step count (`ALGORITHMS.md` §3, §4):

        d = (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε) + lr · wd · θ
        c = (θ − d) − θ₀             n = MARS(c) + 1e-8   (per row)
        θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c

    where the radius `γ` is learned online by a small Adam of its own on
    `∇γ = Σ rowdot(g, c_prev) / n_prev` (positive
    gradients, which shrink `γ`, scaled by `k`). The decoupled weight decay is
    inside `d` and is projected too. Unanchored tensors (`mask` False) take
    `θ ← θ − d`.

    Reference: J. Tian, Y.-C. Liu, J. Smith, Z. Kira, "Fast Trainable Projection for
    Robust Fine-Tuning", NeurIPS 2023.

    Args:
        learning_rate: A float, or an optax schedule of the step count.
        b1: Adam's `β₁`, in `[0, 1)`.
        b2: Adam's `β₂`, in `[0, 1)`.
        eps: Added to the bias-corrected `√v` (PyTorch's placement).
        weight_decay: Decoupled weight decay `wd` (multiplied by the learning rate).
        amsgrad: Use `max(v)` in the denominator.
        k: In `[0, 1]`: the factor on positive radius gradients (1 is the paper's FTP).
        anchor: `"init"` (the parameters given to `init`) or `"zero"`.
        mask: Which tensors are anchored: a pytree of bools (or a prefix of the
            parameters' tree), or a callable of the parameters returning one.

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `AdamFTPState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from tether.adapters.jax import adam_ftp
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
        >>> tx = adam_ftp(1e-3, mask={"w": True, "b": False})
        >>> state = tx.init(params)
        >>> grads = {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}
        >>> updates, state = tx.update(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
    """
    where = "adam_ftp"
    _check_adam(where, learning_rate, b1, b2, eps, weight_decay, amsgrad)
    check_number("k", k, where, low=0.0, high=1.0)
    _check_common(where, anchor, mask)

    def init_fn(params):
        leaves = flatten_params(params, f"{where}.init")
        anchored = resolve_mask(mask, params, leaves, f"{where}.init")
        return AdamFTPState(
            jnp.zeros([], jnp.int32),
            *_init_adam(leaves, amsgrad),
            anchor=_init_anchor(leaves, anchored, anchor),
            projection=_init_projection(leaves, anchored),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, AdamFTPState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        moments = _adam_moments(leaves, state, amsgrad, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_moments, new_projections = [], [], []
        for param, grad, moment, theta0, projection, flag in zip(
            leaves.values, grads, moments, anchors, projections, anchored, strict=True
        ):
            direction, moment = core.adam_direction(
                grad, moment, step, lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad,
                weight_decay=weight_decay, param=param, xp=jnp,
            )  # fmt: skip
            update, projection = _ftp_leaf(param, direction, theta0, grad, projection, step, k, flag)
            new_updates.append(update)
            new_moments.append(moment)
            new_projections.append(projection)
        new_state = AdamFTPState(
            step,
            *_merge_adam(leaves, new_moments, amsgrad),
            anchor=state.anchor,
            projection=merge(leaves, new_projections, FTPProjectionState),
        )
        return unflatten(leaves, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgd_ftp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    k: float = 1.0,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD (PyTorch's form, with momentum) with Fast Trainable Projection.

    Per tensor (`ALGORITHMS.md` §3, §4):

        u = g + wd · θ
        b ← μ b + (1 − τ) u          (b = u on the first step)
        u ← u + μ b if nesterov else b
        d = lr · u     c = (θ − d) − θ₀     θ ← θ₀ + clip(γ / n(c), 0, 1) ⊙ c

    with `n` the per-row MARS norm (plus `1e-8`) and the radius `γ` learned
    online as in `adam_ftp`. Unanchored tensors take `θ ← θ − d`.

    Reference: J. Tian, Y.-C. Liu, J. Smith, Z. Kira, "Fast Trainable Projection for
    Robust Fine-Tuning", NeurIPS 2023.

    Args:
        learning_rate: A float, or an optax schedule of the step count.
        momentum: Momentum factor `μ` (0: no buffer is stored).
        dampening: Dampening `τ` of the momentum.
        weight_decay: L2 penalty `wd` added to the gradient (PyTorch's SGD form).
        nesterov: Nesterov momentum (needs `momentum > 0` and `dampening == 0`).
        k: In `[0, 1]`: the factor on positive radius gradients.
        anchor: `"init"` or `"zero"`.
        mask: Which tensors are anchored (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `SGDFTPState`.
    """
    where = "sgd_ftp"
    check_learning_rate(learning_rate, where)
    check_number("momentum", momentum, where, low=0.0)
    check_number("dampening", dampening, where)
    check_number("weight_decay", weight_decay, where, low=0.0)
    check_bool("nesterov", nesterov, where)
    if nesterov and isinstance(momentum, (int, float)) and isinstance(dampening, (int, float)):
        if momentum <= 0 or dampening != 0:
            raise ValueError(f"{where}: nesterov momentum needs momentum > 0 and dampening == 0")
    check_number("k", k, where, low=0.0, high=1.0)
    _check_common(where, anchor, mask)
    buffered = _has(momentum)

    def init_fn(params):
        leaves = flatten_params(params, f"{where}.init")
        anchored = resolve_mask(mask, params, leaves, f"{where}.init")
        buffers = unflatten(leaves, [core.sgd_init(p, xp=jnp).momentum_buffer for p in leaves.values])
        return SGDFTPState(
            jnp.zeros([], jnp.int32),
            buffers if buffered else ABSENT,
            _init_anchor(leaves, anchored, anchor),
            _init_projection(leaves, anchored),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, SGDFTPState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        if buffered:
            buffers = _param_shaped(leaves, state.momentum_buffer, "state.momentum_buffer", at)
        else:
            buffers = [None] * len(leaves.values)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_buffers, new_projections = [], [], []
        for param, grad, buffer, theta0, projection, flag in zip(
            leaves.values, grads, buffers, anchors, projections, anchored, strict=True
        ):
            direction, sgd_state = core.sgd_direction(
                grad, param, core.SGDState(buffer), step, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, xp=jnp,
            )  # fmt: skip
            update, projection = _ftp_leaf(param, direction, theta0, grad, projection, step, k, flag)
            new_updates.append(update)
            new_buffers.append(sgd_state.momentum_buffer)
            new_projections.append(projection)
        new_state = SGDFTPState(
            step,
            unflatten(leaves, new_buffers) if buffered else ABSENT,
            state.anchor,
            merge(leaves, new_projections, FTPProjectionState),
        )
        return unflatten(leaves, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_spd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with Selective Projection Decay.

    Per anchored tensor (`ALGORITHMS.md` §3, §5), with `d` Adam's direction
    (no weight-decay term) and `θ̃ = θ − d`:

        c = −⟨g, θ − θ₀⟩
        r = clip((‖θ̃ − θ₀‖₂ − ‖θ − θ₀‖₂) / ‖θ̃ − θ₀‖₂, 0, 1)
        θ ← θ̃ − λ · r · (θ̃ − θ₀)   if c < 0,   else θ̃

    `λ` (`weight_decay`) is not multiplied by the learning rate. Unanchored
    tensors take the plain Adam step `θ̃` with no decay at all (give a new head
    `anchor="zero"` in a separate transformation to decay it toward the origin).

    Reference: J. Tian, C. Huang, Z. Kira, "Rethinking Weight Decay for Robust
    Fine-Tuning of Foundation Models", NeurIPS 2024.

    Args:
        learning_rate: A float, or an optax schedule of the step count.
        b1: Adam's `β₁`, in `[0, 1)`.
        b2: Adam's `β₂`, in `[0, 1)`.
        eps: Added to the bias-corrected `√v`.
        weight_decay: SPD's strength `λ` (not scaled by the learning rate).
        amsgrad: Use `max(v)` in the denominator.
        anchor: `"init"` or `"zero"`.
        mask: Which tensors are anchored (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `AdamSPDState`.
    """
    where = "adam_spd"
    _check_adam(where, learning_rate, b1, b2, eps, weight_decay, amsgrad)
    _check_common(where, anchor, mask)

    def init_fn(params):
        leaves = flatten_params(params, f"{where}.init")
        anchored = resolve_mask(mask, params, leaves, f"{where}.init")
        return AdamSPDState(
            jnp.zeros([], jnp.int32),
            *_init_adam(leaves, amsgrad),
            anchor=_init_anchor(leaves, anchored, anchor),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, AdamSPDState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        moments = _adam_moments(leaves, state, amsgrad, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_moments = [], []
        previous = None
        for param, grad, moment, theta0, flag in zip(
            leaves.values, grads, moments, anchors, anchored, strict=True
        ):
            if flag:
                param = _after(param, previous)
            direction, moment = core.adam_direction(
                grad, moment, step, lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad, xp=jnp
            )
            if flag:
                new_param = core.spd_step(param, direction, theta0, grad, weight_decay, xp=jnp)
                new_updates.append(new_param - param)
                previous = new_param
            else:
                new_updates.append(-direction)
            new_moments.append(moment)
        new_state = AdamSPDState(step, *_merge_adam(leaves, new_moments, amsgrad), anchor=state.anchor)
        return unflatten(leaves, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# Wrappers around any optax transformation (ALGORITHMS.md §6).


def ftp(
    inner: optax.GradientTransformation,
    *,
    k: float = 1.0,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fast Trainable Projection around any optax transformation.

    `inner` proposes `θ̃ = θ + u` (its update `u`); FTP projects the
    displacement from the anchor onto a learned per-row MARS ball
    (`ALGORITHMS.md` §4, §6):

        c = θ̃ − θ₀     n = MARS(c) + 1e-8   (per row)     θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c

    with `γ` learned as in `adam_ftp` from the incoming gradients `g` (what
    reaches this transformation: after clipping, if it follows
    `clip_by_global_norm` in a chain). Whatever `inner` does, weight decay
    included, is inside `θ̃` and gets projected. Unanchored tensors take `u`
    unchanged. `ftp(optax.adam(lr))` equals `adam_ftp` up to rounding.

    Reference: J. Tian, Y.-C. Liu, J. Smith, Z. Kira, "Fast Trainable Projection for
    Robust Fine-Tuning", NeurIPS 2023.

    Args:
        inner: The base optimizer, e.g. `optax.sgd(1e-2, momentum=0.9)` or an
            `optax.chain` (which must include the learning rate).
        k: In `[0, 1]`: the factor on positive radius gradients.
        anchor: `"init"` or `"zero"`.
        mask: Which tensors are anchored (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `FTPWrapperState`;
        extra arguments of `update` are passed to `inner`.
    """
    where = "ftp"
    check_inner(inner, where)
    check_number("k", k, where, low=0.0, high=1.0)
    _check_common(where, anchor, mask)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        leaves = flatten_params(params, f"{where}.init")
        anchored = resolve_mask(mask, params, leaves, f"{where}.init")
        return FTPWrapperState(
            jnp.zeros([], jnp.int32),
            inner.init(params),
            _init_anchor(leaves, anchored, anchor),
            _init_projection(leaves, anchored),
        )

    def update_fn(updates, state, params=None, **extra_args):
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, FTPWrapperState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, at)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        proposals = line_up(leaves, inner_updates, "the inner transformation's updates", at)
        step = _safe_increment(state.count)
        new_updates, new_projections = [], []
        for param, grad, proposal, theta0, projection, flag in zip(
            leaves.values, grads, proposals, anchors, projections, anchored, strict=True
        ):
            if flag:
                update, projection = _ftp_leaf(param, -proposal, theta0, grad, projection, step, k, True)
            else:
                update, projection = proposal, ABSENT
            new_updates.append(update)
            new_projections.append(projection)
        new_state = FTPWrapperState(
            step, inner_state, state.anchor, merge(leaves, new_projections, FTPProjectionState)
        )
        return unflatten(leaves, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spd(
    inner: optax.GradientTransformation,
    *,
    weight_decay: float,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Selective Projection Decay around any optax transformation.

    Before `inner` moves `θ` to `θ̃ = θ + u`, SPD measures
    `⟨g, θ − θ₀⟩` and `‖θ − θ₀‖₂`; after
    it, it decays the anchored tensors that the gradient pushes away from the
    anchor (`ALGORITHMS.md` §5, §6):

        θ ← θ̃ − λ · r · (θ̃ − θ₀)   if −⟨g, θ − θ₀⟩ < 0,   else θ̃
        r = clip((‖θ̃ − θ₀‖₂ − ‖θ − θ₀‖₂) / ‖θ̃ − θ₀‖₂, 0, 1)

    `inner` must not decay weights itself (use `optax.adam`, not
    `optax.adamw`). Unanchored tensors take `u` unchanged.
    `spd(optax.adam(lr), weight_decay=λ)` equals `adam_spd` up to rounding.

    Reference: J. Tian, C. Huang, Z. Kira, "Rethinking Weight Decay for Robust
    Fine-Tuning of Foundation Models", NeurIPS 2024.

    Args:
        inner: The base optimizer (which must include the learning rate).
        weight_decay: SPD's strength `λ` (not scaled by the learning rate).
        anchor: `"init"` or `"zero"`.
        mask: Which tensors are anchored (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `SPDWrapperState`;
        extra arguments of `update` are passed to `inner`.
    """
    where = "spd"
    check_inner(inner, where)
    check_number("weight_decay", weight_decay, where, low=0.0)
    _check_common(where, anchor, mask)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        leaves = flatten_params(params, f"{where}.init")
        anchored = resolve_mask(mask, params, leaves, f"{where}.init")
        return SPDWrapperState(inner.init(params), _init_anchor(leaves, anchored, anchor))

    def update_fn(updates, state, params=None, **extra_args):
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, SPDWrapperState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        statistics, previous = [], None
        for param, theta0, grad, flag in zip(leaves.values, anchors, grads, anchored, strict=True):
            if flag:
                statistics.append(core.spd_statistics(_after(param, previous), theta0, grad, xp=jnp))
                previous = statistics[-1].distance
            else:
                statistics.append(None)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        proposals = line_up(leaves, inner_updates, "the inner transformation's updates", at)
        new_updates, previous = [], None
        for param, proposal, theta0, stats in zip(leaves.values, proposals, anchors, statistics, strict=True):
            if stats is None:
                new_updates.append(proposal)
                continue
            proposed = (_after(param, previous) + proposal).astype(param.dtype)
            new_param = core.spd_decay(proposed, theta0, stats, weight_decay, xp=jnp)
            new_updates.append(new_param - param)
            previous = new_param
        return unflatten(leaves, new_updates), SPDWrapperState(inner_state, state.anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
