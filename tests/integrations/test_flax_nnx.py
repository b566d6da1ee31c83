"""flax NNX: docs/jax.md's `nnx.Optimizer` example as written, and orbax's save and restore."""

import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from integration_docs import section_blocks, snippet

from tether.adapters.jax import adam_ftp

STEPS = 8


class MLP(nnx.Module):
    """Stands for the pre-trained ViT of the example: nnx.Linear kernels are (in, out)."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc(x)))


def load_pretrained_vit():
    return MLP(nnx.Rngs(0))


def loss_fn(model, batch):
    inputs, labels = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), labels).mean()


def batches():
    inputs = jax.random.normal(jax.random.key(1), (16 * STEPS, 8))
    labels = jnp.argmax(inputs[:, :3], axis=1)
    return [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 16 * STEPS, 16)]


def jax_md_example(data):
    """Run docs/jax.md's Flax NNX block with these stand-ins; its names come back."""
    (code,) = section_blocks("jax.md", "## Flax NNX")
    namespace = {"load_pretrained_vit": load_pretrained_vit, "loss_fn": loss_fn, "data": data}
    exec(code, namespace)
    return namespace


def params_of(model):
    return nnx.state(model, nnx.Param)


def test_the_nnx_example_of_the_jax_page_equals_a_plain_optax_loop():
    ns = jax_md_example(batches())
    model, optimizer = ns["model"], ns["optimizer"]
    # the same steps on the parameters' pytree, with adam_ftp's own init and update
    start = params_of(load_pretrained_vit())
    tx = adam_ftp(1e-4, weight_decay=0.05)
    graphdef = nnx.graphdef(model)

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = start, tx.init(start)
    for batch in batches():
        params, state = step(params, state, batch)
    got = params_of(model)
    for path, leaf in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_allclose(leaf, _at(params, path), rtol=1e-6, atol=1e-9, err_msg=str(path))
        assert not np.array_equal(leaf, _at(start, path)), path  # every tensor moved
    opt_state = optimizer.opt_state
    assert int(opt_state.count[...]) == STEPS
    for path, leaf in jax.tree_util.tree_leaves_with_path(start):
        # the anchor is the weights nnx.Optimizer(...) saw; a kernel's rows are its output units
        np.testing.assert_array_equal(_at(opt_state.anchor, path), leaf, err_msg=str(path))
        inv_norm = _at(opt_state.projection.prev_inv_norm, path)
        assert inv_norm.shape == ((1, leaf.shape[-1]) if leaf.ndim == 2 else (1,)), path


def _at(tree, path):
    """The leaf of ``tree`` at a key path of another tree of the same structure (NNX's end in ``.value``)."""
    for key in path:
        if isinstance(tree, nnx.Variable):
            return tree[...]
        if isinstance(tree, jax.Array):
            return tree
        tree = getattr(tree, key.name) if isinstance(key, jax.tree_util.GetAttrKey) else tree[key.key]
    return tree


def test_orbax_restores_the_optimizer_and_the_run_continues_exactly(tmp_path):
    data = batches()
    ns = jax_md_example(data[: STEPS // 2])
    exec(snippet("nnx-orbax-save"), {**ns, "workdir": tmp_path})
    for batch in data[STEPS // 2 :]:
        ns["train_step"](ns["model"], ns["optimizer"], batch)
    uninterrupted = nnx.state((ns["model"], ns["optimizer"]))

    fresh = jax_md_example([])  # built from the pre-trained weights, no step taken
    assert int(fresh["optimizer"].step[...]) == 0
    exec(snippet("nnx-orbax-restore"), {**fresh, "workdir": tmp_path})
    assert int(fresh["optimizer"].step[...]) == STEPS // 2
    for batch in data[STEPS // 2 :]:
        fresh["train_step"](fresh["model"], fresh["optimizer"], batch)
    resumed = nnx.state((fresh["model"], fresh["optimizer"]))
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    for (path, got), expected in zip(
        jax.tree_util.tree_leaves_with_path(resumed), jax.tree.leaves(uninterrupted), strict=True
    ):
        np.testing.assert_array_equal(got, expected, err_msg=str(path))
