"""FTP: Fast Trainable Projection (Tian et al., NeurIPS 2023; ALGORITHMS.md §4).

One learned radius `γ` per anchored tensor, trained online by a tiny Adam of
its own ("AdamUtil") on the gradient of the loss with respect to `γ`; after
every base step the displacement from the anchor is projected onto the MARS ball
of that radius.
"""

from typing import Any, NamedTuple

from ._namespace import as_dtype, namespace
from .norms import mars_norm, rowdot

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
    `prev_inv_norm`: `1 / n` of the previous step (MARS-shaped, dtype of `θ`).
    """

    radius: Any
    radius_exp_avg: Any
    radius_exp_avg_sq: Any
    prev_displacement: Any
    prev_inv_norm: Any


def radius_dtype(dtype, *, xp):
    """The dtype of the scalar radius state for a tensor of `dtype`: at least float32."""
    return xp.result_type(dtype, xp.float32)


def ftp_init(param, *, xp=None):
    """FTP's initial state for `param` (all zeros; the first step sets `γ = 1e-8`)."""
    xp = namespace(xp, param)
    scalar = radius_dtype(param.dtype, xp=xp)
    # three arrays, not one shared: a shared buffer cannot be donated (jax.jit donate_argnums)
    return FTPState(
        radius=xp.zeros((), dtype=scalar),
        radius_exp_avg=xp.zeros((), dtype=scalar),
        radius_exp_avg_sq=xp.zeros((), dtype=scalar),
        prev_displacement=xp.zeros_like(param),
        prev_inv_norm=xp.zeros_like(mars_norm(param, xp=xp)),
    )


def radius_gradient(grad, prev_displacement, prev_inv_norm, *, k=1.0, xp=None):
    """The gradient of the loss with respect to `γ`, a scalar (ALGORITHMS.md §4).

        ∇γ = Σ rowdot(g, c_prev) ⊙ s_prev;   ∇γ ← k · ∇γ if ∇γ > 0

    `g` is this step's raw gradient, `c_prev` and `s_prev = 1 / n_prev` the
    previous step's displacement and inverse norm. `k ∈ [0, 1]` damps only the
    positive gradients, those that would shrink the radius.
    """
    xp = namespace(xp, grad, prev_displacement, prev_inv_norm)
    return damp_radius_gradient(xp.sum(rowdot(grad, prev_displacement, xp=xp) * prev_inv_norm), k, xp=xp)


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


def ftp_project(param, direction, anchor, grad, state, step, *, k=1.0, xp=None):
    """FTP's step for one anchored tensor, given the base direction `d` (ALGORITHMS.md §4, §6).

        c = (θ − d) − θ₀                   the unconstrained displacement
        n = MARS(c) + 1e-8
        γ ← radius_update(∇γ(g, c_prev, s_prev), max n, t)
        θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c
        c_prev ← c;  s_prev ← 1 / n

    `anchor` is `θ₀`, or `None` for a zero anchor (PEFT/LoRA). To wrap any base
    optimizer, pass `direction = θ − θ̃`. `k` damps the positive radius gradients
    (see `radius_gradient`).

    Returns:
        tuple: `(new_param, FTPState)`, the parameter in its own dtype.
    """
    xp = namespace(xp, param, direction, anchor, grad, step)
    displacement = param - direction
    if anchor is not None:
        displacement = displacement - anchor
    norm = mars_norm(displacement, xp=xp) + NORM_EPS
    radius_grad = radius_gradient(grad, state.prev_displacement, state.prev_inv_norm, k=k, xp=xp)
    radius, radius_exp_avg, radius_exp_avg_sq = radius_update(state, radius_grad, xp.max(norm), step, xp=xp)
    scale = xp.clip(xp.astype(radius, norm.dtype, copy=False) / norm, 0.0, 1.0)
    projected = scale * displacement
    if anchor is not None:
        projected = anchor + projected
    new_state = FTPState(radius, radius_exp_avg, radius_exp_avg_sq, displacement, 1 / norm)
    return xp.astype(projected, param.dtype, copy=False), new_state
