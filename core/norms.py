"""Norms and the projection onto a ball around the anchor (ALGORITHMS.md §1, §2)."""

from ._namespace import namespace


def l2_norm(x, *, xp=None):
    """Frobenius norm of the whole tensor, `‖x‖₂ = √(Σ x²)`, a 0-d array."""
    xp = namespace(xp, x)
    return xp.sqrt(xp.sum(x * x))


def _row_sum(x, xp):
    """Sum over every axis but the first (kept), or over everything for a vector."""
    if x.ndim == 0:
        return x
    if x.ndim == 1:
        return xp.sum(x, keepdims=True)
    return xp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def mars_norm(x, *, xp=None):
    """Maximum-absolute-row-sum norm, per row (FTP, ALGORITHMS.md §1).

    - `ndim >= 2`: `n(x)ᵢ = Σ_{j,…} |x_{ij…}|`, shape `(d0, 1, …, 1)`, so that it
      broadcasts against `x`;
    - `ndim == 1`: the L1 norm of the whole vector, shape `(1,)` (a bias is one row);
    - `ndim == 0`: `|x|`.
    """
    xp = namespace(xp, x)
    return _row_sum(xp.abs(x), xp)


def rowdot(a, b, *, xp=None):
    """The MARS reduction applied to `a ⊙ b`: per-row inner products, MARS-shaped."""
    xp = namespace(xp, a, b)
    return _row_sum(a * b, xp)


def project(displacement, radius, norm=None, *, xp=None):
    """Project a displacement onto the ball of radius `γ` (ALGORITHMS.md §2).

        Π(c; γ) = clip(γ / n(c), 0, 1) ⊙ c

    `norm` defaults to `mars_norm(displacement)` (rows whose L1 norm exceeds
    `radius` are scaled onto the ball, the others are untouched); pass `l2_norm(c)`
    for the whole-tensor ball, or `mars_norm(c) + 1e-8` as FTP does. This is also
    MARS-SP's fixed-radius projection (ALGORITHMS.md §8). The result keeps the
    displacement's dtype.
    """
    xp = namespace(xp, displacement, radius, norm)
    if norm is None:
        norm = mars_norm(displacement, xp=xp)
    # divide only where the row is outside the ball: no 0/0 for a zero row, no overflow for a tiny one
    outside = norm > radius
    one = xp.ones_like(norm)
    scale = xp.where(outside, radius / xp.where(outside, norm, one), one)
    return xp.astype(scale * displacement, displacement.dtype, copy=False)
