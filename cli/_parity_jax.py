"""`tether parity` driver for JAX: `tether.adapters.jax` (optax) on every platform JAX sees."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tether.adapters import jax as tj  # noqa: E402

from ._parity_cases import MLP, SameModel, full_hparams  # noqa: E402

FUSED = {"adam_ftp": tj.adam_ftp, "sgd_ftp": tj.sgd_ftp, "adam_spd": tj.adam_spd}


def build(case, names, mask=None):
    """The case's optax transformation (a wrapper around optax's own base, or a fused one).

    `mask` defaults to a dict by name: the tensors in `case.unanchored` are unanchored.
    """
    h = full_hparams(case)
    if mask is None:
        mask = {n: n not in case.unanchored for n in names}
    b1, b2 = h.get("betas", (0.9, 0.999))  # for the wrappers' optax bases
    if case.wrapper == "ftp" and case.kind == "adam_ftp":
        inner = optax.adamw(h["lr"], b1=b1, b2=b2, eps=h["eps"], weight_decay=h["weight_decay"])
        return tj.ftp(inner, k=h["k"], anchor=case.anchor, mask=mask)
    if case.wrapper == "ftp":
        inner = optax.chain(
            optax.add_decayed_weights(h["weight_decay"]) if h["weight_decay"] else optax.identity(),
            optax.sgd(h["lr"], momentum=h["momentum"] or None, nesterov=h["nesterov"]),
        )
        if h["dampening"]:
            raise ValueError("optax.sgd has no dampening")
        return tj.ftp(inner, k=h["k"], anchor=case.anchor, mask=mask)
    if case.wrapper == "spd":
        if h["amsgrad"]:
            raise ValueError("the spd(adam) parity case has no amsgrad form in optax")
        inner = optax.adam(h["lr"], b1=b1, b2=b2, eps=h["eps"])
        return tj.spd(inner, weight_decay=h["weight_decay"], anchor=case.anchor, mask=mask)
    # the fused transformations: PyTorch's names to optax's
    learning_rate = h.pop("lr")
    if "betas" in h:
        h["b1"], h["b2"] = h.pop("betas")
    return FUSED[case.kind](learning_rate, **h, anchor=case.anchor, mask=mask)


def _mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["fc.weight"].T + params["fc.bias"])
    out = hidden @ params["head.weight"].T + params["head.bias"]
    return jnp.mean((out - y) ** 2)


_LAYERS = ("conv", "fc", "head")


def _flax_network(dtype):
    """`SameModel` built from flax.linen layers (kernels `(kh, kw, in, out)` and `(in, out)`)."""
    import flax.linen as nn

    class Network(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = dict(dtype=dtype, param_dtype=dtype)
            conv = nn.Conv(4, (3, 3), padding="VALID", name="conv", **layer)(x)
            hidden = jnp.tanh(nn.Dense(8, name="fc", **layer)(jnp.tanh(conv).mean(axis=(1, 2))))
            return nn.Dense(3, name="head", **layer)(hidden)

    return Network()


def _run_same_model(case, problem, dtype):
    """The case on `SameModel` built with flax, in flax's layout; the trajectory in PyTorch's."""
    try:
        network = _flax_network(dtype)
    except ImportError:
        return None  # flax is not installed: nothing to build the model with

    def leaf(name):
        return jnp.asarray(SameModel.to_channels_last(name, problem.theta0[name]), dtype=dtype)

    def per_layer(fn):
        return {
            "params": {
                layer: {"kernel": fn(f"{layer}.weight"), "bias": fn(f"{layer}.bias")} for layer in _LAYERS
            }
        }

    params = per_layer(leaf)
    tx = build(case, list(problem.theta0), mask=per_layer(lambda n: n not in case.unanchored))
    x = jnp.asarray(SameModel.to_channels_last("x", problem.x), dtype=dtype)
    y = jnp.asarray(problem.y, dtype=dtype)
    grad_fn = jax.jit(jax.grad(lambda p: jnp.mean((network.apply(p, x) - y) ** 2)))
    update = jax.jit(tx.update)
    state = tx.init(params)
    trajectory = {n: [] for n in problem.theta0}
    for _ in range(problem.steps):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        for layer in _LAYERS:
            for key, kind in (("kernel", "weight"), ("bias", "bias")):
                name = f"{layer}.{kind}"
                value = np.asarray(params["params"][layer][key], dtype=np.float64)
                trajectory[name].append(SameModel.from_channels_last(name, value))
    return {n: np.stack(v) for n, v in trajectory.items()}


def run(case, problem, dtype, device):
    dev = jax.devices(device)[0]
    if isinstance(problem, SameModel):
        with jax.default_device(dev):
            return _run_same_model(case, problem, dtype)
    with jax.default_device(dev):
        params = {n: jnp.asarray(v, dtype=dtype) for n, v in problem.theta0.items()}
        tx = build(case, list(params))
        state = tx.init(params)
        update = jax.jit(tx.update)
        grad_fn = None
        if isinstance(problem, MLP):
            x, y = jnp.asarray(problem.x, dtype=dtype), jnp.asarray(problem.y, dtype=dtype)
            grad_fn = jax.jit(jax.grad(lambda p: _mlp_loss(p, x, y)))
        trajectory = {n: [] for n in params}
        for t in range(problem.steps):
            if grad_fn is not None:
                grads = grad_fn(params)
            else:
                grads = problem.gradients({n: np.asarray(p) for n, p in params.items()}, t)
                grads = {n: jnp.asarray(g, dtype=dtype) for n, g in grads.items()}
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            for n, p in params.items():
                trajectory[n].append(np.asarray(p, dtype=np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}
