"""How the core finds the array namespace to compute in, and turns numbers into arrays."""

import numpy as np
from array_api_compat import array_namespace


def namespace(xp, *arrays):
    """Return `xp` if given, else the Array API namespace of the array arguments.

    Python numbers and `None` among `arrays` are ignored, so hyperparameters
    that may be floats or (under `inject_hyperparams`) arrays can be passed as is.
    NumPy scalars (what NumPy returns for 0-d results) count as NumPy arrays.
    """
    if xp is not None:
        return xp
    arrays = [
        np.asarray(a) if isinstance(a, np.generic) else a  # np.float64 subclasses float: test it first
        for a in arrays
        if isinstance(a, np.generic) or (a is not None and not isinstance(a, (bool, int, float)))
    ]
    return array_namespace(*arrays)


def as_dtype(value, dtype, xp):
    """`value` (a Python number or an array) as an array of `dtype`."""
    if isinstance(value, (bool, int, float)):
        return xp.asarray(value, dtype=dtype)
    return xp.astype(value, dtype, copy=False)
