r"""TPGM for JAX (`ALGORITHMS.md` §7), re-exported as `tether.adapters.jax.tpgm_init` and `tpgm_step`.

TPGM is not an optimizer step: it runs beside any optax optimizer, every `f`
steps or once at the end of fine-tuning, on held-out batches. `tpgm_init`
makes its state (a NamedTuple of arrays); `tpgm_step` is one TPGM call, a
Python loop that draws one batch per projection update and runs jitted
pieces: the first call's constraints, one projection update, the projection.
"""

import numbers
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import core
from ._jax_tree import (
    ABSENT,
    check_bool,
    check_mask,
    check_number,
    check_row_axis,
    check_state_array,
    check_state_leaves,
    flatten_params,
    is_absent,
    is_concrete,
    line_up,
    resolve_mask,
    resolve_row_axis,
    unflatten,
)

__all__ = ["TPGMState", "tpgm_init", "tpgm_step"]

#: The constraints' Adam (PyTorch's Adam, no weight decay), as in the authors' code.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


class TPGMState(NamedTuple):
    """TPGM's state: params-shaped trees (`optax.MaskedNode()` where a tensor has no constraint)
    and int32 scalars.

    Attributes:
        count: The projection updates taken so far (int32): the constraints' Adam step count,
            shared by all constraints and kept across calls.
        calls: The TPGM calls made so far (int32); the first one sets `γ = min(n) / 2`.
        norm: The norm, as an index into `tether.core.TPGM_NORMS` (0: `"mars"`, 1: `"l2"`;
            int32, 0-d).
        constraint: `γ` per constrained tensor (0-d, at least float32; 0 until the first call).
        constraint_exp_avg: The first moment of the constraints' Adam (0-d, same dtype).
        constraint_exp_avg_sq: Its second moment (0-d, same dtype).
        anchor: `θ₀`, a copy of each constrained tensor as `tpgm_init` saw it.
        row_axis: The axis of each constrained tensor's rows for `"mars"` (int32, 0-d,
            non-negative).
    """

    count: jax.Array
    calls: jax.Array
    norm: jax.Array
    constraint: optax.Params
    constraint_exp_avg: optax.Params
    constraint_exp_avg_sq: optax.Params
    anchor: optax.Params
    row_axis: optax.Params


def tpgm_init(
    params: optax.Params,
    *,
    norm: str = "mars",
    mask: Any = None,
    row_axis: Any = None,
) -> TPGMState:
    r"""TPGM's state for `params`, the pre-trained weights (Tian et al., CVPR 2023).

    Trainable Projected Gradient Method (J. Tian, X. Dai, C.-Y. Ma, Z. He, Y.-C. Liu, Z. Kira,
    "Trainable Projected Gradient Method for Robust Fine-Tuning", CVPR 2023; `ALGORITHMS.md`
    §7). Each constrained tensor gets a constraint `γ`, learned by `tpgm_step` on validation
    data; its anchor `θ₀` is a copy of the tensor now.

    Args:
        params: The pre-trained parameters (a pytree of real floating-point arrays).
        norm: `"mars"` (per row: per output unit, a bias is one row) or `"l2"` (the whole
            tensor).
        mask: Which tensors get a constraint, as in `adam_ftp`: a pytree of bools (or a
            prefix of the parameters' tree), or a callable of the parameters returning one.
            `False` leaves (a new head) are never projected. `None`: every tensor.
        row_axis: Which axis of each tensor holds its rows, for `"mars"`, as in `adam_ftp`
            (`None`: the last axis of a flax `kernel`, `lora_a` or `lora_b`, axis 0 for
            everything else, PyTorch's layout included).

    Returns:
        TPGMState: the anchors, zero constraints and moments, and the counts at 0.

    Raises:
        ValueError: an unknown `norm`, a mask or row axis that does not fit the parameters,
            or no tensor to constrain.
        TypeError: a parameter that is not a real floating-point array.
    """
    where = "tpgm_init"
    if not isinstance(norm, str) or norm not in core.TPGM_NORMS:
        raise ValueError(f"{where}: norm must be one of {core.TPGM_NORMS}, got {norm!r}")
    check_mask(mask, where)
    check_row_axis(row_axis, where)
    leaves = _flatten(params, where)
    constrained = resolve_mask(mask, params, leaves, where)
    if not any(constrained):
        raise ValueError(
            f"{where}: no tensor to constrain: "
            + ("`params` has no array" if not leaves.values else "`mask` is False for every tensor")
        )
    axes = resolve_row_axis(row_axis, params, leaves, where)

    def per_tensor(make):
        return unflatten(
            leaves,
            [make(p, axis) if flag else ABSENT for p, flag, axis in zip(leaves.values, constrained, axes)],
        )

    def zero(p, _):
        return jnp.zeros((), core.radius_dtype(p.dtype, xp=jnp))

    return TPGMState(
        count=jnp.zeros((), jnp.int32),
        calls=jnp.zeros((), jnp.int32),
        norm=jnp.asarray(core.TPGM_NORMS.index(norm), jnp.int32),
        constraint=per_tensor(zero),
        constraint_exp_avg=per_tensor(zero),
        constraint_exp_avg_sq=per_tensor(zero),
        anchor=per_tensor(lambda p, _: jnp.array(p, copy=True)),  # a copy: donating params is safe
        row_axis=per_tensor(lambda _, axis: jnp.asarray(axis, jnp.int32)),
    )


