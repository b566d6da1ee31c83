"""The reference baselines of robust fine-tuning (ALGORITHMS.md §8): L2-SP, MARS-SP, WiSE-FT.

- L2-SP (Li et al., ICML 2018): an L2 penalty toward the anchor, `(α/2)‖θ − θ₀‖²`,
  seen by the base optimizer as a gradient term;
- MARS-SP (Gouk et al., ICLR 2021): after every base step, the projection onto the
  MARS ball of a fixed radius around the anchor;
- WiSE-FT (Wortsman et al., CVPR 2022): the fine-tuned weights interpolated with
  the pre-trained ones.
"""

from ._namespace import as_dtype, namespace
from .norms import project


def l2_sp_gradient(grad, param, anchor, alpha, *, xp=None):
    """L2-SP's gradient, `g + α (θ − θ₀)` (`anchor=None`: a zero anchor, `g + α θ`).

    The base optimizer steps on it, so momentum and Adam's moments see the penalty.
    Keeps the gradient's dtype.
    """
    xp = namespace(xp, grad, param, anchor, alpha)
    displacement = param if anchor is None else param - anchor
    return xp.astype(grad + alpha * displacement, grad.dtype, copy=False)


def mars_sp_project(param, anchor, radius, *, row_axis=0, xp=None):
    """MARS-SP: `θ ← θ₀ + Π(θ − θ₀; γ)` with the MARS norm and a fixed radius `γ` (§2's `project`).

    `param` is `θ̃`, the base optimizer's result; each row (`row_axis`: the output units) whose
    L1 norm exceeds `γ` is scaled onto the ball. `anchor=None` is a zero anchor. Keeps `θ`'s dtype.
    """
    xp = namespace(xp, param, anchor, radius)
    displacement = param if anchor is None else param - anchor
    projected = project(displacement, radius, row_axis=row_axis, xp=xp)
    return projected if anchor is None else xp.astype(anchor + projected, param.dtype, copy=False)


def wise_ft(anchor, finetuned, alpha, *, xp=None):
    """WiSE-FT's interpolation, `θ = (1 − α) θ₀ + α θ_ft` (`α = 0`: pre-trained, `α = 1`: fine-tuned).

    Computed in at least float32; keeps the fine-tuned tensor's dtype.
    """
    xp = namespace(xp, anchor, finetuned, alpha)
    dtype = xp.result_type(finetuned.dtype, xp.float32)
    a = as_dtype(alpha, dtype, xp)
    mixed = (1 - a) * xp.astype(anchor, dtype, copy=False) + a * xp.astype(finetuned, dtype, copy=False)
    return xp.astype(mixed, finetuned.dtype, copy=False)
