"""What the Keras adapter's optimizers, wrappers and TPGM share (private): argument checks, the
variables' paths and row axes, and the backend contexts an update runs in."""

import contextlib
import numbers
import threading

import keras
from keras import ops

__all__ = ["KERNEL_NAMES", "default_row_axis"]


def _no_grad():
    """``torch.no_grad()`` on the torch backend (no autograd graph for the update), else nothing."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


_float64_lock = threading.Lock()
_float64_depth = 0  # open `_float64_kept` contexts (nested, or on other threads)
_float64_saved = None  # Keras's own entry, put back when the last one closes


@contextlib.contextmanager
def _float64_kept():
    """Keras's ops keep float64 inside (Keras 3.15 computes a float64 ``Dense`` in float32 on torch).

    Keras 3.15's ``result_type`` maps float64 to float32 on every backend but TensorFlow
    (keras-team/keras#23704, open), and the ops cast to it: on torch ``matmul`` and ``add``
    (hence ``Dense``), on JAX ``mean`` (hence ``MeanSquaredError``). A float64 model's loss
    is then float32-accurate. While the context is open the table ``result_type`` reads maps
    float64 to itself, as on TensorFlow; on JAX only with ``jax_enable_x64`` (else there is
    no float64), and there it must be open while a function is traced. The table is
    process-wide: Keras ops on other threads keep float64 too while a context is open.
    """
    global _float64_depth, _float64_saved
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            yield
            return
    try:
        from keras.src.backend.common import dtypes  # the table `result_type` reads on every call
    except ImportError:  # a Keras laid out otherwise
        dtypes = None
    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if not isinstance(table, dict) or "float64" not in table:  # a Keras that no longer demotes
        yield
        return
    with _float64_lock:
        if _float64_depth == 0:
            _float64_saved = table["float64"]
            table["float64"] = "float64"
        _float64_depth += 1
    try:
        yield
    finally:
        with _float64_lock:
            _float64_depth -= 1
            if _float64_depth == 0:
                table["float64"] = _float64_saved


def _check(name, value, low, high, *, high_open=False):
    """Raise a clear ``ValueError`` unless ``low <= value <= high`` (``< high`` when ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    if not (low <= value and (value < high if high_open else value <= high)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def _check_row_axis(row_axis):
    """``None`` (the default rule), an int, or a callable ``variable -> int``."""
    if row_axis is None or callable(row_axis):
        return row_axis
    if isinstance(row_axis, bool) or not isinstance(row_axis, numbers.Integral):
        raise ValueError(f"`row_axis` must be None, an int or a callable `variable -> int`, got {row_axis!r}")
    return int(row_axis)


def _path(variable):
    """A variable's path (``"model/dense/kernel"``), or its name when it has none."""
    return getattr(variable, "path", None) or str(variable.name)


#: Names of the variables whose outputs are on the last axis: a ``Dense``/``Conv``/``EinsumDense``
#: kernel, and the LoRA factors ``enable_lora`` adds to them (``(in, rank)`` and ``(rank, out)``).
KERNEL_NAMES = ("kernel", "lora_kernel_a", "lora_kernel_b")


def default_row_axis(variable) -> int:
    """The row axis of ``variable`` when ``row_axis=None``: -1 for a kernel of 2 axes or more, else 0.

    A row is an output unit (ALGORITHMS.md §1). Keras keeps a ``Dense`` kernel as
    ``(in, out)`` and a ``Conv2D`` kernel as ``(kh, kw, in, out)``: their outputs are on the
    last axis. A variable whose name (or its path's last component) is one of
    `KERNEL_NAMES` takes axis -1; embeddings ``(num, dim)``, biases and everything else
    axis 0, as in PyTorch's layout.
    """
    names = {str(variable.name).split(":")[0], _path(variable).rsplit("/", 1)[-1]}
    return -1 if len(variable.shape) >= 2 and names & set(KERNEL_NAMES) else 0


def _is_real_floating(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype.startswith("float") or dtype == "bfloat16"


def _is_empty(variable):
    return any(d == 0 for d in variable.shape)


def _outside_trace():
    """``tf.init_scope()`` on TensorFlow, else nothing.

    Keras's TensorFlow trainer builds the optimizer inside the traced train step. A
    variable created there whose initial value reads a model variable cannot be
    lifted out of the graph (the value is captured as a graph input once it has more
    than 128 entries), and ``jit_compile=True`` requires the lift. Created in the
    init scope, it is an ordinary eager variable, initialised at once.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()


def _copy_initializer(variable):
    """An initializer whose value is a copy of ``variable`` now (its own buffer, never an alias)."""

    def initializer(shape, dtype=None):
        return ops.copy(ops.cast(ops.convert_to_tensor(variable), dtype))

    return initializer


def _same_path(saved, path):
    """Whether a variable's ``path`` is the ``saved`` one, up to the model's name scope.

    Keras puts a model's name in front of its variables' paths when it builds the model
    (``net/head/kernel``), not when ``load_model`` rebuilds it (``head/kernel``): a path
    matches a saved one that ends with it, if it has a layer and a variable name at least.
    """
    if saved == path:
        return True
    shorter, longer = sorted((saved, path), key=len)
    return "/" in shorter and longer.endswith("/" + shorter)


def _listing(paths, limit=8):
    shown = ", ".join(f"`{p}`" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
