"""Multi-tensor kernels of the PyTorch adapter (private).

The full-size elementwise passes of ALGORITHMS.md §3–§5 over a list of same-device,
same-dtype tensors, written with ``torch._foreach_*`` ops and in-place ``out=`` writes so
that a step allocates no more full-size temporaries than ``torch.optim.AdamW(foreach=True)``
does. Every per-tensor scalar rule (the radius's own Adam, the decay ratio) is a call into
:mod:`tether.core` on the per-tensor scalars stacked into one vector: those core functions
are elementwise on their scalar arguments. ``tests/torch/test_ops.py`` checks each kernel
against the core at 1e-12 in float64.

No function here reads a device value on the host, so a step traces under
``torch.compile(fullgraph=True)`` and never synchronises a GPU stream. The learning rate ``lr``
is a Python float (``torch.optim``'s convention) or a 0-d tensor on the tensors' device (what
Keras passes on its torch backend): a tensor is never read on the host.

The three ``*_step_`` functions at the end are whole steps of one bucket (tensors of one device,
dtype and anchor mode); `tether.adapters.torch` and, on the torch backend,
`tether.adapters.keras` both call them.
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


def add_scaled_(targets, tensors, alpha):
    """``x ← x + α·y`` in place for each pair, ``α`` a float or a 0-d tensor."""
    if isinstance(alpha, torch.Tensor):
        torch._foreach_addcmul_(targets, tensors, [alpha] * len(tensors))
    else:
        torch._foreach_add_(targets, tensors, alpha=alpha)


def adam_update_(targets, exp_avgs, second, t, *, lr, beta1, beta2, eps):
    r"""Subtract Adam's direction from ``targets`` in place: ``x ← x − lr · m / D`` (ALGORITHMS.md §3).

    .. math:: D = (\sqrt{v^*} / \sqrt{1 - \beta_2^t} + \epsilon)(1 - \beta_1^t)
              = \sqrt{v^*} \cdot \frac{1 - \beta_1^t}{\sqrt{1 - \beta_2^t}} + \epsilon (1 - \beta_1^t)

    ``t`` is the vector of per-tensor step counts; the bias corrections stay on the device,
    and both factors are of order one, so nothing overflows in float16. ``D`` is the one
    full-size temporary of an Adam step, as in ``torch.optim.AdamW(foreach=True)``. (Making
    and freeing it one tensor at a time on the CPU measured no faster.)

    A tensor ``lr`` is folded into ``D`` (``x ← x − m / (D / lr)``), so that it stays on the
    device; ``lr = 0`` makes ``D / lr`` infinite (a zero step), never ``0 · ∞``.
    """
    bias_correction1 = 1 - beta1**t
    scale = bias_correction1 / torch.sqrt(1 - beta2**t)
    offset = eps * bias_correction1
    value = -lr
    if isinstance(lr, torch.Tensor):
        moving = lr > 0
        safe = torch.where(moving, lr, torch.ones_like(lr))
        scale = torch.where(moving, scale / safe, torch.zeros_like(scale))
        offset = torch.where(moving, offset / safe, torch.full_like(offset, float("inf")))
        value = -1.0
    denominators = torch._foreach_sqrt(second)
    torch._foreach_mul_(denominators, scale.unbind(0))
    torch._foreach_add_(denominators, offset.unbind(0))
    torch._foreach_addcdiv_(targets, exp_avgs, denominators, value=value)


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


# -- whole steps of one bucket --------------------------------------------------------------


def adam_ftp_step_(
    params, grads, moments, anchors, ftp_states, t, *, lr, beta1, beta2, eps, weight_decay, amsgrad, k
):
    """One Adam-FTP step of a bucket, in place (ALGORITHMS.md §3, §4).

    ``moments`` is ``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs)``. ``anchors is None``: the
    bucket is unanchored and takes the plain AdamW step; otherwise one ``θ₀`` per tensor (or
    ``None`` per tensor for a zero anchor), and ``ftp_states`` are dicts holding ``radius``,
    ``radius_exp_avg``, ``radius_exp_avg_sq``, ``prev_displacement`` and ``prev_inv_norm``.
    """
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = moments
    second = adam_moments(
        grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, beta1=beta1, beta2=beta2, amsgrad=amsgrad
    )
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    if anchors is None:
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        adam_update_(params, exp_avgs, second, t, **adam)
        return
    buffers = [s["prev_displacement"] for s in ftp_states]
    radius_grads = radius_gradients_(grads, buffers, [s["prev_inv_norm"] for s in ftp_states], k=k)
    displacements = displacements_into(buffers, params, anchors)
    if weight_decay != 0:
        add_scaled_(displacements, params, -lr * weight_decay)
    adam_update_(displacements, exp_avgs, second, t, **adam)
    ftp_finish(params, anchors, displacements, radius_grads, t, ftp_states)


def sgd_ftp_step_(
    params, grads, buffers, anchors, ftp_states, t, *, lr, momentum, dampening, weight_decay, nesterov, k
):
    """One SGD-FTP step of a bucket, in place (ALGORITHMS.md §3, §4); ``buffers``: momentum buffers.

    ``anchors`` and ``ftp_states`` as in `adam_ftp_step_`.
    """
    if anchors is not None:
        displacements = [s["prev_displacement"] for s in ftp_states]
        radius_grads = radius_gradients_(grads, displacements, [s["prev_inv_norm"] for s in ftp_states], k=k)
    updates = sgd_updates(
        params,
        grads,
        buffers,
        t,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    if anchors is None:
        add_scaled_(params, updates, -lr)
        return
    displacements = displacements_into(displacements, params, anchors)
    add_scaled_(displacements, updates, -lr)
    del updates
    ftp_finish(params, anchors, displacements, radius_grads, t, ftp_states)


def adam_spd_step_(params, grads, moments, anchors, t, *, lr, beta1, beta2, eps, weight_decay, amsgrad):
    """One Adam-SPD step of a bucket, in place (ALGORITHMS.md §3, §5).

    ``anchors`` as in `adam_ftp_step_` (``None``: the plain Adam step, no decay). The
    parameters themselves hold ``θ − θ₀`` until the end of the step: no full-size temporary
    beyond Adam's denominator.
    """
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = moments
    second = adam_moments(
        grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, beta1=beta1, beta2=beta2, amsgrad=amsgrad
    )
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    if anchors is None:
        adam_update_(params, exp_avgs, second, t, **adam)
        return
    init = anchors[0] is not None
    if init:
        torch._foreach_sub_(params, anchors)
    alignment = torch.stack([dot(g, p) for g, p in zip(grads, params, strict=True)])
    distance = norms(params)
    adam_update_(params, exp_avgs, second, t, **adam)
    keep = spd_keep(alignment, distance, norms(params), weight_decay).unbind(0)
    if init:
        for p, anchor, factor in zip(params, anchors, keep, strict=True):
            torch.addcmul(anchor, p, factor, out=p)
    else:
        torch._foreach_mul_(params, keep)
