"""tether.core: the math of projection-based robust fine-tuning, once, for every backend.

Small pure functions on arrays of any Python Array API namespace (NumPy, PyTorch,
JAX, `array_api_strict`, or the namespace the Keras adapter builds on
`keras.ops`), implementing `ALGORITHMS.md` §1–§6:

- norms and projection (`tether.core.norms`): `l2_norm`,
  `mars_norm`, `rowdot`, `project` (each per-row function takes the axis of the
  output units, `row_axis`), `mars_shape`, `row_axis_of`;
- base directions (`tether.core.base`): `adam_direction`,
  `sgd_direction`, with `AdamState`, `SGDState`;
- FTP (`tether.core.ftp`): `radius_gradient`, `damp_radius_gradient`,
  `radius_update`, `ftp_project`, with `FTPState`;
- TPGM (`tether.core.tpgm`, ALGORITHMS.md §7): `tpgm_norm`,
  `initial_constraint`, `clip_constraint`, `projection_ratio`,
  `tpgm_projected`, `tpgm_project`, `check_norm`;
- the baselines (`tether.core.baselines`, §8): `l2_sp_gradient`,
  `mars_sp_project`, `wise_ft`;
- SPD (`tether.core.spd`): `spd_statistics`, `decay_ratio`,
  `decay_strength`, `decay_toward_anchor`, `spd_decay`, `spd_step`,
  `statistics_dtype`.

FTP's and SPD's statistics (norms, inner products, `1 / n`, the radius and the
ratios) are computed in at least float32 whatever the parameter's dtype; the
parameter keeps its own.

Every function takes arrays and returns new arrays: no state of its own, no
in-place update, no Python branch on an array's value and no host read, so each
traces under `jax.jit`, `tf.function` and `torch.compile(fullgraph=True)`.
The namespace is `array_api_compat.array_namespace` of the inputs, or the
`xp=` keyword when a caller supplies its own.

The subset of the Array API standard the core uses (a namespace passed as
`xp` must supply each of these):

- functions: `abs`, `asarray`, `astype`, `clip`, `full_like`, `max`,
  `maximum`, `min`, `ones_like`, `result_type`, `sqrt`, `sum` (with `axis`
  and `keepdims`), `where`, `zeros`, `zeros_like`;
- the dtype `float32`;
- on arrays: `.dtype`, `.ndim`, and the operators `+ - * / **`,
  `== >` and `<`, also against Python numbers.
"""

from .base import AdamState, SGDState, adam_direction, adam_init, sgd_direction, sgd_init
from .baselines import l2_sp_gradient, mars_sp_project, wise_ft
from .ftp import (
    FTPState,
    damp_radius_gradient,
    ftp_init,
    ftp_project,
    radius_dtype,
    radius_gradient,
    radius_update,
)
from .norms import l2_norm, mars_norm, mars_shape, project, row_axis_of, rowdot
from .spd import (
    SPDStatistics,
    decay_ratio,
    decay_strength,
    decay_toward_anchor,
    spd_decay,
    spd_statistics,
    spd_step,
    statistics_dtype,
)
from .tpgm import (
    TPGM_NORMS,
    check_norm,
    clip_constraint,
    initial_constraint,
    projection_ratio,
    tpgm_norm,
    tpgm_project,
    tpgm_projected,
)

__all__ = [
    "wise_ft",
    "tpgm_projected",
    "tpgm_project",
    "tpgm_norm",
    "projection_ratio",
    "mars_sp_project",
    "l2_sp_gradient",
    "initial_constraint",
    "clip_constraint",
    "check_norm",
    "TPGM_NORMS",
    "AdamState",
    "FTPState",
    "SGDState",
    "SPDStatistics",
    "adam_direction",
    "adam_init",
    "damp_radius_gradient",
    "decay_ratio",
    "decay_strength",
    "decay_toward_anchor",
    "ftp_init",
    "ftp_project",
    "l2_norm",
    "mars_norm",
    "mars_shape",
    "project",
    "radius_dtype",
    "radius_gradient",
    "radius_update",
    "row_axis_of",
    "rowdot",
    "sgd_direction",
    "sgd_init",
    "spd_decay",
    "spd_statistics",
    "spd_step",
    "statistics_dtype",
]
