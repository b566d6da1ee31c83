"""Bookkeeping for the optax adapter: params-shaped trees, leaf by leaf, with errors that name the leaf.

The adapter flattens the parameters once per call (at trace time under ``jax.jit``)
and lines every other tree up against them with ``treedef.flatten_up_to``, so that a
leaf that is absent (``optax.MaskedNode``: an unanchored or zero-anchored tensor)
travels as a value. Every check here is on static structure, shapes and dtypes,
never on an array's value.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ABSENT = optax.MaskedNode()
_TRACER = getattr(jax.core, "Tracer", ())


def is_absent(leaf):
    """True for a leaf that stores nothing (``MaskedNode``, or ``None``)."""
    return leaf is None or isinstance(leaf, optax.MaskedNode)


class Leaves(NamedTuple):
    """The parameters flattened: their treedef, leaves, and a printable path for each leaf."""

    treedef: Any
    values: list
    paths: list


def flatten_params(params, where):
    """Flatten ``params`` and check that every leaf is a real floating-point array."""
    if params is None:
        raise ValueError(
            f"{where}: `params` is required. FTP and SPD move each tensor relative to its anchor, "
            "so call `update(grads, state, params)` (in a chain, pass `params` to the chain's update)"
        )
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in path_leaves]
    values = [leaf for _, leaf in path_leaves]
    for path, leaf in zip(paths, values, strict=True):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise TypeError(f"{where}: parameter {path} is a {type(leaf).__name__}, not an array")
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{where}: parameter {path} is complex ({dtype}); FTP and SPD are defined for real "
                "parameters only (norms and the sign tests need real values)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: parameter {path} has dtype {dtype}; expected a floating-point dtype")
    return Leaves(treedef, values, paths)


def line_up(leaves, tree, what, where):
    """``tree``'s subtrees at the parameters' leaf positions, or a ValueError that says what differs."""
    try:
        return leaves.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{where}: {what} does not have the tree structure of the parameters.\n"
            f"  parameters: {leaves.treedef}\n  {what}: {jax.tree.structure(tree)}\n  ({error})"
        ) from None


def check_grads(leaves, grads, where):
    """The gradients lined up with the parameters (same tree and shapes, real), cast to θ's dtype."""
    if jax.tree.structure(grads) != leaves.treedef:
        raise ValueError(
            f"{where}: the gradients do not have the tree structure of the parameters.\n"
            f"  parameters: {leaves.treedef}\n  gradients:  {jax.tree.structure(grads)}"
        )
    out = []
    for path, param, grad in zip(leaves.paths, leaves.values, jax.tree.leaves(grads), strict=True):
        dtype = getattr(grad, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{where}: the gradient of {path} is complex ({dtype}); FTP and SPD are defined for "
                "real parameters only"
            )
        if jnp.shape(grad) != param.shape:
            raise ValueError(
                f"{where}: the gradient of {path} has shape {jnp.shape(grad)}, the parameter {param.shape}"
            )
        grad = jnp.asarray(grad)
        out.append(grad if grad.dtype == param.dtype else grad.astype(param.dtype))
    return out


def check_state_leaves(leaves, values, what, where, *, shaped_like_param=True, present=None):
    """Check per-leaf state values: presence where expected and, for tensors, the parameter's shape."""
    for i, (path, param, value) in enumerate(zip(leaves.paths, leaves.values, values, strict=True)):
        if present is not None and present[i] == is_absent(value):
            expected = "an array" if present[i] else "nothing (optax.MaskedNode)"
            raise ValueError(
                f"{where}: {what} of {path} should hold {expected}, got {type(value).__name__}: "
                "the state was made with another mask, anchor mode or parameter tree"
            )
        if shaped_like_param and not is_absent(value) and jnp.shape(value) != param.shape:
            raise ValueError(
                f"{where}: {what} of {path} has shape {jnp.shape(value)}, the parameter {param.shape}: "
                "the state does not belong to these parameters"
            )


