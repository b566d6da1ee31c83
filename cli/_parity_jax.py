"""`tether parity` driver for JAX: `tether.adapters.jax` (optax) on every platform JAX sees."""

import jax

jax.config.update("jax_enable_x64", True)

import itertools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tether.adapters import jax as tj  # noqa: E402

from ._parity_cases import MLP, MODEL_KINDS, SameModel, finetuning_steps, full_hparams  # noqa: E402

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
    if case.wrapper in ("l2sp", "marssp"):
        if h["dampening"] or h["weight_decay"]:
            raise ValueError(
                "the l2sp and marssp parity cases take optax.sgd as it is (no dampening, no decay)"
            )
        sgd = optax.sgd(h["lr"], momentum=h["momentum"] or None, nesterov=h["nesterov"])
        if case.wrapper == "l2sp":  # L2-SP's gradient term, then the optimizer
            return optax.chain(tj.l2_sp(h["alpha"], anchor=case.anchor, mask=mask), sgd)
        return tj.mars_sp(sgd, radius=h["radius"], anchor=case.anchor, mask=mask)
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


class _FlaxLayout:
    """`SameModel`'s weights as flax keeps them: `{"params": {layer: {"kernel", "bias"}}}`, channels last."""

    @staticmethod
    def tree(fn):
        """The params tree with `fn(name)` at each leaf (`name` in PyTorch's naming)."""
        return {
            "params": {
                layer: {"kernel": fn(f"{layer}.weight"), "bias": fn(f"{layer}.bias")} for layer in _LAYERS
            }
        }

    @staticmethod
    def to_flax(named, dtype):
        """PyTorch-layout arrays by name → the flax params tree."""
        return _FlaxLayout.tree(
            lambda n: jnp.asarray(SameModel.to_channels_last(n, np.asarray(named[n])), dtype=dtype)
        )

    @staticmethod
    def to_torch(params):
        """The flax params tree → PyTorch-layout float64 arrays by name."""
        out = {}
        for layer in _LAYERS:
            for key, kind in (("kernel", "weight"), ("bias", "bias")):
                name = f"{layer}.{kind}"
                value = np.asarray(params["params"][layer][key], dtype=np.float64)
                out[name] = SameModel.from_channels_last(name, value)
        return out


def _run_same_model(case, problem, dtype):
    """The case on `SameModel` built with flax, in flax's layout; the trajectory in PyTorch's."""
    try:
        network = _flax_network(dtype)
    except ImportError:
        return None  # flax is not installed: nothing to build the model with

    params = _FlaxLayout.to_flax(problem.theta0, dtype)
    mask = _FlaxLayout.tree(lambda n: n not in case.unanchored)
    x = jnp.asarray(SameModel.to_channels_last("x", problem.x), dtype=dtype)
    y = jnp.asarray(problem.y, dtype=dtype)

    def loss(p, batch=None):
        return jnp.mean((network.apply(p, x) - y) ** 2)

    if case.kind in MODEL_KINDS:
        return _beside_finetuning(
            case, problem, params, mask, loss, _FlaxLayout.to_flax, _FlaxLayout.to_torch
        )
    tx = build(case, list(problem.theta0), mask=mask)
    grad_fn = jax.jit(jax.grad(loss))
    update = jax.jit(tx.update)
    state = tx.init(params)
    trajectory = {n: [] for n in problem.theta0}
    for _ in range(problem.steps):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        for name, value in _FlaxLayout.to_torch(params).items():
            trajectory[name].append(value)
    return {n: np.stack(v) for n, v in trajectory.items()}


def _beside_finetuning(case, problem, params, mask, loss, to_params, to_named):
    """TPGM calls (`tj.tpgm_step`) or WiSE-FT mixes (`tj.wise_ft`) after fixed fine-tuning steps.

    `to_params(named, dtype)` and `to_named(params)` convert between the problem's PyTorch-layout
    arrays by name and the params tree; `loss(params, batch)` ignores the batch (one fixed batch).
    """
    dtype = jax.tree.leaves(params)[0].dtype
    anchor = params
    h = case.hparams
    state = tj.tpgm_init(params, norm=h["norm"], mask=mask) if case.kind == "tpgm" else None
    batches = itertools.repeat(None)
    trajectory = {n: [] for n in problem.theta0}
    for delta in finetuning_steps(problem):
        params = jax.tree.map(jnp.add, params, to_params(delta, dtype))
        if state is not None:
            params, state = tj.tpgm_step(loss, params, state, batches, lr=h["lr"], iters=h["iters"])
            shown = params
        else:
            shown = tj.wise_ft(anchor, params, h["alpha"])
        for name, value in to_named(shown).items():
            trajectory[name].append(value)
    return {n: np.stack(v) for n, v in trajectory.items()}


def run(case, problem, dtype, device):
    if case.epsilon_hat:
        return None  # Keras's Adam: optax.adam adds ε after the bias correction
    dev = jax.devices(device)[0]
    if isinstance(problem, SameModel):
        with jax.default_device(dev):
            return _run_same_model(case, problem, dtype)
    with jax.default_device(dev):
        params = {n: jnp.asarray(v, dtype=dtype) for n, v in problem.theta0.items()}
        if case.kind in MODEL_KINDS:  # only on the MLP: the reference marks the closed loop n/a
            x, y = jnp.asarray(problem.x, dtype=dtype), jnp.asarray(problem.y, dtype=dtype)
            return _beside_finetuning(
                case,
                problem,
                params,
                {n: n not in case.unanchored for n in params},
                lambda p, batch=None: _mlp_loss(p, x, y),
                lambda named, dt: {n: jnp.asarray(v, dtype=dt) for n, v in named.items()},
                lambda p: {n: np.asarray(v, dtype=np.float64) for n, v in p.items()},
            )
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
