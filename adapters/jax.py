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
- `tpgm_init`, `tpgm_step`: the Trainable Projected Gradient Method (Tian et
  al., CVPR 2023), beside any optimizer: constraints learned on validation
  batches, then a projection.
- The reference baselines (`ALGORITHMS.md` §8): `l2_sp` (a gradient term,
  chained before any optimizer), `mars_sp` (a fixed-radius projection around
  any optax transformation), `wise_ft` (weight-space interpolation).
- `diagnostics`: per-tensor numbers to log (the distance from the anchor, FTP's
  radius, SPD's ratio and condition, TPGM's constraint) as Python floats and bools.

Conventions shared by the transformations (`adam_ftp` … `spd`, `l2_sp`, `mars_sp`):

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
- `amsgrad`, `nesterov`, `anchor`, `mask` and `row_axis` are static; the numeric
  hyperparameters may be arrays, so `optax.inject_hyperparams` works (pass a
  callable `mask` and any `row_axis` through `static_args`).
- FTP's per-row norms are per output unit: `row_axis` says which axis holds a
  tensor's rows (by default the last for a flax `kernel`, axis 0 for the rest).
- Parameters keep their dtype; FTP's and SPD's statistics (norms, `1 / n`, the
  radius and its moments, the ratios) are computed and stored in at least float32.
- An empty tensor (a dimension of size 0) has nothing to update: its update is
  empty and its state unchanged.
- Every check (parameters, gradients, state, mask, row axes) runs before any
  computation, and names the leaf.
"""

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import core
from ._jax_tpgm import TPGMState, tpgm_init, tpgm_step
from ._jax_tree import (
    ABSENT,
    check_anchor,
    check_bool,
    check_grads,
    check_inner,
    check_learning_rate,
    check_mask,
    check_number,
    check_row_axis,
    check_state_array,
    check_state_leaves,
    flatten_params,
    is_absent,
    is_concrete,
    line_up,
    merge,
    resolve_mask,
    resolve_row_axis,
    split,
    unflatten,
)

__all__ = [
    "AdamFTPState",
    "AdamSPDState",
    "FTPProjectionState",
    "FTPWrapperState",
    "L2SPState",
    "MARSSPState",
    "SGDFTPState",
    "SPDWrapperState",
    "TPGMState",
    "adam_ftp",
    "adam_spd",
    "diagnostics",
    "ftp",
    "l2_sp",
    "mars_sp",
    "sgd_ftp",
    "spd",
    "tpgm_init",
    "tpgm_step",
    "wise_ft",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None
RowAxis = int | Any | Callable[[tuple, jax.Array], int] | None

_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


class FTPProjectionState(NamedTuple):
    """FTP's per-tensor state (`ALGORITHMS.md` §4), one params-shaped tree per field.

    Leaves of unanchored tensors are `optax.MaskedNode()`.

    Attributes:
        radius: The learned radius `γ` of each tensor (0-d, at least float32).
        radius_exp_avg: `m_γ`, the first moment of the radius's own Adam (0-d, same dtype).
        radius_exp_avg_sq: `v_γ`, its second moment (0-d, same dtype).
        prev_displacement: `c` of the previous step, `θ̃ − θ₀` (shape and dtype of `θ`).
        prev_inv_norm: `1 / n` of the previous step, shaped `core.mars_shape(θ.shape, row_axis)`
            (`(1, d_out)` for a flax `(in, d_out)` kernel, `(d₀, 1)` for an embedding),
            at least float32.
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
        ratio: SPD's ratio `r` of the last step per anchored tensor (0-d, at least float32;
            0 before the first step). A record for `diagnostics`: the step does not read it.
        decayed: Whether SPD's condition `−⟨g, θ − θ₀⟩ < 0` held on the last step, so that
            the tensor was decayed by `λ · r` (0-d bool; False before the first step).
    """

    count: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates
    max_exp_avg_sq: optax.Updates
    anchor: optax.Params
    # None only in a state unpickled from a version without them: `update` says so
    ratio: optax.Params = None
    decayed: optax.Params = None


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
        ratio: SPD's ratio `r` of the last step per anchored tensor (as in `AdamSPDState`).
        decayed: Whether SPD's condition held on the last step (as in `AdamSPDState`).
    """

    inner_state: optax.OptState
    anchor: optax.Params
    # None only in a state unpickled from a version without them: `update` says so
    ratio: optax.Params = None
    decayed: optax.Params = None


class L2SPState(NamedTuple):
    """State of `l2_sp`.

    Attributes:
        anchor: `θ₀` per anchored tensor (`MaskedNode` for `anchor="zero"` and unanchored).
    """

    anchor: optax.Params


