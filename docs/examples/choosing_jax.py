"""Every method of tether.adapters.jax on one small model: fine-tune, then measure the drift."""

import itertools

import jax
import jax.numpy as jnp
import optax

from tether.adapters.jax import (
    adam_ftp,
    adam_spd,
    ftp,
    l2_sp,
    mars_sp,
    sgd_ftp,
    spd,
    tpgm_init,
    tpgm_step,
    wise_ft,
)

data, val = jax.random.split(jax.random.key(0))
x, y = jax.random.normal(data, (256, 8)), jax.random.randint(data, (256,), 0, 3)
x_val, y_val = jax.random.normal(val, (64, 8)), jax.random.randint(val, (64,), 0, 3)


def pretrained():
    """Stands for a pre-trained backbone and a new head (flax's names: `kernel` is `(in, out)`, whose
    rows, the output units, the adapters find on the last axis)."""
    backbone, head = jax.random.split(jax.random.key(1))
    return {
        "backbone": {"kernel": jax.random.normal(backbone, (8, 32)) / 8**0.5, "bias": jnp.zeros(32)},
        "head": {"kernel": jax.random.normal(head, (32, 3)) / 32**0.5, "bias": jnp.zeros(3)},
    }


def loss_fn(params, batch):
    inputs, labels = batch
    hidden = jax.nn.relu(inputs @ params["backbone"]["kernel"] + params["backbone"]["bias"])
    logits = hidden @ params["head"]["kernel"] + params["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


#: The backbone anchored at its pre-trained weights, the new head free (a prefix of the params' tree).
BACKBONE = {"backbone": True, "head": False}

METHODS = {
    "adamw": optax.adamw(1e-2, weight_decay=1e-2),  # PyTorch's AdamW default decay
    "adam_ftp": adam_ftp(1e-2, mask=BACKBONE),  # k=1: the paper's default
    "sgd_ftp": sgd_ftp(1e-1, momentum=0.9, mask=BACKBONE),
    "adam_spd": adam_spd(1e-2, weight_decay=1.0, mask=BACKBONE),  # λ, not scaled by lr
    "ftp(adamw)": ftp(optax.adamw(1e-2, weight_decay=1e-2), mask=BACKBONE),
    "spd(adam)": spd(optax.adam(1e-2), weight_decay=1.0, mask=BACKBONE),
    "l2_sp + adam": optax.chain(l2_sp(0.1, mask=BACKBONE), optax.adam(1e-2)),
    "mars_sp(adam)": mars_sp(optax.adam(1e-2), radius=2.0, mask=BACKBONE),
}


def finetune(params, tx, steps=100, tpgm=None, every=20):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params, (x, y))
        updates, state = tx.update(grads, state, params)  # tether's transformations need params
        return optax.apply_updates(params, updates), state

    state = tx.init(params)  # anchors: the parameters given to init
    batches = itertools.cycle([(x_val, y_val)])
    for i in range(steps):
        params, state = step(params, state)
        if tpgm is not None and (i + 1) % every == 0:  # TPGM every `every` steps: the ResNet recipe
            params, tpgm = tpgm_step(loss_fn, params, tpgm, batches, lr=1e-2, iters=5)
    return params


def drift(params, anchor):
    leaves = jax.tree.leaves(jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), params, anchor)["backbone"])
    return float(jnp.sqrt(sum(leaves)))


results = {"pretrained": (float(loss_fn(pretrained(), (x, y))), 0.0)}
for name, tx in METHODS.items():
    anchor = pretrained()
    params = finetune(anchor, tx)
    results[name] = (float(loss_fn(params, (x, y))), drift(params, anchor))

anchor = pretrained()
tpgm = tpgm_init(anchor, norm="mars", mask=BACKBONE)  # the head has no constraint
params = finetune(anchor, METHODS["adamw"], tpgm=tpgm)
results["adamw + tpgm"] = (float(loss_fn(params, (x, y))), drift(params, anchor))

anchor = pretrained()
params = wise_ft(anchor, finetune(anchor, METHODS["adamw"]), alpha=0.5)  # halfway between the two
results["wise_ft (α=0.5)"] = (float(loss_fn(params, (x, y))), drift(params, anchor))

for name, (loss, distance) in results.items():
    print(f"{name:16s} train loss {loss:.3f}   ‖θ − θ₀‖ of the backbone {distance:.3f}")
