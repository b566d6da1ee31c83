"""PyTorch's layout ⇄ the channels-last layout of flax and Keras, for `tether robustness`'s networks.

The orchestrator speaks PyTorch's layout (NCHW images, `(out, in, kh, kw)` convolutions,
`(out, in)` linear weights named ``linear1.weight``); flax and Keras keep NHWC images with
`(kh, kw, in, out)` and `(in, out)` kernels. A linear layer fed by a flattened feature map also
has its input dimension in another order: PyTorch flattens `(c, h, w)`, an NHWC network
`(h, w, c)`. Both conversions are exact.
"""

import numpy as np

#: The `(channels, height, width)` of the activations that each network flattens into a linear layer.
FLATTENED = {"lenet5": {"linear1": (64, 7, 7)}}


def channels_last(weights, architecture="lenet5"):
    """PyTorch-layout weights (``{"conv1.weight": ...}``) as ``{layer: {"kernel": ..., "bias": ...}}``."""
    flattened = FLATTENED[architecture]
    layers = {}
    for name, value in weights.items():
        layer, kind = name.rsplit(".", 1)
        value = np.asarray(value, dtype=np.float32)
        if kind == "bias":
            layers.setdefault(layer, {})["bias"] = value.copy()
            continue
        if value.ndim == 4:
            kernel = value.transpose(2, 3, 1, 0)
        elif layer in flattened:
            c, h, w = flattened[layer]
            kernel = value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
        else:
            kernel = value.T
        layers.setdefault(layer, {})["kernel"] = np.ascontiguousarray(kernel)
    return layers


def channels_first(layers, architecture="lenet5"):
    """`channels_last`'s inverse: PyTorch-layout NumPy weights by name."""
    flattened = FLATTENED[architecture]
    weights = {}
    for layer, leaves in layers.items():
        kernel = np.asarray(leaves["kernel"])
        if kernel.ndim == 4:
            weight = kernel.transpose(3, 2, 0, 1)
        elif layer in flattened:
            c, h, w = flattened[layer]
            weight = kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
        else:
            weight = kernel.T
        weights[f"{layer}.weight"] = np.ascontiguousarray(weight, dtype=np.float32)
        weights[f"{layer}.bias"] = np.array(leaves["bias"], dtype=np.float32)
    return weights


def nhwc(x):
    """NCHW images as NHWC."""
    return np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1)))
