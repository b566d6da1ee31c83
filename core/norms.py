"""Norms and the projection onto a ball around the anchor (ALGORITHMS.md §1, §2)."""

from ._namespace import namespace


def l2_norm(x, *, xp=None):
    r"""Frobenius norm of the whole tensor, :math:`\|x\|_2 = \sqrt{\sum x^2}`, a 0-d array."""
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
    r"""Maximum-absolute-row-sum norm, per row (FTP, ALGORITHMS.md §1).

    - ``ndim >= 2``: :math:`n(x)_i = \sum_{j,\dots} |x_{ij\dots}|`, shape ``(d0, 1, ..., 1)``,
      so that it broadcasts against ``x``;
    - ``ndim == 1``: the L1 norm of the whole vector, shape ``(1,)`` (a bias is one row);
    - ``ndim == 0``: :math:`|x|`.
    """
    xp = namespace(xp, x)
    return _row_sum(xp.abs(x), xp)


def rowdot(a, b, *, xp=None):
    r"""The MARS reduction applied to :math:`a \odot b`: per-row inner products, MARS-shaped."""
    xp = namespace(xp, a, b)
    return _row_sum(a * b, xp)


def project(displacement, radius, norm=None, *, xp=None):
    r"""Project a displacement onto the ball of radius :math:`\gamma` (ALGORITHMS.md §2).

    .. math:: \Pi(c; \gamma) = \operatorname{clip}(\gamma / n(c), 0, 1) \odot c

    ``norm`` defaults to :func:`mars_norm` of ``displacement`` (rows whose L1 norm
    exceeds ``radius`` are scaled onto the ball, the others are untouched); pass
    ``l2_norm(c)`` for the whole-tensor ball, or ``mars_norm(c) + 1e-8`` as FTP does.
    The result keeps the displacement's dtype.
    """
    xp = namespace(xp, displacement, radius, norm)
    if norm is None:
        norm = mars_norm(displacement, xp=xp)
    scale = xp.clip(radius / norm, 0.0, 1.0)
    return xp.astype(scale * displacement, displacement.dtype, copy=False)
