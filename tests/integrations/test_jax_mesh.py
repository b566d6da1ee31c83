"""A whole train step under ``jax.jit`` with ``in_shardings``/``out_shardings`` on a 2-D mesh.

``tests/jax/test_jax_sharding.py`` steps ``jit(tx.update)`` on a 1-D mesh; here the parameters
are split over a ``data × model`` mesh of 4 host CPU devices (both axes of one kernel, the
inputs of another: its per-unit MARS sums cross devices), the batch over ``data``, and the
loss, gradient and update run in one jitted step whose state shardings are declared
(docs/integrations.md's snippet, as written). In float64: the sharded run equals the
unsharded one to 1e-12. Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from integration_docs import snippet

from tether.adapters import jax as tj

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason=f"needs 4 devices, {jax.device_count()} visible: set "
    "XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts (nox -s integrations does)",
)
STEPS = 4
# sgd_ftp and the ftp/spd wrappers are stepped on a 1-D mesh in tests/jax/test_jax_sharding.py
TRANSFORMS = {
    "adam_ftp": lambda: tj.adam_ftp(
        1e-2, weight_decay=0.05, mask={"fc": True, "out": {"kernel": True, "bias": False}}
    ),
    "adam_spd": lambda: tj.adam_spd(1e-2, weight_decay=1.0),
    "l2_sp + adam": lambda: optax.chain(tj.l2_sp(0.1), optax.adam(1e-2)),
    "mars_sp(adam)": lambda: tj.mars_sp(optax.adam(1e-2), radius=0.05),
}


def pretrained():
    """flax's names and layout (a ``kernel`` is ``(in, out)``), in float64."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "fc": {"kernel": jax.random.normal(k1, (8, 16)) / 3, "bias": jnp.full(16, 0.1)},
        "out": {"kernel": jax.random.normal(k2, (16, 4)) / 4, "bias": jnp.zeros(4)},
    }
    return jax.tree.map(lambda x: x.astype(jnp.float64), params)


def loss_fn(params, batch):
    inputs, labels = batch
    hidden = jax.nn.relu(inputs @ params["fc"]["kernel"] + params["fc"]["bias"])
    logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batches():
    inputs = jax.random.normal(jax.random.key(1), (32 * STEPS, 8), dtype=jnp.float64)
    labels = jnp.argmax(inputs[:, :4], axis=1)
    return [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, 32 * STEPS, 32)]


def unsharded(tx, params, data):
    @jax.jit
    def train_step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for batch in data:
        params, opt_state = train_step(params, opt_state, batch)
    return params, opt_state


def leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def assert_close(got, expected):
    for (path, a), (_, b) in zip(leaves(got), leaves(expected), strict=True):
        if isinstance(a, optax.MaskedNode):
            assert isinstance(b, optax.MaskedNode), path
            continue
        assert a.dtype == b.dtype, path
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=jax.tree_util.keystr(path))


def assert_sharded_as_params(state, params, shardings):
    """Every state entry of a parameter's shape, under that parameter's key, has its sharding."""
    by_key = {jax.tree_util.keystr(p): (s, _at(params, p).shape) for p, s in leaves(shardings)}
    checked = 0
    for path, leaf in leaves(state):
        if isinstance(leaf, optax.MaskedNode):
            continue
        name = jax.tree_util.keystr(path)
        key = next((k for k in by_key if name.endswith(k)), None)
        if key is not None and leaf.shape == by_key[key][1]:
            assert leaf.sharding.is_equivalent_to(by_key[key][0], leaf.ndim), name
            checked += 1
    return checked


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_sharded_train_step_equals_the_unsharded_one(name):
    with jax.enable_x64(True):
        data = batches()
        ns = {"params": pretrained(), "tx": TRANSFORMS[name](), "loss_fn": loss_fn, "data": data}
        exec(snippet("jax-mesh"), ns)
        params, opt_state = unsharded(TRANSFORMS[name](), pretrained(), data)
        assert_close(ns["params"], params)
        assert_close(ns["opt_state"], opt_state)
        assert assert_sharded_as_params(ns["params"], ns["params"], ns["param_shardings"]) == 4
        # the anchors, moments and FTP's previous displacement: at least 2 entries per parameter
        assert assert_sharded_as_params(ns["opt_state"], ns["params"], ns["param_shardings"]) >= 8
        if name == "adam_ftp":
            displacement = ns["opt_state"].projection.prev_displacement["fc"]["kernel"]
            assert displacement.sharding.spec == ns["param_shardings"]["fc"]["kernel"].spec


def test_tpgm_on_sharded_parameters_equals_unsharded():
    with jax.enable_x64(True):
        ns = {"params": pretrained(), "tx": tj.adam_spd(1e-2), "loss_fn": loss_fn, "data": []}
        exec(snippet("jax-mesh"), ns)  # the mesh and the shardings; no step
        sharded = ns["params"]
        fine_tuned = jax.tree.map(lambda x: 1.5 * x + 0.1, pretrained())
        validation = batches()[:2]
        results = []
        for params, tuned in (
            (sharded, jax.device_put(fine_tuned, ns["param_shardings"])),
            (pretrained(), fine_tuned),
        ):
            state = tj.tpgm_init(
                params, norm="mars", mask={"fc": True, "out": {"kernel": True, "bias": False}}
            )
            tuned, state = tj.tpgm_step(loss_fn, tuned, state, itertools.cycle(validation), lr=1e-2, iters=3)
            results.append((tuned, state))
        (got, got_state), (expected, expected_state) = results
        assert_close(got, expected)
        assert_close(got_state, expected_state)
        assert assert_sharded_as_params(got_state.anchor, sharded, ns["param_shardings"]) == 3
        assert assert_sharded_as_params(got, sharded, ns["param_shardings"]) == 4