def tpgm_step(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    state: TPGMState,
    batches: Iterator,
    *,
    lr: float = 1e-2,
    iters: int = 1,
    jit: bool = True,
) -> tuple[optax.Params, TPGMState]:
    r"""One TPGM call: `iters` projection updates on validation batches, then the projection.

    With the fine-tuned weights `θ` held fixed, per constrained tensor (`ALGORITHMS.md` §7):

        c = θ − θ₀;  n = norm(c);  γ = min(n) / 2 on the first call only
        iters times:  γ ← clip(γ, 1e-8, max n)
                      L = loss_fn(θ_p, next(batches)),  θ_p = θ₀ + clip(γ / (n + 1e-8), 0, 1) ⊙ c
                      one Adam step (lr, β = (0.9, 0.999), ε = 1e-8) on every γ with ∂L/∂γ
        γ ← clip(γ, 1e-8, max n);  θ ← θ₀ + clip(γ / (n + 1e-8), 0, 1) ⊙ c

    The gradient is `jax.grad` of the loss as a function of the constraints only. Run it
    beside any optimizer: every `f` optimizer steps (the ResNet recipe) or once at the end of
    fine-tuning (the ViT recipe).

    Args:
        loss_fn: `loss_fn(params, batch)` returns the validation loss (a scalar) of the model
            with `params`, in evaluation mode (no dropout). Pass the same function object at
            every call: the jitted update is compiled once per `loss_fn` and parameter shapes.
        params: The fine-tuned parameters, with the tree `tpgm_init` saw.
        state: The `TPGMState` of `tpgm_init` or of the previous call.
        batches: An iterator of validation batches: `next(batches)` gives the batch of each
            projection update. Keep one across calls (`itertools.cycle(val_batches)` restarts
            a finite list). Unused when `iters == 0`.
        lr: The constraints' Adam learning rate `μ_p` (a finite number ≥ 0).
        iters: Projection updates before the projection (an int ≥ 0; 0 only projects).
        jit: Compile the projection update and the projection with `jax.jit` (`False`: run
            them eagerly, for a `loss_fn` or batches that cannot be traced).

    Returns:
        tuple: `(params, state)`: the projected parameters (unconstrained leaves are the
        objects given) and the new state.

    Raises:
        ValueError: a negative or non-finite `lr`, a negative `iters`, a state that does
            not fit `params` (naming the tensor and field), or `batches` running out.
        TypeError: a `loss_fn` that is not callable, `batches` that is not an iterator, or a
            state that is not a `TPGMState`.
    """
    where = "tpgm_step"
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable: loss_fn(params, batch) -> scalar loss")
    check_number("lr", lr, where, low=0.0)
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
        raise ValueError(f"{where}: iters must be an int >= 0, got {iters!r}")
    check_bool("jit", jit, where)
    if iters and not isinstance(batches, Iterator):
        raise TypeError(
            f"{where}: batches must be an iterator (next(batches) gives one validation batch per "
            f"projection update), got {type(batches).__name__}: keep one iterator across calls, e.g. "
            "itertools.cycle(validation_batches)"
        )
    leaves = _flatten(params, where)
    norm, axes = _check_state(leaves, state, where)
    pieces = _JITTED if jit else _EAGER
    statics = dict(norm=norm, axes=axes)
    constraint = pieces["begin"](params, state.anchor, state.constraint, state.calls, **statics)
    moments, count = (state.constraint_exp_avg, state.constraint_exp_avg_sq), state.count
    for done in range(int(iters)):
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(
                f"{where}: batches ran out after {done} of {iters} projection updates; pass an endless "
                "iterator, e.g. itertools.cycle(validation_batches)"
            ) from None
        constraint, moments, count = pieces["update"](
            _Identity(loss_fn), params, state.anchor, constraint, moments, count, lr, batch, **statics
        )
    projected, constraint = pieces["project"](params, state.anchor, constraint, **statics)
    new_values = [p if q is None else q for p, q in zip(leaves.values, projected)]
    new_state = state._replace(
        count=count,
        calls=_safe_increment(state.calls),
        constraint=constraint,
        constraint_exp_avg=moments[0],
        constraint_exp_avg_sq=moments[1],
    )
    return unflatten(leaves, new_values), new_state


