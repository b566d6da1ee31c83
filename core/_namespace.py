"""How the core finds the array namespace to compute in, and turns numbers into arrays."""

from array_api_compat import array_namespace


def namespace(xp, *arrays):
    """Return ``xp`` if given, else the Array API namespace of the array arguments.

    Python numbers and ``None`` among ``arrays`` are ignored, so hyperparameters
    that may be floats or (under ``inject_hyperparams``) arrays can be passed as is.
    """
    if xp is not None:
        return xp
    return array_namespace(*[a for a in arrays if a is not None and not isinstance(a, (bool, int, float))])


def as_dtype(value, dtype, xp):
    """``value`` (a Python number or an array) as an array of ``dtype``."""
    if isinstance(value, (bool, int, float)):
        return xp.asarray(value, dtype=dtype)
    return xp.astype(value, dtype, copy=False)
