"""TPGM: Trainable Projected Gradient Method (Tian et al., CVPR 2023; ALGORITHMS.md §7).

One constraint `γ` per anchored tensor, learned on held-out data by an ordinary
Adam (PyTorch's form, `tether.core.adam_direction`) on the loss of the model
evaluated at the projected weights

    θ_p = θ₀ + r(γ) ⊙ (θ − θ₀),    r(γ) = clip(γ / (n + 1e-8), 0, 1)

with the fine-tuned weights `θ` held fixed; then the weights are projected.
The adapters differentiate `θ_p` with respect to the constraints with their own
autodiff; the functions here are the pieces of §7 that every adapter shares.
"""

from ._namespace import namespace
from .ftp import radius_dtype
from .norms import l2_norm, mars_norm

#: The norms TPGM measures a displacement with: per row (`mars`, ALGORITHMS.md §1) or whole (`l2`).
TPGM_NORMS = ("mars", "l2")
#: Added to the norm before dividing by it, and the lower bound of a constraint.
TPGM_EPS = 1e-8
CONSTRAINT_FLOOR = 1e-8


def check_norm(norm):
    """`norm` if it is one of `TPGM_NORMS`, else a `ValueError` naming the choices."""
    if not isinstance(norm, str) or norm not in TPGM_NORMS:
        raise ValueError(f"norm must be one of {TPGM_NORMS}, got {norm!r}")
    return norm


def tpgm_norm(displacement, norm, *, row_axis=0, xp=None):
    """The norm `n` of a displacement `c = θ − θ₀`, in at least float32.

    - `"mars"`: `Σ |c|` per row (`row_axis`: the output units), MARS-shaped, so a bias is
      one row (ALGORITHMS.md §1);
    - `"l2"`: `‖c‖₂` of the whole tensor, 0-d.
    """
    xp = namespace(xp, displacement)
    c = xp.astype(displacement, radius_dtype(displacement.dtype, xp=xp), copy=False)
    if check_norm(norm) == "l2":
        return l2_norm(c, xp=xp)
    return mars_norm(c, row_axis=row_axis, xp=xp)


def initial_constraint(norm_value, *, xp=None):
    """`γ = min(n) / 2`, a tensor's constraint on the first TPGM call (a 0-d array)."""
    xp = namespace(xp, norm_value)
    return xp.min(norm_value) / 2


def clip_constraint(constraint, norm_value, *, xp=None):
    """`γ ← clip(γ, 1e-8, max n)` (TPGM stores its constraints clipped)."""
    xp = namespace(xp, constraint, norm_value)
    high = xp.astype(xp.max(norm_value), constraint.dtype, copy=False)
    return xp.clip(constraint, xp.full_like(constraint, CONSTRAINT_FLOOR), high)


def projection_ratio(constraint, norm_value, *, xp=None):
    """`r = clip(γ / (n + 1e-8), 0, 1)`, shaped like `n`.

    Written as `where(x < 1, x, 1)`: `γ ≥ 1e-8 > 0` after `clip_constraint`, so `x > 0`, and the
    derivative with respect to `γ` is `1 / (n + 1e-8)` where `0 < r < 1` and 0 elsewhere, as in
    the authors' code, under every framework's autodiff (a `clip` may pass the gradient at the
    bound).
    """
    xp = namespace(xp, constraint, norm_value)
    ratio = xp.astype(constraint, norm_value.dtype, copy=False) / (norm_value + TPGM_EPS)
    return xp.where(ratio < 1, ratio, xp.ones_like(ratio))


def tpgm_projected(anchor, displacement, ratio, *, xp=None):
    """`θ_p = θ₀ + r ⊙ c` in the displacement's dtype (`anchor=None`: a zero anchor)."""
    xp = namespace(xp, anchor, displacement, ratio)
    projected = xp.astype(ratio * displacement, displacement.dtype, copy=False)
    return projected if anchor is None else anchor + projected


def tpgm_project(param, anchor, constraint, norm, *, row_axis=0, xp=None):
    """The projection that ends a TPGM call (ALGORITHMS.md §7).

        c = θ − θ₀;  n = norm(c);  γ ← clip(γ, 1e-8, max n)
        θ ← θ₀ + clip(γ / (n + 1e-8), 0, 1) ⊙ c

    `anchor=None` is a zero anchor. Returns `(θ, γ)`, `θ` in its own dtype and the clipped
    constraint in its own.
    """
    xp = namespace(xp, param, anchor, constraint)
    displacement = param if anchor is None else param - anchor
    norm_value = tpgm_norm(displacement, norm, row_axis=row_axis, xp=xp)
    constraint = clip_constraint(constraint, norm_value, xp=xp)
    ratio = projection_ratio(constraint, norm_value, xp=xp)
    return xp.astype(tpgm_projected(anchor, displacement, ratio, xp=xp), param.dtype, copy=False), constraint
