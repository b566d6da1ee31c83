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

The kernels take a variable's rows (output units) on axis 0, as PyTorch lays them out. An
FTP variable whose row axis is another (a Keras kernel, ``(in, out)``: axis 1) is handed to
them as views with that axis moved to the front (``movedim``): the variable, its gradient,
its moments, its anchor and its FTP state. In-place ops on a view write through to the
variable. Such views are not contiguous, so their bucket (kept apart from the others) takes
the kernels' plain PyTorch ops, not the C kernels or the CPU's block-wise single pass.

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


def _row_axis(optimizer, index):
    """The axis of the variable's rows that the kernels must see first: 0 unless FTP projects it on another."""
    if not optimizer._uses_rows or optimizer._modes[index] is None:
        return 0
    return optimizer._row_axes[index]


def _rows_first(optimizer, index, tensor):
    """``tensor`` (the variable's or one of its state's) with the variable's row axis first: a view."""
    axis = _row_axis(optimizer, index)
    if tensor is None or axis == 0:
        return tensor
    return tensor.movedim(axis, 0)


@torch.compiler.disable
def update(optimizer, grads, variables, learning_rate):
    """One step of every variable: the in-place multi-tensor path where it applies, else ``update_step``.

    Eager under ``torch.compile`` (``jit_compile=True``): TorchDynamo would compile some of
    the kernels' frames and not others, and inductor fails on the in-place writes through
    the views that move a variable's rows first.
    """
    buckets = defaultdict(lambda: ([], [], []))
    for gradient, variable in zip(grads, variables, strict=True):
        if not _in_place(gradient, variable):
            optimizer.update_step(gradient, variable, learning_rate)
            continue
        index = optimizer._get_variable_index(variable)
        moved = _row_axis(optimizer, index) != 0
        param = variable.value
        # views with moved rows are not contiguous: a bucket of their own keeps the others' C kernels
        indices, params, bucket_grads = buckets[(optimizer._modes[index], param.dtype, param.device, moved)]
        indices.append(index)
        params.append(_rows_first(optimizer, index, param))
        bucket_grads.append(_rows_first(optimizer, index, gradient))
    lr = ops.convert_to_tensor(learning_rate)
    for (mode, dtype, device, _), (indices, params, bucket_grads) in buckets.items():
        steps = [optimizer._steps[i].value for i in indices]
        t = _torch_ops.advance_steps_(steps, dtype)
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
        [None if slot is None else _rows_first(optimizer, i, slot.value) for i, slot in zip(indices, slots)],
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
    return [_rows_first(optimizer, i, optimizer._anchors[i].value) for i in indices]


def _adam_moments(optimizer, indices):
    """``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs)``: the Adam slots' tensors."""
    hats = [optimizer._velocity_hats[i] for i in indices]
    return (
        [_rows_first(optimizer, i, optimizer._momentums[i].value) for i in indices],
        [_rows_first(optimizer, i, optimizer._velocities[i].value) for i in indices],
        [None if hat is None else _rows_first(optimizer, i, hat.value) for i, hat in zip(indices, hats)],
    )


def _ftp_states(optimizer, mode, indices):
    """FTP's slots as the kernels' per-tensor state dicts (``radius``, …, ``prev_inv_norm``)."""
    if mode is None:
        return None
    # the 0-d radius and its moments have no axes; c_prev and s_prev have the variable's
    return [
        {
            name: _rows_first(optimizer, i, slot.value) if slot.value.ndim else slot.value
            for name, slot in zip(FTPState._fields, optimizer._ftp[i], strict=True)
        }
        for i in indices
    ]
