"""Bookkeeping for the optax adapter: params-shaped trees, leaf by leaf, with errors that name the leaf.

The adapter flattens the parameters once per call (at trace time under ``jax.jit``)
and lines every other tree up against them with ``treedef.flatten_up_to``, so that a
leaf that is absent (``optax.MaskedNode``: an unanchored or zero-anchored tensor)
travels as a value. Every check here is on static structure, shapes and dtypes,
never on an array's value.
"""

import math
import numbers
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core

ABSENT = optax.MaskedNode()
_TRACER = getattr(jax.core, "Tracer", ())


def is_concrete(values):
    """True when no value is a tracer: the parameters are real arrays (not inside ``jax.jit``)."""
    return not any(isinstance(v, _TRACER) for v in values)


def is_absent(leaf):
    """True for a leaf that stores nothing (``MaskedNode``, or ``None``)."""
    return leaf is None or isinstance(leaf, optax.MaskedNode)


class Leaves(NamedTuple):
    """The parameters flattened: their treedef, leaves, a printable path and the jax key path of each leaf."""

    treedef: Any
    values: list
    paths: list
    keypaths: list


def flatten_params(params, where):
    """Flatten ``params`` and check that every leaf is a real floating-point array."""
    if params is None:
        raise ValueError(
            f"{where}: `params` is required. tether's transformations move each tensor relative to its "
            "anchor, so call `update(grads, state, params)` (in a chain, pass `params` to the chain's update)"
        )
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keypaths = [path for path, _ in path_leaves]
    paths = [jax.tree_util.keystr(path) or "<root>" for path in keypaths]
    values = [leaf for _, leaf in path_leaves]
    for path, leaf in zip(paths, values, strict=True):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise TypeError(f"{where}: parameter {path} is a {type(leaf).__name__}, not an array")
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{where}: parameter {path} is complex ({dtype}); tether's methods are defined "
                "for real parameters only (norms and the sign tests need real values)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}: parameter {path} has dtype {dtype}; expected a floating-point dtype")
    return Leaves(treedef, values, paths, keypaths)


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
                f"{where}: the gradient of {path} is complex ({dtype}); tether's methods are "
                "defined for real parameters only"
            )
        if jnp.shape(grad) != param.shape:
            raise ValueError(
                f"{where}: the gradient of {path} has shape {jnp.shape(grad)}, the parameter {param.shape}"
            )
        grad = jnp.asarray(grad)
        out.append(grad if grad.dtype == param.dtype else grad.astype(param.dtype))
    return out


def check_state_leaves(leaves, values, what, where, *, present=None, shapes=None, dtypes=None):
    """Check per-leaf state values: present where expected, each with its expected shape and dtype.

    ``shapes`` and ``dtypes`` default to the parameters' own; an entry of ``present`` that is
    ``False`` expects ``optax.MaskedNode``. A wrong dtype is an error, not a cast: a 16-bit
    radius or ``1 / n`` would silently change the numbers, and the state's dtypes must not
    change from one step to the next (``lax.scan``, donation).
    """
    shapes = [p.shape for p in leaves.values] if shapes is None else shapes
    dtypes = [p.dtype for p in leaves.values] if dtypes is None else dtypes
    for i, (path, value) in enumerate(zip(leaves.paths, values, strict=True)):
        if present is not None and present[i] == is_absent(value):
            expected = "an array" if present[i] else "nothing (optax.MaskedNode)"
            raise ValueError(
                f"{where}: {what} of {path} should hold {expected}, got {type(value).__name__}: "
                "the state was made with another mask, anchor mode or parameter tree"
            )
        if is_absent(value):
            continue
        check_state_array(value, f"{what} of {path}", shapes[i], dtypes[i], where)