# --------------------------------------------------------------------------------------------------
# Checks (plain Python, before any computation).


def _flatten(params, where):
    if params is None:
        raise ValueError(f"{where}: `params` is required (a pytree of the model's floating-point arrays)")
    return flatten_params(params, where)


def _check_state(leaves, state, where):
    """The state against the parameters; returns the norm's name and one static row axis per leaf."""
    if not isinstance(state, TPGMState):
        raise TypeError(f"{where}: expected the TPGMState made by tpgm_init, got {type(state).__name__}")
    for field in ("count", "calls", "norm"):
        check_state_array(getattr(state, field), f"state.{field}", (), jnp.int32, where)
    anchors = line_up(leaves, state.anchor, "state.anchor", where)
    constrained = [not is_absent(a) for a in anchors]
    check_state_leaves(leaves, anchors, "state.anchor", where, present=constrained)
    scalars = [()] * len(anchors)
    statistics = [core.radius_dtype(p.dtype, xp=jnp) for p in leaves.values]
    for field in ("constraint", "constraint_exp_avg", "constraint_exp_avg_sq"):
        values = line_up(leaves, getattr(state, field), f"state.{field}", where)
        check_state_leaves(
            leaves, values, f"state.{field}", where, present=constrained, shapes=scalars, dtypes=statistics
        )
    row_axes = line_up(leaves, state.row_axis, "state.row_axis", where)
    check_state_leaves(
        leaves, row_axes, "state.row_axis", where, present=constrained, shapes=scalars,
        dtypes=[jnp.int32] * len(anchors),
    )  # fmt: skip
    config = [state.norm, *(a for a in row_axes if not is_absent(a))]
    if not is_concrete(config):
        raise TypeError(
            f"{where}: runs outside jax.jit (it draws a batch per projection update in Python; its "
            "per-update work is jitted): state.norm and state.row_axis must be concrete"
        )
    code, *stored = (int(v) for v in jax.device_get(config))  # one host read per call
    if not 0 <= code < len(core.TPGM_NORMS):
        raise ValueError(f"{where}: state.norm is {code}, not an index into {core.TPGM_NORMS}")
    axes, stored = [], iter(stored)
    for path, param, flag in zip(leaves.paths, leaves.values, constrained):
        axis = next(stored) if flag else 0
        if not 0 <= axis < max(param.ndim, 1):
            raise ValueError(
                f"{where}: state.row_axis of {path} is {axis}, out of range for its shape {tuple(param.shape)}"
            )
        axes.append(axis if flag else None)
    return core.TPGM_NORMS[code], tuple(axes)