class MARSSPState(NamedTuple):
    """State of `mars_sp`.

    Attributes:
        inner_state: The wrapped transformation's state.
        anchor: `θ₀` per anchored tensor (`MaskedNode` for `anchor="zero"` and unanchored).
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
    """`state` is a `cls` (a state of another transformation is a TypeError) with a 0-d int32 count."""
    if not isinstance(state, cls):
        raise TypeError(
            f"{where}: expected the {cls.__name__} made by this transformation's init, "
            f"got {type(state).__name__}"
        )
    if "count" in cls._fields:
        check_state_array(state.count, "state.count", (), jnp.int32, where)


def _check_inner_state(inner, inner_state, params, where):
    """`inner_state` has the tree and shapes of `inner.init(params)` (traced abstractly, no computation)."""
    try:
        expected = jax.eval_shape(inner.init, params)
    except Exception:  # an init that cannot be traced abstractly: the inner's own update will complain
        return
    expected_tree, got_tree = jax.tree.structure(expected), jax.tree.structure(inner_state)
    if expected_tree != got_tree:
        raise ValueError(
            f"{where}: state.inner_state does not have the structure of inner.init(params): it was made "
            f"by another inner transformation, or for other parameters.\n  expected: {expected_tree}\n"
            f"  got:      {got_tree}"
        )
    for (path, want), got in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(inner_state), strict=True
    ):
        if jnp.shape(got) != want.shape:
            raise ValueError(
                f"{where}: state.inner_state{jax.tree_util.keystr(path)} has shape {jnp.shape(got)}, "
                f"inner.init(params) makes {want.shape}: the state belongs to other parameters"
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


def _warn_zero_anchor(where, leaves, anchored, mode):
    """FTP anchored at the origin warns when an anchored tensor is not zero (checked on concrete params).

    The radius starts at 1e-8, so FTP's first step projects such a tensor to within ~1e-8 of
    the origin: a zero-anchored, randomly initialised LoRA `A` is wiped.
    """
    if mode != "zero" or not is_concrete(leaves.values):
        return
    picked = [(path, p) for path, p, flag in zip(leaves.paths, leaves.values, anchored, strict=True) if flag]
    nonzero = jax.device_get([jnp.any(p != 0) for _, p in picked])  # one host read for all
    named = [path for (path, _), flag in zip(picked, nonzero, strict=True) if flag]
    if not named:
        return
    shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    warnings.warn(
        f"{where}: anchor='zero' but these anchored tensors are not zero: {shown}. FTP's radius starts "
        "at 1e-8, so its first step projects each of them to within ~1e-8 of the origin (a randomly "
        "initialised LoRA A is wiped). For LoRA adapters FTP's anchor is the adapter's own "
        "initialisation: use anchor='init' (anchor='zero' is SPD's recipe), or leave these tensors "
        "unanchored with `mask`.",
        UserWarning,
        stacklevel=3,
    )


def _decayed_by(inner, params, leaves, anchored):
    """The paths of the anchored tensors that `inner` decays (a probe on concrete parameters; else none).

    Two zero-gradient steps of `inner` from `inner.init`, once at `θ` and once at `−θ`, in
    one jitted program that returns a flag per tensor. A tensor is decayed when, at either
    step, the part of the update that flips with `θ` pulls every nonzero entry toward the
    origin, as `−λθ` does. Noise (the same key in both runs), clipping, momentum, a parameter
    scale applied to a zero update, and the rounding of a difference of interpolations
    (schedule-free), which moves a few entries either way, do not. The second step catches
    a learning-rate warm-up from 0. float16 is probed in float32, where a small `lr · λ · θ`
    does not round to 0.
    """
    if not any(anchored) or not is_concrete(leaves.values):
        return []

    def widen(p):
        return p.astype(jnp.float32) if p.dtype == jnp.float16 else p

    def decayed(params):
        def two_steps(theta):
            zeros = jax.tree.map(jnp.zeros_like, theta)
            first, state = inner.update(zeros, inner.init(theta), theta)
            second, _ = inner.update(zeros, state, theta)
            return leaves.treedef.flatten_up_to(first), leaves.treedef.flatten_up_to(second)

        theta = jax.tree.map(widen, params)
        plus, minus = two_steps(theta), two_steps(jax.tree.map(jnp.negative, theta))
        flags = []
        for i, (value, flag) in enumerate(zip(leaves.treedef.flatten_up_to(theta), anchored, strict=True)):
            if not flag:
                continue
            nonzero = value != 0
            steps = []
            for a, b in zip(plus, minus, strict=True):
                toward_origin = jnp.sign(jnp.asarray(a[i]) - jnp.asarray(b[i])) * jnp.sign(value) < 0
                steps.append(jnp.any(nonzero) & jnp.all(toward_origin | ~nonzero))
            flags.append(steps[0] | steps[1])
        return flags

    try:
        flags = jax.device_get(jax.jit(decayed)(params))
    except Exception:  # an inner that needs extra arguments (a line search): its update will say so
        return []
    paths = [path for path, flag in zip(leaves.paths, anchored, strict=True) if flag]
    return [path for path, flag in zip(paths, flags, strict=True) if flag]


def _init_projection(leaves, anchored, axes):
    rows = [
        core.ftp_init(p, row_axis=axis, xp=jnp) if flag else ABSENT
        for p, flag, axis in zip(leaves.values, anchored, axes, strict=True)
    ]
    return merge(leaves, rows, FTPProjectionState)


def _projections(leaves, tree, anchored, axes, where):
    """FTP's per-leaf states, each field checked: shapes from the parameter and its row axis, dtypes too."""
    if not isinstance(tree, tuple) or len(tree) != len(FTPProjectionState._fields):
        raise TypeError(f"{where}: state.projection is not an FTPProjectionState")
    rows = split(leaves, tree, core.FTPState, "state.projection", where)
    statistics = [core.radius_dtype(p.dtype, xp=jnp) for p in leaves.values]
    expected = {
        "radius": ([()] * len(rows), statistics),
        "radius_exp_avg": ([()] * len(rows), statistics),
        "radius_exp_avg_sq": ([()] * len(rows), statistics),
        "prev_displacement": (None, None),
        "prev_inv_norm": (
            [core.mars_shape(p.shape, axis) for p, axis in zip(leaves.values, axes, strict=True)],
            statistics,
        ),
    }
    for field, (shapes, dtypes) in expected.items():
        column = [r if is_absent(r) else getattr(r, field) for r in rows]
        check_state_leaves(
            leaves, column, f"state.projection.{field}", where, present=anchored, shapes=shapes, dtypes=dtypes
        )
    return rows


