"""FTP: Fast Trainable Projection (Tian et al., NeurIPS 2023; ALGORITHMS.md §4).

One learned radius `γ` per anchored tensor, trained online by a tiny Adam of
its own ("AdamUtil") on the gradient of the loss with respect to `γ`; after
every base step the displacement from the anchor is projected onto the MARS ball
of that radius.
"""

from typing import Any, NamedTuple

from ._namespace import as_dtype, namespace
from .norms import mars_norm, mars_shape, rowdot

#: The radius optimizer's constants: learning rate μ, betas, ε, and the floor of γ.
RADIUS_LR = 1e-2
RADIUS_BETA1 = 0.9
RADIUS_BETA2 = 0.999
RADIUS_EPS = 1e-8
RADIUS_FLOOR = 1e-8
#: Added to the MARS norm of the displacement before dividing by it.
NORM_EPS = 1e-8


class FTPState(NamedTuple):
    """What FTP carries per anchored tensor.

    `radius`, `radius_exp_avg`, `radius_exp_avg_sq`: 0-d, at least float32.
    `prev_displacement`: `c` of the previous step (shape and dtype of `θ`).
    `prev_inv_norm`: `1 / n` of the previous step (MARS-shaped, at least float32).
    """

    radius: Any
    radius_exp_avg: Any
    radius_exp_avg_sq: Any
    prev_displacement: Any
    prev_inv_norm: Any


def radius_dtype(dtype, *, xp):
    """The dtype of FTP's statistics for a tensor of `dtype`: at least float32.

    The norms `n`, `1 / n`, the radius and its moments and the ratio `γ / n` are computed
    and stored in it: in float16 the norm's `1e-8` and the radius floor round to 0 and
    `1 / n` overflows for rows whose L1 norm is below about 1.5e-5.
    """
    return xp.result_type(dtype, xp.float32)


def _widen(x, dtype, xp):
    return None if x is None else xp.astype(x, dtype, copy=False)


def _is_empty(x):
    return any(d == 0 for d in x.shape)


def ftp_init(param, *, row_axis=0, xp=None):
    """FTP's initial state for `param` (all zeros; the first step sets `γ = 1e-8`).

    The scalars and `prev_inv_norm` (shaped by `mars_shape(param.shape, row_axis)`) are
    of `radius_dtype`; `prev_displacement` has `param`'s shape and dtype.
    """
    xp = namespace(xp, param)
    scalar = radius_dtype(param.dtype, xp=xp)
    # three arrays, not one shared: a shared buffer cannot be donated (jax.jit donate_argnums)
    return FTPState(
        radius=xp.zeros((), dtype=scalar),
        radius_exp_avg=xp.zeros((), dtype=scalar),
        radius_exp_avg_sq=xp.zeros((), dtype=scalar),
        prev_displacement=xp.zeros_like(param),
        prev_inv_norm=xp.zeros(mars_shape(param.shape, row_axis), dtype=scalar),
    )


def radius_gradient(grad, prev_displacement, prev_inv_norm, *, k=1.0, row_axis=0, xp=None):
    """The gradient of the loss with respect to `γ`, a scalar (ALGORITHMS.md §4).

        ∇γ = Σ rowdot(g, c_prev) ⊙ s_prev;   ∇γ ← k · ∇γ if ∇γ > 0

    `g` is this step's raw gradient, `c_prev` and `s_prev = 1 / n_prev` the
    previous step's displacement and inverse norm. `k ∈ [0, 1]` damps only the
    positive gradients, those that would shrink the radius. Computed in
    `radius_dtype` (at least float32).
    """
    xp = namespace(xp, grad, prev_displacement, prev_inv_norm)
    dtype = radius_dtype(grad.dtype, xp=xp)
    rows = rowdot(_widen(grad, dtype, xp), _widen(prev_displacement, dtype, xp), row_axis=row_axis, xp=xp)
    return damp_radius_gradient(xp.sum(rows * _widen(prev_inv_norm, dtype, xp)), k, xp=xp)


def damp_radius_gradient(radius_grad, k, *, xp=None):
    """`∇γ ← k·∇γ` where `∇γ > 0` (elementwise, so it applies to stacked per-tensor gradients)."""
    xp = namespace(xp, radius_grad)
    return xp.where(radius_grad > 0, k * radius_grad, radius_grad)


