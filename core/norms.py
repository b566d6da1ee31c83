"""Norms and the projection onto a ball around the anchor (ALGORITHMS.md §1, §2).

A **row** is one output unit of a layer (ALGORITHMS.md §1). PyTorch keeps outputs
on axis 0 (``Linear.weight`` ``(out, in)``); Keras and flax keep a ``Dense`` or
``Conv`` kernel's outputs on the last axis (``(in, out)``, ``(kh, kw, in, out)``).
Every per-row function here takes that axis as ``row_axis`` (0 by default, negative
values count from the end), so that the same layer in either layout has the same norms.
"""

import operator

from ._namespace import namespace


def row_axis_of(ndim, row_axis=0):
    """``row_axis`` as a non-negative axis of an ``ndim``-dimensional tensor (``None`` below 2 dims).

    Raises:
        TypeError: ``row_axis`` is not an integer.
        ValueError: it is outside ``[-ndim, ndim)``.
    """
    try:
        axis = operator.index(row_axis)
    except TypeError:
        raise TypeError(f"row_axis must be an integer, got {row_axis!r}") from None
    if ndim < 2:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"row_axis {row_axis} is out of range for a tensor of {ndim} dimensions")
    return axis % ndim


def mars_shape(shape, row_axis=0):
    """The shape of `mars_norm` of a tensor of ``shape``: ``(d_r, 1, …)`` kept in place, ``(1,)``, ``()``."""
    shape = tuple(shape)
    if len(shape) <= 1:
        return (1,) * len(shape)
    axis = row_axis_of(len(shape), row_axis)
    return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def l2_norm(x, *, xp=None):
    """Frobenius norm of the whole tensor, `‖x‖₂ = √(Σ x²)`, a 0-d array."""
    xp = namespace(xp, x)
    return xp.sqrt(xp.sum(x * x))


def _row_sum(x, row_axis, xp):
    """Sum over every axis but the row axis (kept), or over everything for a vector."""
    if x.ndim == 0:
        return x
    if x.ndim == 1:
        return xp.sum(x, keepdims=True)
    axis = row_axis_of(x.ndim, row_axis)
    return xp.sum(x, axis=tuple(i for i in range(x.ndim) if i != axis), keepdims=True)


def mars_norm(x, *, row_axis=0, xp=None):
    """Maximum-absolute-row-sum norm, per row (FTP, ALGORITHMS.md §1).

    - `ndim >= 2`: `n(x)ᵣ = Σ |x|` over every axis but `row_axis`, kept with size 1
      (shape `(d₀, 1, …, 1)` for `row_axis=0`), so that it broadcasts against `x`;
    - `ndim == 1`: the L1 norm of the whole vector, shape `(1,)` (a bias is one row);
    - `ndim == 0`: `|x|`.

    `row_axis` is the axis of the output units: 0 in PyTorch's layout, -1 for a Keras
    or flax kernel.
    """
    xp = namespace(xp, x)
    return _row_sum(xp.abs(x), row_axis, xp)


def rowdot(a, b, *, row_axis=0, xp=None):
    """The MARS reduction applied to `a ⊙ b`: per-row inner products, MARS-shaped."""
    xp = namespace(xp, a, b)
    return _row_sum(a * b, row_axis, xp)


def project(displacement, radius, norm=None, *, row_axis=0, xp=None):
    """Project a displacement onto the ball of radius `γ` (ALGORITHMS.md §2).

        Π(c; γ) = clip(γ / n(c), 0, 1) ⊙ c

    `norm` defaults to `mars_norm(displacement, row_axis=row_axis)` (rows whose L1
    norm exceeds `radius` are scaled onto the ball, the others are untouched); pass
    `l2_norm(c)` for the whole-tensor ball, or `mars_norm(c) + 1e-8` as FTP does. This
    is also MARS-SP's fixed-radius projection (ALGORITHMS.md §8). The result keeps the
    displacement's dtype.
    """
    xp = namespace(xp, displacement, radius, norm)
    # the norm and the scale in at least float32 (ALGORITHMS.md §9), the result in c's dtype
    c = xp.astype(displacement, xp.result_type(displacement.dtype, xp.float32), copy=False)
    if norm is None:
        norm = mars_norm(c, row_axis=row_axis, xp=xp)
    # divide only where the row is outside the ball: no 0/0 for a zero row, no overflow for a tiny one
    outside = norm > radius
    one = xp.ones_like(norm)
    scale = xp.where(outside, radius / xp.where(outside, norm, one), one)
    return xp.astype(scale * c, displacement.dtype, copy=False)