def _param_shaped(leaves, tree, what, where):
    """A state field with the parameters' shapes and dtypes, one array per leaf."""
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


def _adam_in_dtype(moment, dtype):
    return core.AdamState(*(_in_dtype(m, dtype) for m in moment))


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


def _in_dtype(value, dtype):
    """`value` (an array or `None`) in `dtype`: the state keeps the dtypes init gave it.

    Array hyperparameters (`optax.inject_hyperparams`) are float32 or float64 arrays, and
    `β · m` would otherwise promote a 16-bit moment, step after step.
    """
    return value if value is None or value.dtype == dtype else value.astype(dtype)


def _ftp_leaf(param, direction, anchor, grad, projection, step, k, anchored, row_axis):
    """FTP's step for one tensor as an optax update; an unanchored tensor takes `θ − d`."""
    if not anchored:
        return -direction, ABSENT
    # The new displacement waits for ∇γ (the last read of the old one); XLA's CSE merges this ∇γ
    # with the identical one in ftp_project.
    radius_grad = core.radius_gradient(
        grad, projection.prev_displacement, projection.prev_inv_norm, k=k, row_axis=row_axis, xp=jnp
    )
    direction = _after(direction, radius_grad)
    new_param, projection = core.ftp_project(
        param, direction, anchor, grad, projection, step, k=k, row_axis=row_axis, xp=jnp
    )
    return new_param - param, projection


def _displacement(value, anchor):
    """`θ − θ₀` (`θ` for a zero anchor) in `core.statistics_dtype`, formed as `tether.core`'s SPD forms it."""
    dtype = core.statistics_dtype(value.dtype, xp=jnp)
    displacement = jnp.astype(value, dtype, copy=False)
    return displacement if anchor is None else displacement - jnp.astype(anchor, dtype, copy=False)


def _spd_decay(proposed, anchor, statistics, weight_decay):
    """`core.spd_decay` (the same calls, so the same numbers), returning SPD's ratio `r` and condition too.

    Both are scalars of the norms the step computes anyway: recording them in the state costs
    no full-size pass.

    Returns:
        tuple: `(θ, r, −⟨g, θ − θ₀⟩ < 0)`.
    """
    new_distance = core.l2_norm(_displacement(proposed, anchor), xp=jnp)
    strength = core.decay_strength(statistics, new_distance, weight_decay, xp=jnp)
    new_param = core.decay_toward_anchor(proposed, anchor, strength, xp=jnp)
    ratio = core.decay_ratio(new_distance, statistics.distance, xp=jnp)
    return new_param, ratio, -statistics.alignment < 0


def _init_spd_records(leaves, anchored):
    """SPD's records before any step: `r = 0` and no decay, per anchored tensor."""
    ratio = [
        jnp.zeros((), core.statistics_dtype(p.dtype, xp=jnp)) if flag else ABSENT
        for p, flag in zip(leaves.values, anchored, strict=True)
    ]
    decayed = [jnp.zeros((), jnp.bool_) if flag else ABSENT for flag in anchored]
    return unflatten(leaves, ratio), unflatten(leaves, decayed)