class _Identity:
    """`loss_fn` as a static argument of `jax.jit`, hashed by identity (any callable is accepted)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __hash__(self):
        return id(self.fn)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.fn is self.fn


# --------------------------------------------------------------------------------------------------
# The pieces of one call, each a pure function of arrays; `axes[i]` is None for a tensor without
# a constraint (static, as is the norm).


def _measured(params, anchor, norm, axes):
    """Per leaf: `(θ₀, c, n)` for a constrained, non-empty tensor, else None (nothing to project)."""
    values, treedef = jax.tree.flatten(params)
    anchors = treedef.flatten_up_to(anchor)
    out = []
    for param, theta0, axis in zip(values, anchors, axes):
        if axis is None or param.size == 0:
            out.append(None)
            continue
        displacement = param - theta0
        out.append((theta0, displacement, core.tpgm_norm(displacement, norm, row_axis=axis, xp=jnp)))
    return values, treedef, out


def _begin(params, anchor, constraint, calls, *, norm, axes):
    """The constraints at the start of a call: `γ = min(n) / 2` on the first call, else unchanged."""
    _, treedef, measured = _measured(params, anchor, norm, axes)
    gammas = treedef.flatten_up_to(constraint)
    first = calls == 0
    out = [
        g if m is None else jnp.where(first, core.initial_constraint(m[2], xp=jnp).astype(g.dtype), g)
        for g, m in zip(gammas, measured)
    ]
    return treedef.unflatten(out)


def _update(loss, params, anchor, constraint, moments, count, lr, batch, *, norm, axes):
    """One projection update: clip `γ`, `∂L/∂γ` at `θ_p` on `batch`, one Adam step on every `γ`."""
    values, treedef, measured = _measured(params, anchor, norm, axes)
    gammas = [
        g if m is None else core.clip_constraint(g, m[2], xp=jnp)
        for g, m in zip(treedef.flatten_up_to(constraint), measured)
    ]
    live = [i for i, m in enumerate(measured) if m is not None]

    def validation_loss(free):
        weights = list(values)
        for i, gamma in zip(live, free):
            theta0, displacement, n = measured[i]
            ratio = core.projection_ratio(gamma, n, xp=jnp)
            weights[i] = core.tpgm_projected(theta0, displacement, ratio, xp=jnp)
        return loss.fn(treedef.unflatten(weights), batch)

    grads = jax.grad(validation_loss)([gammas[i] for i in live])
    step = _safe_increment(count)
    exp_avg, exp_avg_sq = (treedef.flatten_up_to(m) for m in moments)
    for i, grad in zip(live, grads):
        direction, adam = core.adam_direction(
            grad, core.AdamState(exp_avg[i], exp_avg_sq[i]), step,
            lr=lr, beta1=BETA1, beta2=BETA2, eps=EPS, xp=jnp,
        )  # fmt: skip
        gammas[i] = gammas[i] - direction
        exp_avg[i], exp_avg_sq[i] = adam.exp_avg, adam.exp_avg_sq
    return treedef.unflatten(gammas), (treedef.unflatten(exp_avg), treedef.unflatten(exp_avg_sq)), step


def _project(params, anchor, constraint, *, norm, axes):
    """The projection that ends a call: the constrained tensors (None for the others) and the clipped `γ`."""
    values, treedef, measured = _measured(params, anchor, norm, axes)
    gammas = treedef.flatten_up_to(constraint)
    projected = []
    for i, (param, m) in enumerate(zip(values, measured)):
        if m is None:
            projected.append(None)
            continue
        theta0, displacement, n = m
        gammas[i] = core.clip_constraint(gammas[i], n, xp=jnp)
        ratio = core.projection_ratio(gammas[i], n, xp=jnp)
        projected.append(core.tpgm_projected(theta0, displacement, ratio, xp=jnp).astype(param.dtype))
    return projected, treedef.unflatten(gammas)


_EAGER = {"begin": _begin, "update": _update, "project": _project}
_JITTED = {
    "begin": jax.jit(_begin, static_argnames=("norm", "axes")),
    "update": jax.jit(_update, static_argnums=(0,), static_argnames=("norm", "axes")),
    "project": jax.jit(_project, static_argnames=("norm", "axes")),
}
