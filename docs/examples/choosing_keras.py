"""Every method of tether.adapters.keras on one small model: fine-tune, then measure the drift.

Runs on any Keras 3 backend (set KERAS_BACKEND: tensorflow, jax or torch).
"""

import keras
import numpy as np

from tether.adapters import keras as tk

rng = np.random.default_rng(0)
x, y = rng.standard_normal((256, 8)).astype("float32"), rng.integers(0, 3, 256)
x_val, y_val = rng.standard_normal((64, 8)).astype("float32"), rng.integers(0, 3, 64)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def pretrained():
    """Stands for a pre-trained backbone and a new head (a Dense kernel is `(in, out)`: tether finds
    its rows, the output units, on the last axis)."""
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu", name="backbone"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    weights = np.random.default_rng(1)
    model.set_weights(
        [
            weights.standard_normal((8, 32)).astype("float32") / 8**0.5,
            np.zeros(32, "float32"),
            weights.standard_normal((32, 3)).astype("float32") / 32**0.5,
            np.zeros(3, "float32"),
        ]
    )
    return model


METHODS = {
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=1e-2),
    "adam_ftp": lambda: tk.AdamFTP(1e-2),  # k=1: the paper's default
    "sgd_ftp": lambda: tk.SGDFTP(1e-1, momentum=0.9),
    "adam_spd": lambda: tk.AdamSPD(1e-2, weight_decay=1.0),  # λ, not scaled by the learning rate
    "ftp(adamw)": lambda: tk.FTP(keras.optimizers.AdamW(1e-2, weight_decay=1e-2)),
    "spd(adam)": lambda: tk.SPD(keras.optimizers.Adam(1e-2), weight_decay=1.0),
    "l2sp(adam)": lambda: tk.L2SP(keras.optimizers.Adam(1e-2), alpha=0.1),
    "marssp(adam)": lambda: tk.MARSSP(keras.optimizers.Adam(1e-2), radius=2.0),
}


def finetune(model, optimizer, callbacks=()):
    """100 full-batch steps; the new head is free (the plain base step), the backbone anchored."""
    if hasattr(optimizer, "exclude_from_anchor"):
        optimizer.exclude_from_anchor(var_list=model.get_layer("head").trainable_variables)
    model.compile(optimizer=optimizer, loss=LOSS)
    steps = (np.tile(x, (100, 1)), np.tile(y, 100))  # one epoch of 100 batches, each the whole set
    model.fit(*steps, batch_size=256, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


def drift(model, anchor):
    backbone = model.get_layer("backbone").get_weights()
    return float(np.sqrt(sum(np.sum((w - a) ** 2) for w, a in zip(backbone, anchor))))


def report(model, anchor):
    return float(model.evaluate(x, y, batch_size=256, verbose=0)), drift(model, anchor)


start = pretrained()
anchor = start.get_layer("backbone").get_weights()
start.compile(loss=LOSS)
results = {"pretrained": report(start, anchor)}
for name, make in METHODS.items():
    results[name] = report(finetune(pretrained(), make()), anchor)

model = pretrained()
tpgm = tk.TPGM(model, norm="mars", exclude="head")  # the head has no constraint
every_20 = tk.TPGMCallback(tpgm, [(x_val, y_val)], every=20, iters=5, loss=LOSS)  # the ResNet recipe
results["adamw + tpgm"] = report(finetune(model, METHODS["adamw"](), [every_20]), anchor)

model = pretrained()
before = model.get_weights()
finetune(model, METHODS["adamw"]())
model.set_weights(tk.wise_ft(model, before, alpha=0.5))  # halfway between the two
results["wise_ft (α=0.5)"] = report(model, anchor)

for name, (loss, distance) in results.items():
    print(f"{name:16s} train loss {loss:.3f}   ‖θ − θ₀‖ of the backbone {distance:.3f}")
