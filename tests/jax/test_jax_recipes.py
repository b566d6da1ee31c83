"""The recipes each method needs: FTP anchors a LoRA adapter where it starts (`"init"`), and SPD's
base must not decay weights (SPD replaces weight decay)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tether.adapters import jax as tj

FTP = {
    "adam_ftp": lambda **kw: tj.adam_ftp(1e-2, **kw),
    "sgd_ftp": lambda **kw: tj.sgd_ftp(1e-2, momentum=0.9, **kw),
    "ftp": lambda **kw: tj.ftp(optax.adam(1e-2), **kw),
}


def _lora():
    """A frozen `W₀` (out=4, in=6) adapted by `B A` (rank 2): `A` random, `B` zero, as LoRA starts.

    In flax `nnx.LoRA`'s layout, outputs last: `lora_a` `(in, rank)`, `lora_b` `(rank, out)`
    (the default row axis of both is the last).
    """
    rng = np.random.default_rng(0)
    frozen = jnp.asarray(rng.standard_normal((4, 6)))
    params = {
        "lora_a": jnp.asarray(rng.standard_normal((2, 6)).T / np.sqrt(6)),
        "lora_b": jnp.zeros((2, 4)),
    }
    x = jnp.asarray(rng.standard_normal((32, 6)))
    y = x @ (frozen + jnp.asarray(rng.standard_normal((4, 2)) @ rng.standard_normal((2, 6)) * 0.3)).T

    def loss(p):
        return jnp.mean((x @ frozen.T + x @ p["lora_a"] @ p["lora_b"] - y) ** 2)

    return params, loss


def _train(tx, params, loss, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


@pytest.mark.parametrize("name", list(FTP))
def test_ftp_anchored_at_zero_warns_once_naming_the_tensors_that_are_not_zero(name):
    params, _ = _lora()
    params = {**params, "head": jnp.ones((3,))}
    with pytest.warns(UserWarning, match=r"anchor='zero'.*\['lora_a'\]") as record:
        FTP[name](anchor="zero", mask={"lora_a": True, "lora_b": True, "head": False}).init(params)
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "lora_b" not in messages[0] and "head" not in messages[0]  # zero, and unanchored


@pytest.mark.parametrize("name", list(FTP))
def test_no_warning_for_init_anchors_zero_tensors_traced_params_or_spd(name):
    params, _ = _lora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FTP[name](anchor="init").init(params)
        FTP[name](anchor="zero").init({"lora_b": params["lora_b"]})
        jax.jit(FTP[name](anchor="zero").init)(params)  # no host read of traced values
        tj.adam_spd(1e-2, weight_decay=0.1, anchor="zero").init(params)  # SPD's LoRA recipe
        tj.spd(optax.adam(1e-2), weight_decay=0.1, anchor="zero").init(params)


BASES = {"adam_ftp": optax.adam(1e-2), "sgd_ftp": optax.sgd(1e-2, momentum=0.9), "ftp": optax.adam(1e-2)}


@pytest.mark.parametrize("name", list(FTP))
def test_ftp_anchored_at_init_keeps_a_random_lora_a_near_its_init_and_learns(name):
    params, loss = _lora()

    def drift(trained):
        return np.linalg.norm(trained["lora_a"] - params["lora_a"]) / np.linalg.norm(params["lora_a"])

    trained = _train(FTP[name](anchor="init"), params, loss, 40)
    assert loss(trained) < 0.9 * loss(params)
    assert drift(trained) < 0.4
    assert drift(trained) < 0.5 * drift(_train(BASES[name], params, loss, 40))  # the base alone wanders off
    with pytest.warns(UserWarning, match="anchor='zero'"):
        wiped = _train(FTP[name](anchor="zero"), params, loss, 1)
    assert np.max(np.abs(wiped["lora_a"])) < 1e-6  # what the warning is about


# --- SPD's base must not decay weights -------------------------------------------------------------

PARAMS = {
    "w": jnp.asarray(np.random.default_rng(1).standard_normal((4, 3))),
    "b": jnp.asarray(np.random.default_rng(2).standard_normal((4,))),
}
WARMUP = optax.linear_schedule(0.0, 1e-3, 100)  # a learning rate of 0 at the first step

DECAYING = {
    "adamw": optax.adamw(1e-3, weight_decay=1e-2),
    "adamw-default-decay": optax.adamw(1e-3),
    "adamw-warmup-from-0": optax.adamw(WARMUP, weight_decay=1e-2),
    "inject_hyperparams(adamw)": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-2),
    "chain-clip-decay-sgd": optax.chain(
        optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.sgd(1e-2, momentum=0.9)
    ),
    "lamb": optax.lamb(1e-3, weight_decay=1e-2),
    "lion-default-decay": optax.lion(1e-4),
    "adafactor-decay": optax.adafactor(1e-3, weight_decay_rate=1e-3),
    "nadamw-default-decay": optax.nadamw(1e-3),
    "schedule-free-adamw-decay": optax.contrib.schedule_free_adamw(1e-3, weight_decay=1e-2),
    "muon-decay": optax.contrib.muon(1e-3, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", list(DECAYING))
def test_spd_rejects_a_base_that_decays_weights(name):
    with pytest.raises(ValueError, match=r"decays weights .*\['w'\].*Use optax\.adam, not optax\.adamw"):
        tj.spd(DECAYING[name], weight_decay=0.5).init(PARAMS)


def test_spd_catches_a_small_decay_of_float16_parameters():
    """`lr · wd · θ` = 1e-4 · 1e-2 · 1e-2 rounds to 0 in float16: the probe runs in float32."""
    params = {"w": jnp.full((4, 3), 1e-2, jnp.float16)}
    with pytest.raises(ValueError, match="decays weights"):
        tj.spd(optax.adamw(1e-4, weight_decay=1e-2), weight_decay=0.5).init(params)


NOT_DECAYING = {
    "adam": optax.adam(1e-3),
    "adam-eps-0": optax.adam(1e-3, eps=0.0),  # 0/0 = NaN on a zero gradient: not a decay
    "adamw-no-decay": optax.adamw(1e-3, weight_decay=0.0),
    "sgd-nesterov": optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "lion-no-decay": optax.lion(1e-4, weight_decay=0.0),
    "adafactor": optax.adafactor(1e-3),  # scales its update by θ's RMS: zero for a zero gradient
    "chain-clip-adam": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "adam-warmup-cosine": optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)),
    "inject_hyperparams(adam)": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "noisy_sgd": optax.noisy_sgd(1e-2, key=0),  # moves θ with a zero gradient, but not toward the origin
    "adamw-decaying-only-the-unanchored": optax.adamw(1e-3, weight_decay=1e-2, mask={"w": False, "b": True}),
    # its update is a difference of interpolations: rounding moves a few entries either way
    "schedule-free-adamw": optax.contrib.schedule_free_adamw(1e-3, weight_decay=0.0),
    "muon": optax.contrib.muon(1e-3),
}


@pytest.mark.parametrize("name", list(NOT_DECAYING))
def test_spd_accepts_a_base_that_does_not_decay_its_anchored_tensors(name):
    tx = tj.spd(NOT_DECAYING[name], weight_decay=0.5, mask={"w": True, "b": False})
    state = tx.init(PARAMS)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    assert all(np.all(np.isfinite(u)) or name == "adam-eps-0" for u in jax.tree.leaves(updates))


def test_spd_probes_only_concrete_parameters():
    """Under jit the parameters are traced: no probe (and no error) at init."""
    tx = tj.spd(optax.adamw(1e-3, weight_decay=1e-2), weight_decay=0.5)
    jax.jit(tx.init)(PARAMS)
    with pytest.raises(ValueError, match="decays weights"):
        tx.init(PARAMS)
