"""The Array API subset that ``tether.core`` calls, built on ``keras.ops``.

``tether.core`` computes in whatever namespace it is given as ``xp=``; the Keras
adapter hands it :data:`keras_namespace`, so that one optimizer runs unchanged on
the TensorFlow, JAX and torch backends, eagerly or traced (``tf.function``,
``jax.jit``). The core's docstring lists the subset; each attribute here is one
entry of it.

``.dtype`` of an array may be a backend dtype object (``tf.DType``,
``torch.dtype``, a NumPy dtype) or a string (``KerasVariable.dtype``): every
function that takes a dtype passes it through ``keras.backend.standardize_dtype``.

Two ``keras.ops`` behaviours are worked around, so that float64 stays float64:
``keras.backend.result_type`` (and every op that promotes through it, such as
``ops.maximum`` on torch) folds 64-bit results to 32 bits on the JAX and torch
backends, following JAX's default; and ``ops.sum(x, keepdims=True)`` with no
axis drops the kept dimensions on torch.
"""

from keras import backend, ops

__all__ = ["keras_namespace"]


def _dtype(dtype):
    """A Keras dtype string from a dtype object, a string, or an array (its dtype)."""
    if hasattr(dtype, "dtype") and not isinstance(dtype, str):
        dtype = dtype.dtype
    return backend.standardize_dtype(dtype)


def _like(bound, x):
    """A bound as a tensor of ``x``'s dtype (no silent promotion in ``clip``)."""
    if isinstance(bound, (bool, int, float)):
        return ops.convert_to_tensor(bound, dtype=_dtype(x.dtype))
    return ops.cast(bound, _dtype(x.dtype))


_WIDE = {"float32": "float64", "int32": "int64", "uint32": "uint64", "complex64": "complex128"}


def _result_type(*dtypes):
    """Keras's promotion, without its folding of 64-bit results to 32 bits on JAX and torch."""
    dtypes = [_dtype(d) for d in dtypes]
    out = backend.result_type(*dtypes)
    wide = _WIDE.get(out)
    return wide if wide in dtypes else out


class _KerasNamespace:
    """An object whose attributes are the Array API functions the core needs, on ``keras.ops``."""

    float32 = "float32"

    @staticmethod
    def abs(x):
        return ops.absolute(x)

    @staticmethod
    def asarray(obj, dtype=None):
        return ops.convert_to_tensor(obj, dtype=None if dtype is None else _dtype(dtype))

    @staticmethod
    def astype(x, dtype, copy=False):
        # keras casts are out-of-place; `copy` only tells the core it need not copy
        return ops.cast(x, _dtype(dtype))

    @staticmethod
    def clip(x, min=None, max=None):
        x = ops.convert_to_tensor(x)
        if min is None or max is None:
            raise NotImplementedError("tether's keras namespace clips with both bounds")
        return ops.clip(x, _like(min, x), _like(max, x))

    @staticmethod
    def full_like(x, fill_value, dtype=None):
        return ops.full_like(x, fill_value, dtype=None if dtype is None else _dtype(dtype))

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return ops.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def maximum(x1, x2):
        x1, x2 = ops.convert_to_tensor(x1), ops.convert_to_tensor(x2)
        dtype = _result_type(x1.dtype, x2.dtype)
        x1, x2 = ops.cast(x1, dtype), ops.cast(x2, dtype)
        # not ops.maximum, which computes float64 in float32 on torch; NaN propagates as there
        return ops.where(ops.logical_or(x1 > x2, ops.isnan(x1)), x1, x2)

    @staticmethod
    def min(x, axis=None, keepdims=False):
        return ops.min(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def ones_like(x, dtype=None):
        return ops.ones_like(x, dtype=None if dtype is None else _dtype(dtype))

    @staticmethod
    def result_type(*arrays_and_dtypes):
        return _result_type(*arrays_and_dtypes)

    @staticmethod
    def sqrt(x):
        return ops.sqrt(x)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        total = ops.sum(x, axis=axis, keepdims=keepdims)
        if axis is None and keepdims:
            total = ops.reshape(total, (1,) * len(x.shape))
        return total

    @staticmethod
    def where(condition, x1, x2):
        return ops.where(condition, x1, x2)

    @staticmethod
    def zeros(shape, dtype=None):
        return ops.zeros(shape, dtype=None if dtype is None else _dtype(dtype))

    @staticmethod
    def zeros_like(x, dtype=None):
        return ops.zeros_like(x, dtype=None if dtype is None else _dtype(dtype))

    def __repr__(self):
        return f"<tether keras.ops namespace, backend {backend.backend()!r}>"


#: The namespace to pass as ``xp=`` to every ``tether.core`` function.
keras_namespace = _KerasNamespace()
