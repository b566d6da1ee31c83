"""SPD: Selective Projection Decay (Tian et al., NeurIPS 2024; ALGORITHMS.md §5).

Decay toward the anchor, applied only to tensors whose gradient pushes them
away from it, with a strength that follows how far this step moved them away.
"""

from typing import Any, NamedTuple

from ._namespace import as_dtype, namespace
from .ftp import radius_dtype
from .norms import l2_norm


class SPDStatistics(NamedTuple):
    """The two scalars SPD needs from before the base step.

    `alignment` is `⟨g, θ − θ₀⟩` (SPD's condition is `c = −alignment`);
    `distance` is `‖θ − θ₀‖₂`.
    """

    alignment: Any
    distance: Any


def spd_statistics(param, anchor, grad, *, xp=None):
    """Measure `⟨g, θ − θ₀⟩` and `‖θ − θ₀‖₂` before the base step moves `θ` (ALGORITHMS.md §6).

    `anchor=None` is a zero anchor. Computed in at least float32 (`statistics_dtype`):
    in float16 the products underflow and the sum of squares overflows.
    """
    xp = namespace(xp, param, anchor, grad)
    displacement = _displacement(param, anchor, xp)
    grad = xp.astype(grad, displacement.dtype, copy=False)
    return SPDStatistics(xp.sum(grad * displacement), l2_norm(displacement, xp=xp))


def statistics_dtype(dtype, *, xp):
    """The dtype SPD's norms, inner product and ratio are computed in: at least float32."""
    return radius_dtype(dtype, xp=xp)


def _displacement(param, anchor, xp):
    """`θ − θ₀` (`θ` for a zero anchor) in `statistics_dtype`."""
    dtype = statistics_dtype(param.dtype, xp=xp)
    displacement = xp.astype(param, dtype, copy=False)
    if anchor is not None:
        displacement = displacement - xp.astype(anchor, dtype, copy=False)
    return displacement


def decay_ratio(new_distance, distance, *, xp=None):
    """How much of this step moved the tensor away from the anchor.

        r = clip((a − b) / a, 0, 1),   r = 0 when a = 0

    with `a = ‖θ̃ − θ₀‖₂` (after the base step) and `b = ‖θ − θ₀‖₂` (before it).
    The `a = 0` rule (undefined in the authors' code) makes 0/0 give 0.
    """
    xp = namespace(xp, new_distance, distance)
    moved = new_distance > 0
    safe = xp.where(moved, new_distance, xp.ones_like(new_distance))
    ratio = xp.clip((new_distance - distance) / safe, 0.0, 1.0)
    return xp.where(moved, ratio, xp.zeros_like(ratio))


def spd_decay(new_param, anchor, statistics, weight_decay, *, xp=None):
    """Apply selective projection decay after a base step (ALGORITHMS.md §5).

        c = −⟨g, θ − θ₀⟩
        θ ← θ̃ − λ · r · (θ̃ − θ₀)   if c < 0 (the gradient pushes away from θ₀)
        θ ← θ̃                       otherwise

    `new_param` is `θ̃`, `statistics` comes from `spd_statistics` on `θ` before
    the step, `r` is `decay_ratio`. `λ` (`weight_decay`) is not multiplied by the
    learning rate. `anchor=None` is a zero anchor.
    """
    xp = namespace(xp, new_param, anchor, weight_decay)
    new_distance = l2_norm(_displacement(new_param, anchor, xp), xp=xp)
    strength = decay_strength(statistics, new_distance, weight_decay, xp=xp)
    return decay_toward_anchor(new_param, anchor, strength, xp=xp)


def decay_toward_anchor(new_param, anchor, strength, *, xp=None):
    """Move `θ̃` toward the anchor by the fraction `strength` (`λ·r`, from `decay_strength`).

        θ ← (1 − λr) θ̃ + λr θ₀     (= θ̃ − λr (θ̃ − θ₀))

    written so that `θ̃ − θ₀` is not needed again after its norm (XLA:CPU then keeps one
    fewer full-size temporary). `anchor=None` is a zero anchor. Computed in
    `statistics_dtype` (a 16-bit `θ̃` is not scaled in 16 bits); keeps `θ̃`'s dtype.
    """
    xp = namespace(xp, new_param, anchor, strength)
    dtype = statistics_dtype(new_param.dtype, xp=xp)
    strength = as_dtype(strength, dtype, xp)
    decayed = (1 - strength) * xp.astype(new_param, dtype, copy=False)
    if anchor is not None:
        decayed = decayed + strength * xp.astype(anchor, dtype, copy=False)
    return xp.astype(decayed, new_param.dtype, copy=False)


def decay_strength(statistics, new_distance, weight_decay, *, xp=None):
    """`λ·r` where SPD's condition `c = −⟨g, θ − θ₀⟩ < 0` holds, else 0.

    Elementwise on its scalars, so it applies to per-tensor statistics stacked into vectors.
    """
    xp = namespace(xp, statistics.alignment, statistics.distance, new_distance, weight_decay)
    ratio = decay_ratio(new_distance, statistics.distance, xp=xp)
    return weight_decay * xp.where(-statistics.alignment < 0, ratio, xp.zeros_like(ratio))


def spd_step(param, direction, anchor, grad, weight_decay, *, xp=None):
    """SPD's fused step for one anchored tensor: `θ̃ = θ − d`, then `spd_decay`."""
    xp = namespace(xp, param, direction, anchor, grad, weight_decay)
    statistics = spd_statistics(param, anchor, grad, xp=xp)
    return spd_decay(param - direction, anchor, statistics, weight_decay, xp=xp)