def radius_update(state, radius_grad, max_norm, step, *, xp=None):
    """One step of the radius's own Adam ("AdamUtil"), then the clip (ALGORITHMS.md §4).

        m_γ ← 0.9 m_γ + 0.1 ∇γ
        v_γ ← 0.999 v_γ + 0.001 ∇γ²
        γ   ← γ − μ · (m_γ / (1 − 0.9ᵗ)) / (√(v_γ / (1 − 0.999ᵗ)) + 1e-8)
        γ   ← clip(γ, 1e-8, max n)

    with `μ = 1e-2` and `t` the tensor's own step count, so the first update
    (`t = 2`) already divides by `1 − 0.9²`. On the first step (`t == 1`) there is
    no update: `γ = 1e-8` and `m_γ = v_γ = 0`. The arithmetic is in the radius
    state's dtype (at least float32). `max_norm` is `max n` of this step.

    Returns:
        tuple: `(radius, radius_exp_avg, radius_exp_avg_sq)`.
    """
    xp = namespace(xp, state.radius, radius_grad, max_norm, step)
    dtype = state.radius.dtype
    t = as_dtype(step, dtype, xp)
    g = xp.astype(radius_grad, dtype, copy=False)
    m = RADIUS_BETA1 * state.radius_exp_avg + (1 - RADIUS_BETA1) * g
    v = RADIUS_BETA2 * state.radius_exp_avg_sq + (1 - RADIUS_BETA2) * (g * g)
    step_size = RADIUS_LR / (1 - RADIUS_BETA1**t)
    denom = xp.sqrt(v) / xp.sqrt(1 - RADIUS_BETA2**t) + RADIUS_EPS
    radius = state.radius - step_size * (m / denom)
    # both bounds arrays: array_api_compat.torch's clip turns a scalar bound into a tensor with
    # torch.as_tensor(..., device=x.device), a host-to-device copy that synchronizes a CUDA stream
    radius = xp.clip(radius, xp.full_like(radius, RADIUS_FLOOR), xp.astype(max_norm, dtype, copy=False))
    first = t == 1
    zero = xp.zeros_like(m)
    return (
        xp.where(first, xp.full_like(radius, RADIUS_FLOOR), radius),
        xp.where(first, zero, m),
        xp.where(first, zero, v),
    )


def ftp_project(param, direction, anchor, grad, state, step, *, k=1.0, row_axis=0, xp=None):
    """FTP's step for one anchored tensor, given the base direction `d` (ALGORITHMS.md §4, §6).

        c = (θ − d) − θ₀                   the unconstrained displacement
        n = MARS(c) + 1e-8                 per row (`row_axis`: the output units)
        γ ← radius_update(∇γ(g, c_prev, s_prev), max n, t)
        θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c
        c_prev ← c;  s_prev ← 1 / n

    `anchor` is `θ₀`, or `None` for a zero anchor (PEFT/LoRA). To wrap any base
    optimizer, pass `direction = θ − θ̃`. `k` damps the positive radius gradients
    (see `radius_gradient`). The arithmetic is in `radius_dtype` (at least float32);
    `c_prev` is stored in `θ`'s dtype. An empty tensor has nothing to project: it and
    its state come back unchanged.

    Returns:
        tuple: `(new_param, FTPState)`, the parameter in its own dtype.
    """
    if _is_empty(param):
        return param, state
    xp = namespace(xp, param, direction, anchor, grad, step)
    dtype = radius_dtype(param.dtype, xp=xp)
    displacement = _widen(param, dtype, xp) - _widen(direction, dtype, xp)
    if anchor is not None:
        displacement = displacement - _widen(anchor, dtype, xp)
    norm = mars_norm(displacement, row_axis=row_axis, xp=xp) + NORM_EPS
    radius_grad = radius_gradient(
        grad, state.prev_displacement, state.prev_inv_norm, k=k, row_axis=row_axis, xp=xp
    )
    radius, radius_exp_avg, radius_exp_avg_sq = radius_update(state, radius_grad, xp.max(norm), step, xp=xp)
    scale = xp.clip(xp.astype(radius, dtype, copy=False) / norm, 0.0, 1.0)
    projected = scale * displacement
    if anchor is not None:
        projected = _widen(anchor, dtype, xp) + projected
    new_state = FTPState(
        radius,
        radius_exp_avg,
        radius_exp_avg_sq,
        xp.astype(displacement, param.dtype, copy=False),
        xp.astype(1 / norm, state.prev_inv_norm.dtype, copy=False),
    )
    return xp.astype(projected, param.dtype, copy=False), new_state
