"""The base steps that FTP and SPD wrap: Adam and SGD directions (ALGORITHMS.md §3).

A base step returns the **direction** `d`: the unconstrained update is
`θ̃ = θ − d`. Both follow PyTorch's forms (`torch.optim.Adam`/`SGD`) to the
placement of `ε` and the first momentum step, so that every backend reproduces
the authors' PyTorch trajectories.
"""

from typing import Any, NamedTuple

from ._namespace import as_dtype, namespace


class AdamState(NamedTuple):
    """Adam's moments for one tensor, in the tensor's dtype.

    `max_exp_avg_sq` is `None` unless amsgrad is on.
    """

    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any | None = None


class SGDState(NamedTuple):
    """SGD's momentum buffer `b` for one tensor (unused when `momentum == 0`)."""

    momentum_buffer: Any


def adam_init(param, *, amsgrad=False, xp=None):
    """Zero moments shaped like `param`."""
    xp = namespace(xp, param)
    return AdamState(
        exp_avg=xp.zeros_like(param),
        exp_avg_sq=xp.zeros_like(param),
        max_exp_avg_sq=xp.zeros_like(param) if amsgrad else None,
    )


def sgd_init(param, *, xp=None):
    """A zero momentum buffer shaped like `param`."""
    xp = namespace(xp, param)
    return SGDState(momentum_buffer=xp.zeros_like(param))


def _compute_dtype(dtype, xp):
    """At least float32: bias corrections of a bf16/fp16 tensor are not computed in bf16/fp16."""
    return xp.result_type(dtype, xp.float32)


def adam_direction(
    grad,
    state,
    step,
    *,
    lr,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    amsgrad=False,
    weight_decay=0.0,
    param=None,
    epsilon_hat=False,
    xp=None,
):
    """Adam's direction `d` and the new `AdamState` (ALGORITHMS.md §3, PyTorch's form).

        m  ← β₁ m + (1 − β₁) g
        v  ← β₂ v + (1 − β₂) g²
        v* = max(v*, v) if amsgrad else v
        d  = (lr / (1 − β₁ᵗ)) · m / (√v* / √(1 − β₂ᵗ) + ε)  [+ lr · wd · θ]

    With `epsilon_hat`, ε is the paper's ε̂, added before the bias correction, as
    `keras.optimizers.Adam` (and TensorFlow's) has it:
    `d = (lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ)) · m / (√v* + ε)`.

    `step` is `t`, this tensor's step count including the current step (`t = 1`
    first). The bracketed decoupled-decay term is added when `weight_decay` is
    nonzero and needs `param`: Adam-FTP uses it (so the decay is projected too),
    Adam-SPD passes `weight_decay=0`. `lr` and the betas may be numbers or 0-d
    arrays (schedules, `inject_hyperparams`).

    Returns:
        tuple: `(direction, AdamState)`, the direction in the gradient's dtype.
    """
    xp = namespace(xp, grad, state.exp_avg, step, lr)
    dtype = _compute_dtype(grad.dtype, xp)
    t = as_dtype(step, dtype, xp)
    exp_avg = beta1 * state.exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * (grad * grad)
    max_exp_avg_sq = state.max_exp_avg_sq
    second = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = xp.maximum(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq
    step_size = lr / (1 - beta1**t)
    bias_correction2_sqrt = xp.sqrt(1 - beta2**t)
    if epsilon_hat:
        step_size = step_size * bias_correction2_sqrt
        denom = xp.sqrt(second) + eps
    else:
        denom = xp.sqrt(second) / bias_correction2_sqrt + eps
    direction = xp.astype(step_size * (exp_avg / denom), grad.dtype, copy=False)
    if _nonzero(weight_decay):
        if param is None:
            raise ValueError("adam_direction: weight_decay needs `param` (the decoupled term lr·wd·θ)")
        direction = direction + xp.astype(lr * weight_decay * param, grad.dtype, copy=False)
    return direction, AdamState(exp_avg, exp_avg_sq, max_exp_avg_sq)


def sgd_direction(
    grad,
    param,
    state,
    step,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    xp=None,
):
    """SGD's direction `d` and the new `SGDState` (ALGORITHMS.md §3, PyTorch's form).

        u = g + wd · θ
        if momentum ≠ 0:
            b = u                                  on the tensor's first step
            b ← momentum · b + (1 − dampening) · u  afterwards
            u = u + momentum · b if nesterov else b
        d = lr · u

    The first-step rule is a `where` on `step`, not a Python branch, so the
    function traces. With `momentum == 0` the buffer is returned untouched.

    Returns:
        tuple: `(direction, SGDState)`, the direction in the gradient's dtype.
    """
    xp = namespace(xp, grad, param, step, lr)
    u = grad
    if _nonzero(weight_decay):
        u = u + weight_decay * param
    buffer = state.momentum_buffer
    if _nonzero(momentum):
        first = as_dtype(step, _compute_dtype(grad.dtype, xp), xp) == 1
        buffer = xp.where(first, u, momentum * buffer + (1 - dampening) * u)
        moved = u + momentum * buffer if nesterov else buffer
        if not isinstance(momentum, (int, float)):
            # an array momentum (inject_hyperparams) may be 0 at run time: no buffer then
            off = momentum == 0
            moved = xp.where(off, u, moved)
            buffer = xp.where(off, state.momentum_buffer, buffer)
        u = moved
    return xp.astype(lr * u, grad.dtype, copy=False), SGDState(buffer)


def _nonzero(value):
    """False only for a Python number equal to 0 (an array hyperparameter counts as nonzero)."""
    return not (isinstance(value, (int, float)) and value == 0)
