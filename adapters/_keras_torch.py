"""The Keras optimizers' step on the torch backend (private).

Keras runs its own optimizers on torch through backend subclasses that update the
variables' tensors in place with ``torch._foreach_*`` kernels
(``keras/src/backend/torch/optimizers``): in eager torch, one functional op per variable,
each allocating a full-size result, is slow. tether's Keras optimizers do the same. On the
torch backend, the float32 and float64 variables with dense gradients of their own dtype
and device take one step per bucket (anchor mode, dtype, device) of the PyTorch adapter's
kernels (`tether.adapters._torch_ops`, checked against `tether.core` at 1e-12), in place
on the Keras variables' tensors. Every other variable (bfloat16 and float16 ones, which the
generic path steps in float32; values under a ``keras.StatelessScope``) takes the generic
``update_step``, whose math is `tether.core` through ``keras.ops``.

Nothing here reads a device value on the host: the learning rate stays a tensor.
"""

from collections import defaultdict

import torch
from keras import ops

from ..core import FTPState
from . import _torch_ops

#: The dtypes that take the in-place path (the generic path steps narrower ones in float32).
IN_PLACE_DTYPES = (torch.float32, torch.float64)


def _in_place(gradient, variable):
    """Whether ``variable`` takes the in-place path: its own tensor, a dense gradient like it."""
    param = variable.value
    # a StatelessScope (or an autocast scope) hands out another tensor than the variable's own
    return (
        isinstance(param, torch.nn.Parameter)
        and param.dtype in IN_PLACE_DTYPES
        and isinstance(gradient, torch.Tensor)
        and gradient.layout == torch.strided
        and gradient.dtype == param.dtype
        and gradient.device == param.device
        and gradient.shape == param.shape
    )


def update(optimizer, grads, variables, learning_rate):
    """One step of every variable: the in-place multi-tensor path where it applies, else ``update_step``."""
    buckets = defaultdict(lambda: ([], [], []))
    for gradient, variable in zip(grads, variables, strict=True):
        if not _in_place(gradient, variable):
            optimizer.update_step(gradient, variable, learning_rate)
            continue
        index = optimizer._get_variable_index(variable)
        param = variable.value
        indices, params, bucket_grads = buckets[(optimizer._modes[index], param.dtype, param.device)]
        indices.append(index)
        params.append(param)
        bucket_grads.append(gradient)
    lr = ops.convert_to_tensor(learning_rate)
    for (mode, dtype, device), (indices, params, bucket_grads) in buckets.items():
        steps = [optimizer._steps[i].value for i in indices]
        torch._foreach_add_(steps, 1)
        t = _torch_ops.steps_vector(steps, dtype)
        optimizer._torch_step(mode, indices, params, bucket_grads, t, lr.to(dtype=dtype, device=device))


def adam_ftp(optimizer, mode, indices, params, grads, t, lr):
    """`AdamFTP`'s step of one bucket."""
    _torch_ops.adam_ftp_step_(
        params,
        grads,
        _adam_moments(optimizer, indices),
        _anchors(optimizer, mode, indices),
        _ftp_states(optimizer, mode, indices),
        t,
        k=optimizer.k,
        **_adam_hyperparameters(optimizer, params, lr),
    )


def sgd_ftp(optimizer, mode, indices, params, grads, t, lr):
    """`SGDFTP`'s step of one bucket."""
    slots = [optimizer._momentums[i] for i in indices]
    _torch_ops.sgd_ftp_step_(
        params,
        grads,
        [None if slot is None else slot.value for slot in slots],
        _anchors(optimizer, mode, indices),
        _ftp_states(optimizer, mode, indices),
        t,
        lr=lr,
        momentum=optimizer.momentum,
        dampening=optimizer.dampening,
        weight_decay=optimizer.weight_decay,
        nesterov=optimizer.nesterov,
        k=optimizer.k,
        scratch=_scratch(optimizer, params),
    )


def adam_spd(optimizer, mode, indices, params, grads, t, lr):
    """`AdamSPD`'s step of one bucket."""
    _torch_ops.adam_spd_step_(
        params,
        grads,
        _adam_moments(optimizer, indices),
        _anchors(optimizer, mode, indices),
        t,
        **_adam_hyperparameters(optimizer, params, lr),
    )


def _adam_hyperparameters(optimizer, params, lr):
    """The keyword arguments of `_torch_ops`'s Adam steps, from a Keras Adam optimizer."""
    return dict(
        lr=lr,
        beta1=optimizer.beta_1,
        beta2=optimizer.beta_2,
        eps=optimizer.epsilon,
        weight_decay=optimizer.weight_decay,
        amsgrad=optimizer.amsgrad,
        scratch=_scratch(optimizer, params),
    )


def _scratch(optimizer, params):
    """The optimizer's `_torch_ops.Scratch` for a CPU bucket (``None`` on an accelerator).

    Keras optimizers keep it as an attribute: not a variable, nothing in it outlives a step.
    """
    if params[0].device.type != "cpu":  # (the in-place path only takes float32 and float64)
        return None
    scratch = getattr(optimizer, "_tether_scratch", None)
    if scratch is None:
        scratch = optimizer._tether_scratch = _torch_ops.Scratch()
    return scratch


def _anchors(optimizer, mode, indices):
    """What the kernels take as anchors: ``None`` (unanchored), ``θ₀`` per tensor, or ``None`` per tensor (zero)."""
    if mode is None:
        return None
    if mode == "zero":
        return [None] * len(indices)
    return [optimizer._anchors[i].value for i in indices]


def _adam_moments(optimizer, indices):
    """``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs)``: the Adam slots' tensors."""
    hats = [optimizer._velocity_hats[i] for i in indices]
    return (
        [optimizer._momentums[i].value for i in indices],
        [optimizer._velocities[i].value for i in indices],
        [None if hat is None else hat.value for hat in hats],
    )


def _ftp_states(optimizer, mode, indices):
    """FTP's slots as the kernels' per-tensor state dicts (``radius``, …, ``prev_inv_norm``)."""
    if mode is None:
        return None
    return [
        {name: slot.value for name, slot in zip(FTPState._fields, optimizer._ftp[i], strict=True)}
        for i in indices
    ]
