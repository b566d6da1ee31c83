"""Multi-tensor kernels of the PyTorch adapter (private).

The full-size elementwise passes of ALGORITHMS.md §3–§5 over a list of same-device,
same-dtype tensors, written with ``torch._foreach_*`` ops and in-place ``out=`` writes so
that a step allocates no more full-size temporaries than ``torch.optim.AdamW(foreach=True)``
does. Every per-tensor scalar rule (the radius's own Adam, the decay ratio) is a call into
:mod:`tether.core` on the per-tensor scalars stacked into one vector: those core functions
are elementwise on their scalar arguments. ``tests/torch/test_ops.py`` checks each kernel
against the core at 1e-12 in float64.

No function here reads a device value on the host, so a step traces under
``torch.compile(fullgraph=True)`` and never synchronises a GPU stream.
"""

import array_api_compat.torch as compat_torch
import torch

from ..core import FTPState, SPDStatistics, damp_radius_gradient, decay_strength, radius_update
from ..core.ftp import NORM_EPS

xp = compat_torch

# -- reductions ---------------------------------------------------------------------------


def mars_shape(x):
    """The shape of ``core.mars_norm(x)``: ``(d0, 1, …, 1)``, ``(1,)`` for a vector, ``()`` for a scalar."""
    if x.ndim == 0:
        return ()
    return (x.shape[0] if x.ndim >= 2 else 1,) + (1,) * (x.ndim - 1)


def row_sum(x):
    """The MARS reduction of ``x`` (``core.norms._row_sum``): the sum over every axis but the first."""
    if x.ndim == 0:
        return x
    if x.ndim == 1:
        return x.sum(0, keepdim=True)
    return x.sum(dim=tuple(range(1, x.ndim)), keepdim=True)


def dot(a, b):
    """``⟨a, b⟩``, the sum of ``a ⊙ b`` over the whole tensor, a 0-d tensor."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def norms(tensors):
    """``‖x‖₂`` of each tensor, stacked into a vector."""
    return torch.stack(torch._foreach_norm(tensors))


def steps_vector(steps, dtype):
    """The per-tensor step counts ``t`` stacked into a vector of the compute dtype."""
    return torch.stack(steps).to(dtype)


# -- base steps (ALGORITHMS.md §3) --------------------------------------------------------


def adam_moments(grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, beta1, beta2, amsgrad):
    """Update ``m`` and ``v`` (and ``v*``) in place; return the second moments the step divides by."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        return max_exp_avg_sqs
    return exp_avg_sqs


def adam_update_(targets, exp_avgs, second, t, *, lr, beta1, beta2, eps):
    r"""Subtract Adam's direction from ``targets`` in place: ``x ← x − lr · m / D`` (ALGORITHMS.md §3).

    .. math:: D = (\sqrt{v^*} / \sqrt{1 - \beta_2^t} + \epsilon)(1 - \beta_1^t)
              = \sqrt{v^*} \cdot \frac{1 - \beta_1^t}{\sqrt{1 - \beta_2^t}} + \epsilon (1 - \beta_1^t)

    ``t`` is the vector of per-tensor step counts; the bias corrections stay on the device,
    and both factors are of order one, so nothing overflows in float16. ``D`` is the one
    full-size temporary of an Adam step, as in ``torch.optim.AdamW(foreach=True)``. (Making
    and freeing it one tensor at a time on the CPU measured no faster.)
    """
    bias_correction1 = 1 - beta1**t
    scale = (bias_correction1 / torch.sqrt(1 - beta2**t)).unbind(0)
    offset = (eps * bias_correction1).unbind(0)
    denominators = torch._foreach_sqrt(second)
    torch._foreach_mul_(denominators, scale)
    torch._foreach_add_(denominators, offset)
    torch._foreach_addcdiv_(targets, exp_avgs, denominators, value=-lr)