def check_state_array(value, what, shape, dtype, where):
    """One state array: ``shape`` and ``dtype`` exactly, or a ValueError that names it."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise ValueError(f"{where}: {what} is a {type(value).__name__}, not an array: the state is corrupt")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{where}: {what} has shape {tuple(value.shape)}, expected {tuple(shape)}: "
            "the state does not belong to these parameters (or to this transformation's settings)"
        )
    if jnp.dtype(value.dtype) != jnp.dtype(dtype):
        raise ValueError(
            f"{where}: {what} has dtype {jnp.dtype(value.dtype)}, expected {jnp.dtype(dtype)}: "
            "the state was made for parameters of another dtype, or converted since"
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


def _key_name(key):
    """The name in one entry of a jax key path: a dict key, an attribute name, or ``None``."""
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return None


#: Keys of the tensors that keep their output units on the last axis in flax: a `Dense` or `Conv`
#: kernel (`(in, out)`, `(kh, kw, in, out)`) and `nnx.LoRA`'s factors (`(in, rank)`, `(rank, out)`).
ROWS_LAST_KEYS = frozenset({"kernel", "lora_a", "lora_b"})


def default_row_axis(keypath, leaf):
    """The default row axis: -1 for a flax kernel or LoRA factor, 0 for everything else.

    A leaf with ``ndim >= 2`` whose key path has a key in `ROWS_LAST_KEYS` (flax linen's
    ``params["Dense_0"]["kernel"]``; flax NNX's ``State`` paths, which may end in ``.value``;
    ``nnx.LoRA``'s ``lora_a`` ``(in, rank)`` and ``lora_b`` ``(rank, out)``) keeps its output
    units on the last axis. Embeddings ``(num, dim)``, biases, scalars and anything else keep
    PyTorch's layout: rows on axis 0.
    """
    if jnp.ndim(leaf) >= 2 and any(_key_name(key) in ROWS_LAST_KEYS for key in keypath):
        return -1
    return 0


def _is_static_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


_ROW_AXIS_FORMS = (
    "row_axis must be None (flax's `kernel` and LoRA rule), an int, a pytree of ints with the structure of the "
    "parameters (or a prefix of it), or a callable (key_path, leaf) -> int"
)


def check_row_axis(row_axis, where):
    """At construction: ``row_axis`` has one of its static forms (its leaves are Python ints)."""
    if row_axis is None or callable(row_axis):
        return
    for leaf in jax.tree.leaves(row_axis):
        if not _is_static_int(leaf):
            raise TypeError(
                f"{where}: {_ROW_AXIS_FORMS}; got a leaf {leaf!r}. It is static (it shapes the state): "
                "under optax.inject_hyperparams name it in `static_args`"
            )


def resolve_row_axis(row_axis, params, leaves, where):
    """One static non-negative row axis per parameter leaf (0 for a tensor of fewer than 2 dims).

    ``row_axis`` is ``None`` (`default_row_axis`), an int for every leaf, a pytree of ints
    with the structure of the parameters or a prefix of it, or a callable ``(key_path, leaf)
    -> int`` with the leaf's jax key path (as ``jax.tree_util.tree_map_with_path`` gives).
    """
    if row_axis is None:
        axes = [default_row_axis(k, p) for k, p in zip(leaves.keypaths, leaves.values, strict=True)]
    elif callable(row_axis):
        axes = [row_axis(k, p) for k, p in zip(leaves.keypaths, leaves.values, strict=True)]
    else:
        try:
            full = jax.tree.map(lambda axis, sub: jax.tree.map(lambda _: axis, sub), row_axis, params)
            axes = leaves.treedef.flatten_up_to(full)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{where}: {_ROW_AXIS_FORMS}.\n  parameters: {leaves.treedef}\n"
                f"  row_axis:   {jax.tree.structure(row_axis)}\n  ({error})"
            ) from None
    out = []
    for path, param, axis in zip(leaves.paths, leaves.values, axes, strict=True):
        if not _is_static_int(axis):
            raise TypeError(f"{where}: the row axis of {path} is {axis!r}; it must be a Python int")
        try:
            resolved = core.row_axis_of(param.ndim, operator.index(axis))
        except ValueError:
            raise ValueError(
                f"{where}: row_axis {axis} of {path} is out of range for its shape {tuple(param.shape)}"
            ) from None
        out.append(0 if resolved is None else resolved)
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
    for path, values in zip(leaves.paths, zip(*columns, strict=True), strict=True):
        absent = [name for name, v in zip(cls._fields, values, strict=True) if is_absent(v)]
        if len(absent) == len(values):
            rows.append(ABSENT)
        elif absent:
            raise ValueError(
                f"{where}: {what} of {path} is partly missing ({', '.join(absent)}): the state is corrupt"
            )
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
    """``value`` finite and in ``[low, high]`` (``[low, high)`` with ``high_open``) when it is a Python number."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a number, got a bool")
    if not _is_number(value):
        if value is None or isinstance(value, str):
            raise TypeError(f"{where}: {name} must be a number, got {value!r}")
        return  # an array (inject_hyperparams) or a traced value: not checked here
    ok = (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok or not math.isfinite(value):
        upper = "∞)" if high is None else f"{high})" if high_open else f"{high}]"
        raise ValueError(f"{where}: {name} must be a finite number in [{low}, {upper}, got {value}")


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