def resolve_mask(mask, params, leaves, where):
    """One static bool per parameter leaf: ``True`` for an anchored tensor.

    ``mask`` follows ``optax.add_decayed_weights``: ``None`` (all anchored), a pytree of
    bools with the structure of the parameters or a prefix of it, or a callable that
    returns such a pytree given the parameters.
    """
    if mask is None:
        return [True] * len(leaves.values)
    tree = mask(params) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), tree, params)
        flags = leaves.treedef.flatten_up_to(full)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{where}: `mask` must be a pytree of bools with the structure of the parameters (or a prefix "
            f"of it), or a callable returning one.\n  parameters: {leaves.treedef}\n"
            f"  mask:       {jax.tree.structure(tree)}\n  ({error})"
        ) from None
    out = []
    for path, flag in zip(leaves.paths, flags, strict=True):
        if isinstance(flag, _TRACER):
            raise TypeError(
                f"{where}: the mask of {path} is a traced value; mask leaves must be static bools"
            )
        if isinstance(flag, (bool, np.bool_)) or (np.ndim(flag) == 0 and np.asarray(flag).dtype == bool):
            out.append(bool(flag))
        else:
            raise TypeError(f"{where}: the mask of {path} is {flag!r}; mask leaves must be bools")
    return out


def unflatten(leaves, values):
    """A params-shaped tree from one value per parameter leaf (``MaskedNode`` values stay as they are)."""
    return leaves.treedef.unflatten(values)


def split(leaves, trees, cls, what, where):
    """A NamedTuple of params-shaped trees → one ``cls`` (or ``ABSENT``) per parameter leaf."""
    columns = [
        line_up(leaves, tree, f"{what}.{name}", where) for name, tree in zip(cls._fields, trees, strict=True)
    ]
    rows = []
    for values in zip(*columns, strict=True):
        absent = [is_absent(v) for v in values]
        if all(absent):
            rows.append(ABSENT)
        elif any(absent):
            raise ValueError(f"{where}: {what} is partly missing for one tensor: the state is corrupt")
        else:
            rows.append(cls(*values))
    return rows


def merge(leaves, rows, cls):
    """One ``cls`` (or ``ABSENT``) per parameter leaf → a ``cls`` of params-shaped trees."""
    columns = [[ABSENT if is_absent(row) else row[i] for row in rows] for i in range(len(cls._fields))]
    return cls(*[unflatten(leaves, column) for column in columns])


# --- hyperparameter checks (Python numbers only: under inject_hyperparams they arrive as arrays) ---


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name, value, where, *, low=None, high=None, high_open=False):
    """``value`` in ``[low, high]`` (``[low, high)`` with ``high_open``) when it is a Python number."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a number, got a bool")
    if not _is_number(value):
        if value is None or isinstance(value, str):
            raise TypeError(f"{where}: {name} must be a number, got {value!r}")
        return  # an array (inject_hyperparams) or a traced value: not checked here
    ok = (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok or value != value:
        bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: {name} must be in {bounds}, got {value}")


def check_learning_rate(learning_rate, where):
    """A float ≥ 0, an array, or a schedule (a callable of the step count)."""
    if callable(learning_rate):
        return
    check_number("learning_rate", learning_rate, where, low=0.0)


def check_bool(name, value, where):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a bool (it is static), got {value!r}")


ANCHOR_MODES = ("init", "zero")


def check_anchor(anchor, where):
    if not isinstance(anchor, str) or anchor not in ANCHOR_MODES:
        raise ValueError(
            f"{where}: anchor must be one of {ANCHOR_MODES} ('init': the parameters given to init; "
            f"'zero': the origin), got {anchor!r}. To leave tensors unanchored, use `mask`."
        )


def check_mask(mask, where):
    if isinstance(mask, (str, numbers.Number)) and not isinstance(mask, bool):
        raise TypeError(f"{where}: mask must be None, a pytree of bools or a callable, got {mask!r}")


def check_inner(inner, where):
    if not (hasattr(inner, "init") and hasattr(inner, "update") and callable(inner.update)):
        raise TypeError(f"{where}: inner must be an optax GradientTransformation, got {type(inner).__name__}")