def sgd_updates(params, grads, buffers, t, *, momentum, dampening, weight_decay, nesterov):
    """The tensors ``u`` with SGD's direction ``d = lr · u`` (ALGORITHMS.md §3, PyTorch's form).

    Momentum buffers are updated in place; they start at zero, and the first step's
    ``b = u`` is ``b ← μ·0 + 1·u`` (the coefficient of ``u`` is 1 where ``t == 1``).
    The result may alias ``grads`` or ``buffers``: read it, never write it.
    """
    updates = grads
    if weight_decay != 0:
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum == 0:
        return updates
    if dampening == 0 and buffers[0].device.type == "cpu":
        # one pass instead of two (the CPU has no multi-tensor kernels to lose)
        for b, u in zip(buffers, updates, strict=True):
            torch.add(u, b, alpha=momentum, out=b)
    elif dampening == 0:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, updates)
    else:
        torch._foreach_mul_(buffers, momentum)
        one = torch.ones_like(t)
        coefficient = torch.where(t == 1, one, one * (1 - dampening)).unbind(0)
        torch._foreach_addcmul_(buffers, updates, coefficient)
    if not nesterov:
        return buffers
    if updates is grads:
        return torch._foreach_add(grads, buffers, alpha=momentum)
    torch._foreach_add_(updates, buffers, alpha=momentum)
    return updates


# -- FTP (ALGORITHMS.md §4) ---------------------------------------------------------------


def radius_gradients_(grads, prev_displacements, prev_inv_norms, *, k):
    r"""``∇γ = Σ rowdot(g, c_prev) ⊙ s_prev`` per tensor, positive values times ``k``; a vector.

    Destroys ``prev_displacements`` (``c_prev ← g ⊙ c_prev`` in place, then summed per row):
    the caller writes this step's displacement into the same buffers next.
    """
    values = []
    for g, c, s in zip(grads, prev_displacements, prev_inv_norms, strict=True):
        values.append((row_sum(c.mul_(g)) * s).sum())
    return damp_radius_gradient(torch.stack(values), k, xp=xp)


def displacements_into(buffers, params, anchors):
    """Write ``θ − θ₀`` (``θ`` for a zero anchor, ``anchor is None``) into ``buffers``; return them."""
    for buffer, param, anchor in zip(buffers, params, anchors, strict=True):
        if anchor is None:
            buffer.copy_(param)
        else:
            torch.sub(param, anchor, out=buffer)
    return buffers


def ftp_finish(params, anchors, displacements, radius_grads, t, states):
    r"""FTP's projection after the base step, given ``c = θ̃ − θ₀`` per tensor (ALGORITHMS.md §4).

    ``n = MARS(c) + 1e-8``; the radii take one step of their own Adam (``core.radius_update``
    on the stacked scalars); ``θ ← θ₀ + clip(γ / n, 0, 1) ⊙ c``. ``states`` are the tensors'
    ``optimizer.state`` dicts: ``radius``, its moments and ``prev_inv_norm`` are updated in
    place, and ``prev_displacement`` must already be the buffer holding ``c``. The parameters
    serve as scratch for ``|c|`` before they receive the projection, so nothing is allocated.
    """
    norm_list = [row_sum(torch.abs(c, out=p)) + NORM_EPS for p, c in zip(params, displacements, strict=True)]
    max_norms = torch.stack([n.max() for n in norm_list])
    keys = ("radius", "radius_exp_avg", "radius_exp_avg_sq")
    stacked = [torch.stack([s[key] for s in states]) for key in keys]
    scalar_state = FTPState(*stacked, prev_displacement=None, prev_inv_norm=None)
    updated = radius_update(
        scalar_state, radius_grads.to(stacked[0].dtype), max_norms, t.to(stacked[0].dtype), xp=xp
    )
    for key, values in zip(keys, updated, strict=True):
        torch._foreach_copy_([s[key] for s in states], list(values.unbind(0)))
    for param, anchor, c, n, radius, state in zip(
        params, anchors, displacements, norm_list, updated[0].unbind(0), states, strict=True
    ):
        scale = torch.clamp(radius.to(n.dtype) / n, 0.0, 1.0)
        if anchor is None:
            torch.mul(c, scale, out=param)
        else:
            torch.addcmul(anchor, c, scale, out=param)
        torch.reciprocal(n, out=state["prev_inv_norm"])


# -- SPD (ALGORITHMS.md §5) ---------------------------------------------------------------


def spd_keep(alignment, distance, new_distance, weight_decay):
    r"""``1 − λ r`` where the condition ``c = −⟨g, θ − θ₀⟩ < 0`` holds, else 1; a vector.

    ``λ r`` is ``core.decay_strength`` on the stacked per-tensor scalars.
    """
    return 1 - decay_strength(SPDStatistics(alignment, distance), new_distance, weight_decay, xp=xp)
