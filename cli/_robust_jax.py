"""`tether robustness` on JAX: LeNet-5 from `flax.linen`, `tether.adapters.jax`'s methods.

The orchestrator speaks PyTorch's layout; flax's is channels-last. `to_flax` and `to_torch`
convert the weights exactly, both ways (`_robust_layout`), so that every method starts from the
same pre-trained network and `‖θ − θ₀‖` is measured the same.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tether.adapters.jax import adam_ftp, adam_spd, l2_sp, mars_sp, tpgm_init, tpgm_step

from ._robust_layout import channels_first, channels_last

#: PyTorch's AdamW defaults (optax's `adamw` decays by 1e-4 unless told).
ADAMW_WEIGHT_DECAY, EPS = 1e-2, 1e-8
#: Examples per call of the jitted forward pass in `predict`.
PREDICT_BATCH = 1000


class LeNet5(nn.Module):
    """advertorch's LeNet-5 (`advertorch.test_utils.LeNet5`) in flax: NHWC in, logits out."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3), padding=1, name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3), padding=1, name="conv2")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(200, name="linear1")(x.reshape(x.shape[0], -1)))  # flattens (h, w, c)
        return nn.Dense(10, name="linear2")(x)


ARCHITECTURES = {"lenet5": LeNet5}


def to_flax(weights, architecture="lenet5"):
    """PyTorch-layout weights as flax params (``{"conv1": {"kernel": ...}}``): `channels_last`."""
    return jax.tree.map(jnp.asarray, channels_last(weights, architecture))


def to_torch(params, architecture="lenet5"):
    """Flax params as PyTorch-layout NumPy weights: `to_flax`'s inverse."""
    return channels_first(params, architecture)


def _nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


class JaxBackend:
    """Builds the task's network with its pre-trained weights and runs each method's training loop."""

    name = "jax"

    def __init__(self, task):
        self.task = task
        self.net = ARCHITECTURES[task.architecture]()
        self.x, self.y = np.asarray(task.train[0], np.float32), np.asarray(task.train[1], np.int32)
        self.val_x, self.val_y = np.asarray(task.val[0], np.float32), np.asarray(task.val[1], np.int32)
        self._steps = {}
        # one object for every TPGM call: tpgm_step compiles once per loss function
        self._validation_loss = lambda params, batch: self.loss(params, *batch)
        self._predict = jax.jit(
            lambda params, x: jnp.argmax(self.net.apply({"params": params}, _nhwc(x)), -1)
        )

    def params(self, weights):
        return to_flax(weights, self.task.architecture)

    def weights(self, params):
        return to_torch(params, self.task.architecture)

    def loss(self, params, x, y):
        """The mean cross-entropy of a batch (NCHW ``x``, integer ``y``), as PyTorch's."""
        logits = self.net.apply({"params": params}, _nhwc(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def _head_labels(self, params):
        """``"head"`` for the tensors of `task.head` (PyTorch names), ``"body"`` for the others."""
        torch_name = {"kernel": "weight", "bias": "bias"}
        return {
            layer: {k: "head" if f"{layer}.{torch_name[k]}" in self.task.head else "body" for k in leaves}
            for layer, leaves in params.items()
        }

    def optimizer(self, method, lr, hparams, params=None):
        if method == "adamw":
            return optax.adamw(lr, eps=EPS, weight_decay=ADAMW_WEIGHT_DECAY)
        if method == "l2sp":
            return optax.chain(l2_sp(hparams["alpha"]), optax.adam(lr, eps=EPS))
        if method == "marssp":
            return mars_sp(optax.adam(lr, eps=EPS), radius=hparams["radius"])
        if method == "ftp":
            return adam_ftp(lr, eps=EPS)
        if method == "spd":
            return adam_spd(lr, eps=EPS, weight_decay=hparams["weight_decay"])
        if method == "probe":  # lpft's first stage: Adam on the head, the rest frozen
            return optax.multi_transform(
                {"head": optax.adam(lr, eps=EPS), "body": optax.set_to_zero()}, self._head_labels(params)
            )
        raise ValueError(f"no optimizer for {method!r}")

    def _step(self, key, tx):
        """The jitted train step of one method (grad, update, apply), compiled once per key."""
        if key not in self._steps:

            def step(params, state, x, y):
                grads = jax.grad(self.loss)(params, x, y)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            self._steps[key] = jax.jit(step, donate_argnums=(0, 1))
        return self._steps[key]

    def finetune(self, method, lr, hparams, order, seed, on_step=None):
        """Fine-tune a fresh pre-trained network on the ID train split, batch by batch as `order` says.

        Nothing here is random but the data order, which `order` fixes: `seed` is unused.
        """
        del seed
        params = self.params(self.task.weights)
        if method == "lpft":  # a linear probe for half the budget, then everything from there
            stages = [("probe", order[: len(order) // 2]), ("adamw", order[len(order) // 2 :])]
        else:
            stages = [(method, order)]
        for stage, batches in stages:
            tx = self.optimizer(stage, lr, hparams, params)
            state = tx.init(params)
            # the hyperparameters are constants of the step: one compilation per (method, values)
            step = self._step((stage, lr, tuple(sorted(hparams.items()))), tx)
            for idx in batches:
                params, state = step(params, state, self.x[idx], self.y[idx])
                if on_step is not None:
                    on_step()
        return self.weights(params)

    def tpgm(self, weights, lr, order):
        """One TPGM call at the end of fine-tuning (the ViT recipe) on the ID validation split."""
        state = tpgm_init(self.params(self.task.weights), norm="mars")  # anchors: the pre-trained weights
        batches = ((self.val_x[idx], self.val_y[idx]) for idx in order)
        params, _ = tpgm_step(
            self._validation_loss, self.params(weights), state, batches, lr=lr, iters=len(order)
        )
        return self.weights(params)

    def predict(self, weights, x):
        params = self.params(weights)
        x = np.asarray(x, np.float32)
        return np.concatenate(
            [
                np.asarray(self._predict(params, x[i : i + PREDICT_BATCH]))
                for i in range(0, len(x), PREDICT_BATCH)
            ]
        )
