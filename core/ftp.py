"""FTP: Fast Trainable Projection (Tian et al., NeurIPS 2023; ALGORITHMS.md §4).

One learned radius ``γ`` per anchored tensor, trained online by a tiny Adam of
its own ("AdamUtil") on the gradient of the loss with respect to ``γ``; after
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

    ``radius``, ``radius_exp_avg``, ``radius_exp_avg_sq``: 0-d, at least float32.
    ``prev_displacement``: ``c`` of the previous step (shape and dtype of ``θ``).
    ``prev_inv_norm``: ``1 / n`` of the previous step (MARS-shaped, dtype of ``θ``).
    """

    radius: Any
    radius_exp_avg: Any
    radius_exp_avg_sq: Any
    prev_displacement: Any
    prev_inv_norm: Any


def radius_dtype(dtype, *, xp):
    """The dtype of the scalar radius state for a tensor of ``dtype``: at least float32."""
    return xp.result_type(dtype, xp.float32)


def ftp_init(param, *, xp=None):
    """FTP's initial state for ``param`` (all zeros; the first step sets ``γ = 1e-8``)."""
    xp = namespace(xp, param)
    scalar = radius_dtype(param.dtype, xp=xp)
    zero = xp.zeros((), dtype=scalar)
    return FTPState(
        radius=zero,
        radius_exp_avg=zero,
        radius_exp_avg_sq=zero,
        prev_displacement=xp.zeros_like(param),
        prev_inv_norm=xp.zeros_like(mars_norm(param, xp=xp)),
    )


def radius_gradient(grad, prev_displacement, prev_inv_norm, *, k=1.0, xp=None):
    r"""The gradient of the loss with respect to ``γ``, a scalar (ALGORITHMS.md §4).

    .. math:: \nabla\gamma = \sum \operatorname{rowdot}(g, c_{prev}) \odot s_{prev},
              \qquad \nabla\gamma \leftarrow k\,\nabla\gamma \text{ if } \nabla\gamma > 0

    ``g`` is this step's raw gradient, ``c_prev`` and ``s_prev = 1 / n_prev`` the
    previous step's displacement and inverse norm. ``k ∈ [0, 1]`` damps the positive
    gradients only, those that would shrink the radius.
    """
    xp = namespace(xp, grad, prev_displacement, prev_inv_norm)
    g = xp.sum(rowdot(grad, prev_displacement, xp=xp) * prev_inv_norm)
    return xp.where(g > 0, k * g, g)


def radius_update(state, radius_grad, max_norm, step, *, xp=None):
    r"""One step of the radius's own Adam, then the clip (ALGORITHMS.md §4).

    .. math::
        m_\gamma &\leftarrow 0.9\, m_\gamma + 0.1\, \nabla\gamma \qquad
        v_\gamma \leftarrow 0.999\, v_\gamma + 0.001\, \nabla\gamma^2 \\
        \gamma &\leftarrow \operatorname{clip}\Big(\gamma - \mu \frac{m_\gamma / (1 - 0.9^t)}
              {\sqrt{v_\gamma / (1 - 0.999^t)} + 10^{-8}},\; 10^{-8},\; \max n\Big)

    with ``μ = 1e-2`` and ``t`` the tensor's own step count, so the first update
    (``t = 2``) already divides by ``1 − 0.9²``. On the first step (``t == 1``) there
    is no update: ``γ = 1e-8`` and ``m_γ = v_γ = 0``. Returns
    ``(radius, radius_exp_avg, radius_exp_avg_sq)``.
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
    radius = xp.clip(radius, RADIUS_FLOOR, xp.astype(max_norm, dtype, copy=False))
    first = t == 1
    zero = xp.zeros_like(m)
    return (
        xp.where(first, xp.full_like(radius, RADIUS_FLOOR), radius),
        xp.where(first, zero, m),
        xp.where(first, zero, v),
    )


def ftp_project(param, direction, anchor, grad, state, step, *, k=1.0, xp=None):
    r"""FTP's step for one anchored tensor, given the base direction ``d`` (ALGORITHMS.md §4, §6).

    .. math::
        c &= (\theta - d) - \theta_0 \qquad n = \operatorname{MARS}(c) + 10^{-8} \\
        \gamma &\leftarrow \text{radius\_update}(\nabla\gamma(g, c_{prev}, s_{prev}), \max n, t) \\
        \theta &\leftarrow \theta_0 + \operatorname{clip}(\gamma / n, 0, 1) \odot c
        \qquad c_{prev} \leftarrow c,\; s_{prev} \leftarrow 1 / n

    ``anchor`` is ``θ₀``, or ``None`` for a zero anchor (PEFT/LoRA). To wrap any
    base optimizer, pass ``direction = θ − θ̃``. Returns ``(new_param, new_state)``.
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
