"""`tether robustness` on Keras 3 (the backend `KERAS_BACKEND` names): LeNet-5 from Keras layers.

The weights are converted to Keras's channels-last layout (`_robust_layout`), exactly as for
flax; every method is `tether.adapters.keras`'s, trained with `train_on_batch` in the
orchestrator's data order.
"""

import keras
import numpy as np

from tether.adapters.keras import L2SP, MARSSP, TPGM, AdamFTP, AdamSPD

from ._robust_layout import channels_first, channels_last, nhwc

#: PyTorch's AdamW defaults (and Adam's epsilon; Keras places it slightly differently).
ADAMW_WEIGHT_DECAY, EPS = 1e-2, 1e-8
PREDICT_BATCH = 1000
LAYERS = ("conv1", "conv2", "linear1", "linear2")


def lenet5():
    """advertorch's LeNet-5 (`advertorch.test_utils.LeNet5`) in Keras: NHWC in, logits out."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2),
            layers.Flatten(),  # (h, w, c), the order `channels_last` gives linear1's kernel
            layers.Dense(200, activation="relu", name="linear1"),
            layers.Dense(10, name="linear2"),
        ]
    )


ARCHITECTURES = {"lenet5": lenet5}


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class KerasBackend:
    """Builds the task's network with its pre-trained weights and runs each method's training loop."""

    name = "keras"

    def __init__(self, task):
        self.task = task
        self.x, self.y = nhwc(task.train[0]), np.asarray(task.train[1], np.int32)
        self.val_x, self.val_y = nhwc(task.val[0]), np.asarray(task.val[1], np.int32)

    def model(self, weights):
        model = ARCHITECTURES[self.task.architecture]()
        self.assign(model, weights)
        return model

    def assign(self, model, weights):
        for layer, leaves in channels_last(weights, self.task.architecture).items():
            model.get_layer(layer).set_weights([leaves["kernel"], leaves["bias"]])

    def weights(self, model):
        layers = {}
        for layer in LAYERS:
            kernel, bias = model.get_layer(layer).get_weights()
            layers[layer] = {"kernel": kernel, "bias": bias}
        return channels_first(layers, self.task.architecture)

    def optimizer(self, method, lr, hparams):
        if method == "adamw":
            return keras.optimizers.AdamW(lr, weight_decay=ADAMW_WEIGHT_DECAY, epsilon=EPS)
        if method == "l2sp":
            return L2SP(keras.optimizers.Adam(lr, epsilon=EPS), alpha=hparams["alpha"])
        if method == "marssp":
            return MARSSP(keras.optimizers.Adam(lr, epsilon=EPS), radius=hparams["radius"])
        if method == "ftp":
            return AdamFTP(lr)
        if method == "spd":
            return AdamSPD(lr, weight_decay=hparams["weight_decay"])
        raise ValueError(f"no optimizer for {method!r}")

    def finetune(self, method, lr, hparams, order, seed, on_step=None):
        """Fine-tune a fresh pre-trained network on the ID train split, batch by batch as `order` says."""
        keras.utils.set_random_seed(seed)
        model = self.model(self.task.weights)
        if method == "lpft":  # a linear probe for half the budget, then everything from there
            head = {name.split(".")[0] for name in self.task.head}
            for layer in model.layers:
                layer.trainable = layer.name in head
            stages = [(keras.optimizers.Adam(lr, epsilon=EPS), order[: len(order) // 2], True)]
            stages.append((self.optimizer("adamw", lr, hparams), order[len(order) // 2 :], False))
        else:
            stages = [(self.optimizer(method, lr, hparams), order, False)]
        for optimizer, batches, probe in stages:
            if not probe:
                for layer in model.layers:
                    layer.trainable = True
            model.compile(optimizer=optimizer, loss=_loss())
            for idx in batches:
                model.train_on_batch(self.x[idx], self.y[idx])
                if on_step is not None:
                    on_step()
        return self.weights(model)

    def tpgm(self, weights, lr, order):
        """One TPGM call at the end of fine-tuning (the ViT recipe) on the ID validation split."""
        model = self.model(self.task.weights)
        tpgm = TPGM(model, norm="mars", learning_rate=lr)  # anchors: the pre-trained weights
        self.assign(model, weights)
        batches = [(self.val_x[idx], self.val_y[idx]) for idx in order]
        tpgm.step(batches, iters=len(batches), loss=_loss())
        return self.weights(model)

    def predict(self, weights, x):
        model = self.model(weights)
        logits = model.predict(nhwc(x), batch_size=PREDICT_BATCH, verbose=0)
        return np.argmax(logits, axis=-1)
