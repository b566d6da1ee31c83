"""Steps on parameters sharded over 4 host CPU devices give the unsharded result.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the nox session
``tests-jax`` sets it); with fewer devices the test skips.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax_closed_loop import ZERO_ANCHOR_WARNING

from tether.adapters import jax as tj
from tether.core.reference import closed_loop_problem

pytestmark = [
    pytest.mark.skipif(
        jax.device_count() < 4,
        reason=f"needs 4 devices, {jax.device_count()} visible: set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts (nox -s tests-jax does)",
    ),
    pytest.mark.filterwarnings(ZERO_ANCHOR_WARNING),
]

SHAPES = {
    "fc.weight": (8, 12),
    "conv.weight": (4, 3, 3, 3),
    "fc.bias": (8,),
    "scale": (),
    "proj.weight": (6, 8),
}
# rows split (MARS row sums stay local), columns split (row sums become cross-device), replicated
SPECS = {
    "fc.weight": P("x", None),
    "conv.weight": P("x"),
    "fc.bias": P("x"),
    "scale": P(),
    "proj.weight": P(None, "x"),
}
STEPS = 8

TRANSFORMS = {
    "adam_ftp": lambda: tj.adam_ftp(1e-2, weight_decay=0.1, mask={n: n != "scale" for n in SHAPES}),
    "sgd_ftp": lambda: tj.sgd_ftp(1e-2, momentum=0.9, anchor="zero"),
    "adam_spd": lambda: tj.adam_spd(3e-2, weight_decay=1.0),
    "ftp(sgd)": lambda: tj.ftp(optax.sgd(1e-2, momentum=0.9)),
}


def _run(tx, problem, shardings):
    params = {n: jnp.asarray(v) for n, v in problem.theta0.items()}
    if shardings is not None:
        params = {n: jax.device_put(p, shardings[n]) for n, p in params.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(STEPS):
        grads = {n: jnp.asarray(problem.gradient(n, np.asarray(p), t)) for n, p in params.items()}
        if shardings is not None:
            grads = {n: jax.device_put(g, shardings[n]) for n, g in grads.items()}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sharded_steps_equal_unsharded_steps(name):
    mesh = jax.make_mesh((4,), ("x",))
    shardings = {n: NamedSharding(mesh, spec) for n, spec in SPECS.items()}
    problem = closed_loop_problem(seed=11, steps=STEPS, shapes=SHAPES)
    expected, _ = _run(TRANSFORMS[name](), problem, None)
    got, state = _run(TRANSFORMS[name](), problem, shardings)
    for n in SHAPES:
        np.testing.assert_allclose(
            np.asarray(got[n]), np.asarray(expected[n]), rtol=1e-12, atol=1e-13, err_msg=n
        )
        assert got[n].sharding.is_equivalent_to(shardings[n], got[n].ndim), n
    anchor = getattr(state, "anchor", {})
    for n, leaf in anchor.items():
        if not isinstance(leaf, optax.MaskedNode):  # the anchor lives where its parameter lives
            assert leaf.sharding.is_equivalent_to(shardings[n], leaf.ndim), n