def _check_spd_records(leaves, state, anchored, where):
    """`state.ratio` and `state.decayed`: a 0-d array per anchored tensor (at least float32, bool)."""
    if state.ratio is None or state.decayed is None:
        raise ValueError(
            f"{where}: the state has no `ratio` and `decayed` (SPD's records of the last step, read by "
            "`diagnostics`): it was made by an older version of tether. The step does not read them, so "
            "add fresh ones: `new = tx.init(params); state = state._replace(ratio=new.ratio, "
            "decayed=new.decayed)`"
        )
    scalars = [()] * len(leaves.values)
    widths = [core.statistics_dtype(p.dtype, xp=jnp) for p in leaves.values]
    for field, dtypes in (("ratio", widths), ("decayed", [jnp.bool_] * len(widths))):
        values = line_up(leaves, getattr(state, field), f"state.{field}", where)
        check_state_leaves(
            leaves, values, f"state.{field}", where, present=anchored, shapes=scalars, dtypes=dtypes
        )


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
    row_axis: RowAxis = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam (PyTorch's AdamW form) with Fast Trainable Projection.

    Per tensor, with `t` the step count (`ALGORITHMS.md` §3, §4):

        d = (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε) + lr · wd · θ
        c = (θ − d) − θ₀             n = MARS(c) + 1e-8   (per row: per output unit)
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
        anchor: `"init"` (the parameters given to `init`) or `"zero"` (warns at `init`
            when an anchored tensor is not zero: the first step would wipe it; for LoRA
            adapters FTP's anchor is their initialisation, `"init"`).
        mask: Which tensors are anchored: a pytree of bools (or a prefix of the
            parameters' tree), or a callable of the parameters returning one.
        row_axis: Which axis of each tensor holds its rows (its output units), for the
            per-row MARS norm. `None`: the last axis for a tensor of 2+ dims whose key
            path has a key named `kernel` (flax's `Dense` `(in, out)` and `Conv`
            `(kh, kw, in, out)` kernels), axis 0 for everything else (PyTorch's layout,
            embeddings, biases). Or an int for every tensor, a pytree of ints with the
            structure of the parameters (or a prefix of it), or a callable
            `(key_path, leaf) -> int`. Static.

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
    check_row_axis(row_axis, where)

    def init_fn(params):
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        _warn_zero_anchor(at, leaves, anchored, anchor)
        return AdamFTPState(
            jnp.zeros([], jnp.int32),
            *_init_adam(leaves, amsgrad),
            anchor=_init_anchor(leaves, anchored, anchor),
            projection=_init_projection(leaves, anchored, axes),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, AdamFTPState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        moments = _adam_moments(leaves, state, amsgrad, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, axes, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_moments, new_projections = [], [], []
        for param, grad, moment, theta0, projection, flag, axis in zip(
            leaves.values, grads, moments, anchors, projections, anchored, axes, strict=True
        ):
            direction, moment = core.adam_direction(
                grad, moment, step, lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad,
                weight_decay=weight_decay, param=param, xp=jnp,
            )  # fmt: skip
            update, projection = _ftp_leaf(param, direction, theta0, grad, projection, step, k, flag, axis)
            new_updates.append(update)
            new_moments.append(_adam_in_dtype(moment, param.dtype))
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
    row_axis: RowAxis = None,
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
        momentum: Momentum factor `μ ≥ 0` (0: no buffer is stored).
        dampening: Dampening `τ ∈ [0, 1]` of the momentum.
        weight_decay: L2 penalty `wd` added to the gradient (PyTorch's SGD form).
        nesterov: Nesterov momentum (needs `momentum > 0` and `dampening == 0`).
        k: In `[0, 1]`: the factor on positive radius gradients.
        anchor: `"init"` or `"zero"` (as in `adam_ftp`).
        mask: Which tensors are anchored (as in `adam_ftp`).
        row_axis: The axis of each tensor's rows (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `SGDFTPState`.
    """
    where = "sgd_ftp"
    check_learning_rate(learning_rate, where)
    check_number("momentum", momentum, where, low=0.0)
    check_number("dampening", dampening, where, low=0.0, high=1.0)
    check_number("weight_decay", weight_decay, where, low=0.0)
    check_bool("nesterov", nesterov, where)
    if nesterov and isinstance(momentum, (int, float)) and isinstance(dampening, (int, float)):
        if momentum <= 0 or dampening != 0:
            raise ValueError(f"{where}: nesterov momentum needs momentum > 0 and dampening == 0")
    check_number("k", k, where, low=0.0, high=1.0)
    _check_common(where, anchor, mask)
    check_row_axis(row_axis, where)
    buffered = _has(momentum)

    def init_fn(params):
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        _warn_zero_anchor(at, leaves, anchored, anchor)
        buffers = unflatten(leaves, [core.sgd_init(p, xp=jnp).momentum_buffer for p in leaves.values])
        return SGDFTPState(
            jnp.zeros([], jnp.int32),
            buffers if buffered else ABSENT,
            _init_anchor(leaves, anchored, anchor),
            _init_projection(leaves, anchored, axes),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, SGDFTPState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        if buffered:
            buffers = _param_shaped(leaves, state.momentum_buffer, "state.momentum_buffer", at)
        else:
            buffers = [None] * len(leaves.values)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, axes, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_buffers, new_projections = [], [], []
        for param, grad, buffer, theta0, projection, flag, axis in zip(
            leaves.values, grads, buffers, anchors, projections, anchored, axes, strict=True
        ):
            direction, sgd_state = core.sgd_direction(
                grad, param, core.SGDState(buffer), step, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, xp=jnp,
            )  # fmt: skip
            update, projection = _ftp_leaf(param, direction, theta0, grad, projection, step, k, flag, axis)
            new_updates.append(update)
            new_buffers.append(_in_dtype(sgd_state.momentum_buffer, param.dtype))
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
            _init_anchor(leaves, anchored, anchor),
            *_init_spd_records(leaves, anchored),
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
        _check_spd_records(leaves, state, anchored, at)
        step = _safe_increment(state.count)
        lr = _learning_rate(learning_rate, state.count)
        new_updates, new_moments, ratios, decayed = [], [], [], []
        previous = None
        for param, grad, moment, theta0, flag in zip(
            leaves.values, grads, moments, anchors, anchored, strict=True
        ):
            if flag:
                param = _after(param, previous)
            direction, moment = core.adam_direction(
                grad, moment, step, lr=lr, beta1=b1, beta2=b2, eps=eps, amsgrad=amsgrad, xp=jnp
            )
            if flag:  # core.spd_step, with the ratio and the condition kept for the state
                statistics = core.spd_statistics(param, theta0, grad, xp=jnp)
                new_param, ratio, fired = _spd_decay(param - direction, theta0, statistics, weight_decay)
                new_updates.append(new_param - param)
                previous = new_param
            else:
                new_updates.append(-direction)
                ratio = fired = ABSENT
            new_moments.append(_adam_in_dtype(moment, param.dtype))
            ratios.append(ratio)
            decayed.append(fired)
        new_state = AdamSPDState(
            step,
            *_merge_adam(leaves, new_moments, amsgrad),
            state.anchor,
            unflatten(leaves, ratios),
            unflatten(leaves, decayed),
        )
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
    row_axis: RowAxis = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fast Trainable Projection around any optax transformation.

    `inner` proposes `θ̃ = θ + u` (its update `u`); FTP projects the
    displacement from the anchor onto a learned per-row MARS ball
    (`ALGORITHMS.md` §4, §6):

        c = θ̃ − θ₀     n = MARS(c) + 1e-8   (per row: per output unit)     θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c

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
        anchor: `"init"` or `"zero"` (as in `adam_ftp`).
        mask: Which tensors are anchored (as in `adam_ftp`).
        row_axis: The axis of each tensor's rows (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `FTPWrapperState`;
        extra arguments of `update` are passed to `inner`.
    """
    where = "ftp"
    check_inner(inner, where)
    check_number("k", k, where, low=0.0, high=1.0)
    _check_common(where, anchor, mask)
    check_row_axis(row_axis, where)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        _warn_zero_anchor(at, leaves, anchored, anchor)
        return FTPWrapperState(
            jnp.zeros([], jnp.int32),
            inner.init(params),
            _init_anchor(leaves, anchored, anchor),
            _init_projection(leaves, anchored, axes),
        )

    def update_fn(updates, state, params=None, **extra_args):
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, FTPWrapperState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        projections = _projections(leaves, state.projection, anchored, axes, at)
        _check_inner_state(inner, state.inner_state, params, at)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        proposals = line_up(leaves, inner_updates, "the inner transformation's updates", at)
        step = _safe_increment(state.count)
        new_updates, new_projections = [], []
        for param, grad, proposal, theta0, projection, flag, axis in zip(
            leaves.values, grads, proposals, anchors, projections, anchored, axes, strict=True
        ):
            if flag:
                update, projection = _ftp_leaf(
                    param, -proposal, theta0, grad, projection, step, k, True, axis
                )
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

    SPD replaces weight decay, so `inner` must not decay the anchored tensors
    itself (its decay would pull them toward the origin, against SPD's pull toward
    the anchor): use `optax.adam`, not `optax.adamw`. `init` checks this on concrete
    parameters (not under `jax.jit`): it takes two zero-gradient steps of `inner`
    from `inner.init`, with `θ` and with `−θ`, and raises `ValueError` if, for an
    anchored tensor, the part of the update that flips with `θ` pulls every nonzero
    entry toward the origin (a decay `−λθ` does; noise, clipping, momentum and
    schedules do not). A base whose learning rate is 0 for its first two steps is
    not caught. Unanchored tensors take `u` unchanged (a base that
    decays only them is fine). `spd(optax.adam(lr), weight_decay=λ)` equals
    `adam_spd` up to rounding.

    Reference: J. Tian, C. Huang, Z. Kira, "Rethinking Weight Decay for Robust
    Fine-Tuning of Foundation Models", NeurIPS 2024.

    Args:
        inner: The base optimizer (which must include the learning rate and must not
            decay the anchored tensors).
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
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        decayed = _decayed_by(inner, params, leaves, anchored)
        if decayed:
            shown = ", ".join(decayed[:5]) + (f" and {len(decayed) - 5} more" if len(decayed) > 5 else "")
            raise ValueError(
                f"{at}: the inner transformation decays weights (with a zero gradient it moves {shown} "
                "toward the origin). SPD replaces weight decay: it decays toward the anchor, selectively, "
                "so the base must not decay the anchored tensors itself. Use optax.adam, not optax.adamw "
                "(or mask the base's add_decayed_weights to the unanchored tensors)."
            )
        return SPDWrapperState(
            inner.init(params), _init_anchor(leaves, anchored, anchor), *_init_spd_records(leaves, anchored)
        )

    def update_fn(updates, state, params=None, **extra_args):
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, SPDWrapperState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        _check_spd_records(leaves, state, anchored, at)
        _check_inner_state(inner, state.inner_state, params, at)
        statistics, previous = [], None
        for param, theta0, grad, flag in zip(leaves.values, anchors, grads, anchored, strict=True):
            if flag:
                statistics.append(core.spd_statistics(_after(param, previous), theta0, grad, xp=jnp))
                previous = statistics[-1].distance
            else:
                statistics.append(None)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        proposals = line_up(leaves, inner_updates, "the inner transformation's updates", at)
        new_updates, ratios, decayed, previous = [], [], [], None
        for param, proposal, theta0, stats in zip(leaves.values, proposals, anchors, statistics, strict=True):
            if stats is None:
                new_updates.append(proposal)
                ratios.append(ABSENT)
                decayed.append(ABSENT)
                continue
            proposed = (_after(param, previous) + proposal).astype(param.dtype)
            new_param, ratio, fired = _spd_decay(proposed, theta0, stats, weight_decay)
            new_updates.append(new_param - param)
            ratios.append(ratio)
            decayed.append(fired)
            previous = new_param
        new_state = SPDWrapperState(
            inner_state, state.anchor, unflatten(leaves, ratios), unflatten(leaves, decayed)
        )
        return unflatten(leaves, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------------
# The reference baselines (ALGORITHMS.md §8). TPGM is in `_jax_tpgm` (`tpgm_init`, `tpgm_step`).


def l2_sp(
    alpha: float,
    *,
    anchor: str = "init",
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""L2-SP: an L2 penalty toward the anchor, as a gradient term, chained before any optimizer.

    The loss gains `(α/2) ‖θ − θ₀‖₂²` over the anchored tensors, so each anchored tensor's
    gradient becomes (`ALGORITHMS.md` §8)

        g ← g + α (θ − θ₀)

    and the optimizer that follows in the chain (its momentum, Adam's moments) sees the
    penalty: `optax.chain(l2_sp(0.01), optax.adam(1e-4))`. Unanchored tensors (`mask`
    False) keep their gradient. 16-bit tensors are penalized in float32, then cast back.

    Reference: X. Li, Y. Grandvalet, F. Davoine, "Explicit Inductive Bias for Transfer
    Learning with Convolutional Networks", ICML 2018.

    Args:
        alpha: The penalty's strength `α` (a finite number ≥ 0, or an array).
        anchor: `"init"` (the parameters given to `init`) or `"zero"` (the origin: plain L2
            weight decay added to the gradient, nothing stored).
        mask: Which tensors are anchored (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is an `L2SPState`; `update` needs
        `params`.
    """
    where = "l2_sp"
    check_number("alpha", alpha, where, low=0.0)
    _check_common(where, anchor, mask)

    def init_fn(params):
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        return L2SPState(_init_anchor(leaves, anchored, anchor))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, L2SPState, at)
        grads = check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        new_grads = [
            _l2_sp_gradient(grad, param, theta0, alpha) if flag else grad
            for grad, param, theta0, flag in zip(grads, leaves.values, anchors, anchored, strict=True)
        ]
        return unflatten(leaves, new_grads), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _l2_sp_gradient(grad, param, anchor, alpha):
    """`core.l2_sp_gradient`; a 16-bit tensor in float32 (`θ − θ₀` of two close 16-bit numbers
    keeps few bits, and the torch adapter does the same)."""
    wide = core.statistics_dtype(grad.dtype, xp=jnp)
    if wide == grad.dtype:
        return core.l2_sp_gradient(grad, param, anchor, alpha, xp=jnp)
    theta0 = None if anchor is None else anchor.astype(wide)
    return core.l2_sp_gradient(grad.astype(wide), param.astype(wide), theta0, alpha, xp=jnp).astype(
        grad.dtype
    )


def mars_sp(
    inner: optax.GradientTransformation,
    *,
    radius: float,
    anchor: str = "init",
    mask: MaskOrFn = None,
    row_axis: RowAxis = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MARS-SP around any optax transformation: after its step, a projection onto a fixed MARS ball.

    `inner` proposes `θ̃ = θ + u`; each anchored tensor is then projected, row by row (the
    output units), onto the ball of radius `γ` around its anchor (`ALGORITHMS.md` §2, §8):

        c = θ̃ − θ₀     n = MARS(c)   (per row)     θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c

    Rows inside the ball are untouched. FTP (`ftp`, `adam_ftp`) learns this radius per tensor
    instead. Unanchored tensors take `u` unchanged.

    Reference: H. Gouk, T. M. Hospedales, M. Pontil, "Distance-Based Regularisation of Deep
    Networks for Fine-Tuning", ICLR 2021.

    Args:
        inner: The base optimizer (which must include the learning rate), e.g.
            `optax.sgd(1e-2, momentum=0.9)`.
        radius: The fixed radius `γ` of every anchored tensor's rows (a finite number ≥ 0,
            or an array).
        anchor: `"init"` or `"zero"` (as in `adam_ftp`).
        mask: Which tensors are anchored (as in `adam_ftp`).
        row_axis: The axis of each tensor's rows (as in `adam_ftp`).

    Returns:
        optax.GradientTransformationExtraArgs: its state is a `MARSSPState`; extra arguments of
        `update` are passed to `inner`.
    """
    where = "mars_sp"
    check_inner(inner, where)
    check_number("radius", radius, where, low=0.0)
    _check_common(where, anchor, mask)
    check_row_axis(row_axis, where)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        at = f"{where}.init"
        leaves = flatten_params(params, at)
        anchored = resolve_mask(mask, params, leaves, at)
        resolve_row_axis(row_axis, params, leaves, at)  # a row axis that does not fit fails here
        return MARSSPState(inner.init(params), _init_anchor(leaves, anchored, anchor))

    def update_fn(updates, state, params=None, **extra_args):
        at = f"{where}.update"
        leaves = flatten_params(params, at)
        _check_state(state, MARSSPState, at)
        check_grads(leaves, updates, at)
        anchored = resolve_mask(mask, params, leaves, at)
        axes = resolve_row_axis(row_axis, params, leaves, at)
        anchors = _anchors(leaves, state.anchor, anchored, anchor, at)
        _check_inner_state(inner, state.inner_state, params, at)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        proposals = line_up(leaves, inner_updates, "the inner transformation's updates", at)
        new_updates = []
        for param, proposal, theta0, flag, axis in zip(
            leaves.values, proposals, anchors, anchored, axes, strict=True
        ):
            if not flag:
                new_updates.append(proposal)
                continue
            proposed = (param + proposal).astype(param.dtype)
            new_param = core.mars_sp_project(proposed, theta0, radius, row_axis=axis, xp=jnp)
            new_updates.append(new_param - param)
        return unflatten(leaves, new_updates), MARSSPState(inner_state, state.anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def wise_ft(anchor_params: optax.Params, params: optax.Params, alpha: float) -> optax.Params:
    r"""WiSE-FT: the fine-tuned weights interpolated with the pre-trained ones.

    For every floating-point leaf (parameters and floating statistics such as BatchNorm's
    running means; `ALGORITHMS.md` §8):

        θ = (1 − α) θ₀ + α θ_ft

    computed in at least float32, in the fine-tuned leaf's dtype; every other leaf (integer
    counters, bools) comes from `params`. A pure function: it traces under `jax.jit` (with
    `alpha` an array), and several `α` can be tried from the same fine-tuned weights.

    Reference: M. Wortsman, G. Ilharco, J. W. Kim, M. Li, S. Kornblith, R. Roelofs, R. Gontijo
    Lopes, H. Hajishirzi, A. Farhadi, H. Namkoong, L. Schmidt, "Robust fine-tuning of zero-shot
    models", CVPR 2022.

    Args:
        anchor_params: The pre-trained weights `θ₀`, with the tree and shapes of `params`.
        params: The fine-tuned weights `θ_ft`.
        alpha: In `[0, 1]`: 0 is the pre-trained model, 1 the fine-tuned one.

    Returns:
        A pytree with the structure of `params`.

    Raises:
        ValueError: `alpha` outside `[0, 1]` or not finite, or `anchor_params` whose tree or
            shapes differ from `params`' (naming the leaf).
    """
    where = "wise_ft"
    check_number("alpha", alpha, where, low=0.0, high=1.0)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        anchors = treedef.flatten_up_to(anchor_params)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{where}: anchor_params does not have the tree structure of params.\n"
            f"  params:        {treedef}\n  anchor_params: {jax.tree.structure(anchor_params)}\n  ({error})"
        ) from None
    mixed = []
    for (path, value), theta0 in zip(path_leaves, anchors, strict=True):
        name = jax.tree_util.keystr(path) or "<root>"
        shape = getattr(theta0, "shape", None)
        if shape is None and isinstance(theta0, (int, float)):
            shape = ()
        if shape is None or tuple(shape) != tuple(jnp.shape(value)):
            shape = type(theta0).__name__ if shape is None else tuple(shape)
            raise ValueError(f"{where}: the anchor's {name} is {shape}, the fine-tuned {jnp.shape(value)}")
        if hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating):
            mixed.append(core.wise_ft(jnp.asarray(theta0).astype(value.dtype), value, alpha, xp=jnp))
        else:
            mixed.append(value)
    return treedef.unflatten(mixed)


# --------------------------------------------------------------------------------------------------
# Diagnostics: per-tensor numbers for the user's own logging, read from the states.

_METHODS = {
    AdamFTPState: "adam_ftp",
    SGDFTPState: "sgd_ftp",
    FTPWrapperState: "ftp",
    AdamSPDState: "adam_spd",
    SPDWrapperState: "spd",
    L2SPState: "l2_sp",
    MARSSPState: "mars_sp",
    TPGMState: "tpgm",
}
_STATES = tuple(_METHODS)


def diagnostics(state: Any, params: optax.Params) -> dict[str, dict[str, float | bool]]:
    r"""Per-tensor diagnostics of tether's methods, as plain Python numbers to log from any loop.

    For each parameter leaf, keyed by its path as `jax.tree_util.keystr` prints it (as the
    errors name it; `"<root>"` for a lone array), a dict with:

    - `"distance"`: `‖θ − θ₀‖₂` (`θ₀` the anchor; the origin for `anchor="zero"`), computed
      in at least float32, for every anchored tensor;
    - `"radius"`: FTP's learned radius `γ` (`adam_ftp`, `sgd_ftp`, `ftp`), the one its last
      step projected with (0.0 before the first step);
    - `"ratio"`: SPD's ratio of the last step (`adam_spd`, `spd`),
      `r = clip((‖θ̃ − θ₀‖₂ − ‖θ − θ₀‖₂) / ‖θ̃ − θ₀‖₂, 0, 1)`, and `"decayed"`: whether its
      condition `−⟨g, θ − θ₀⟩ < 0` held, so that the step moved `θ̃` toward the anchor by
      the fraction `λ · r` (0.0 and False before the first step);
    - `"constraint"`: TPGM's constraint `γ` (a `TPGMState`; 0.0 before the first `tpgm_step`).

    The values are Python floats and bools, so they go straight to JSON or any metrics
    logger. An unanchored tensor (`mask` False) has an empty dict. `l2_sp` and `mars_sp`
    with `anchor="zero"` store nothing per tensor, so they add no entry; MARS-SP's radius is
    its hyperparameter, not state.

    The values are read from the devices (one transfer for all, after one jitted computation
    of the distances): call it outside `jax.jit`, every few steps, on the state and the
    parameters that the step returned.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from tether.adapters.jax import adam_spd, diagnostics
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}
        >>> tx = optax.chain(optax.clip_by_global_norm(1.0), adam_spd(1e-2, weight_decay=1.0))
        >>> state = tx.init(params)
        >>> diagnostics(state, params)["['w']"]
        {'distance': 0.0, 'ratio': 0.0, 'decayed': False}

    Args:
        state: The state of any of tether's transformations, or an optax state holding
            some (a chain's tuple, `optax.inject_hyperparams`, `optax.masked`,
            `optax.multi_transform`; the inner state of `ftp`, `spd` and `mars_sp` too), or a
            `TPGMState`, or a tuple of such states (`(opt_state, tpgm_state)`). The entries
            of several states are merged per tensor.
        params: The parameters, with the tree the transformations were given.

    Returns:
        dict: `{path: {name: value}}`, one entry per parameter leaf, in the tree's order.

    Raises:
        TypeError: `state` holds no tether state, or the call is inside `jax.jit`.
        ValueError: a state with entries for tensors that `params` does not have (or of
            other shapes), a state of `adam_spd` or `spd` from a version without SPD's
            records, or two states that give one tensor different values of one entry
            (two anchors for one tensor: pass each state on its own).
    """
    where = "diagnostics"
    found = _tether_states(state)
    if not found:
        raise TypeError(
            f"{where}: no tether state in the {type(state).__name__} given: pass the state of a tether "
            f"transformation ({', '.join(_METHODS.values())}), an optax state that holds one (a chain's "
            "tuple, inject_hyperparams, masked), or a tuple of such states"
        )
    if params is None:
        raise ValueError(f"{where}: `params` is required (the parameters the transformations were given)")
    path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in path_leaves]
    values = dict(zip(paths, (leaf for _, leaf in path_leaves), strict=True))
    rows = []  # (method, path, θ, θ₀ or None, {name: 0-d array}) per anchored tensor of each state
    for method, entries in ((_METHODS[type(s)], _entries(s, where)) for s in found):
        for path, (theta0, numbers) in entries.items():
            param = values.get(path)
            if param is None or not hasattr(param, "shape"):
                what = "has no such leaf" if param is None else f"has a {type(param).__name__} there"
                raise ValueError(
                    f"{where}: the {method} state has an entry for {path}, but `params` {what}: the "
                    "state belongs to other parameters"
                )
            if theta0 is not None and tuple(theta0.shape) != tuple(param.shape):
                raise ValueError(
                    f"{where}: the {method} state's anchor of {path} has shape {tuple(theta0.shape)}, the "
                    f"parameter {tuple(param.shape)}: the state belongs to other parameters"
                )
            rows.append((method, path, param, theta0, numbers))
    arrays = [a for _, _, param, theta0, numbers in rows for a in (param, theta0, *numbers.values())]
    if not is_concrete(arrays):
        raise TypeError(
            f"{where}: reads the values to the host, for logging: call it outside jax.jit, on the state "
            "and parameters the jitted step returns"
        )
    distances = _distances([(param, theta0) for _, _, param, theta0, _ in rows])
    measured = [
        (method, path, name, value)
        for (method, path, _, _, numbers), distance in zip(rows, distances, strict=True)
        for name, value in {"distance": distance, **numbers}.items()
    ]
    host = jax.device_get([value for *_, value in measured])  # one transfer for all
    out, origin = {path: {} for path in paths}, {}
    for (method, path, name, _), value in zip(measured, host, strict=True):
        value = bool(value) if name == "decayed" else float(value)
        if name in out[path] and not _same(out[path][name], value):
            raise ValueError(
                f"{where}: {path} has {name} {out[path][name]} from {origin[path, name]} and {value} from "
                f"{method}: the two states disagree (for the distance: they anchor it differently); pass "
                "each state to diagnostics on its own"
            )
        out[path][name] = value
        origin[path, name] = method
    return out


def _tether_states(state):
    """The tether states inside `state`, in tree order (the inner state of a wrapper searched too)."""
    found = []
    for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _STATES)):
        if isinstance(node, _STATES):
            found.append(node)
            if "inner_state" in node._fields:
                found.extend(_tether_states(node.inner_state))
    return found


def _by_path(tree):
    """A params-shaped state field's arrays by the path of their parameter (absent entries skipped)."""
    return {
        jax.tree_util.keystr(path) or "<root>": leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _entries(state, where):
    """Per anchored tensor of one tether state: `(θ₀ or None, {name: 0-d array})`, by path."""
    anchors = _by_path(state.anchor)
    if isinstance(state, (AdamFTPState, SGDFTPState, FTPWrapperState)):
        numbers = {path: {"radius": r} for path, r in _by_path(state.projection.radius).items()}
    elif isinstance(state, (AdamSPDState, SPDWrapperState)):
        if state.ratio is None or state.decayed is None:
            raise ValueError(
                f"{where}: the {_METHODS[type(state)]} state has no `ratio` and `decayed`: it was made by "
                "an older version of tether (its update says how to add them)"
            )
        ratio, decayed = _by_path(state.ratio), _by_path(state.decayed)
        if ratio.keys() != decayed.keys():
            raise ValueError(
                f"{where}: the {_METHODS[type(state)]} state's ratio and decayed are for different "
                f"tensors ({sorted(ratio.keys() ^ decayed.keys())[:3]}): the state is corrupt"
            )
        numbers = {path: {"ratio": r, "decayed": decayed[path]} for path, r in ratio.items()}
    elif isinstance(state, TPGMState):
        numbers = {path: {"constraint": c} for path, c in _by_path(state.constraint).items()}
    else:  # L2SPState, MARSSPState: the anchor is all they store per tensor
        numbers = {path: {} for path in anchors}
    return {path: (anchors.get(path), entries) for path, entries in numbers.items()}


@jax.jit
def _distances(pairs):
    """`‖θ − θ₀‖₂` per `(θ, θ₀ or None)` pair, in at least float32 (reductions: no full-size buffer)."""
    return [core.l2_norm(_displacement(param, theta0), xp=jnp) for param, theta0 in pairs]


def _same(a, b):
    return a == b or (a != a and b != b)  # NaN equals NaN here: the same diverged tensor
