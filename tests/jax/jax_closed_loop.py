"""Helpers for the optax adapter's tests: build a transformation from the reference's
hyperparameters (PyTorch names) and run it on a closed-loop problem of ``tether.core.reference``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tether.adapters import jax as tj

#: For runs that anchor random tensors at the origin on purpose (the reference's "zero" mode):
#: FTP warns there, since on a real model that wipes them.
ZERO_ANCHOR_WARNING = "ignore:.*anchor='zero' but these anchored tensors are not zero:UserWarning"


def make(kind, *, anchor="init", mask=None, **hp):
    """The optax transformation ``kind`` from the reference's hyperparameter names."""
    if kind in ("adam_ftp", "adam_spd"):
        b1, b2 = hp.pop("betas", (0.9, 0.999))
        lr = hp.pop("lr", 1e-3)
        if kind == "adam_ftp":
            return tj.adam_ftp(lr, b1=b1, b2=b2, anchor=anchor, mask=mask, **hp)
        return tj.adam_spd(lr, b1=b1, b2=b2, anchor=anchor, mask=mask, **hp)
    return tj.sgd_ftp(hp.pop("lr", 1e-3), anchor=anchor, mask=mask, **hp)


def reference_anchors(names, anchor, unanchored=()):
    """The reference's per-name anchor modes for one anchor mode and a set of unanchored names."""
    return {n: (None if n in unanchored else anchor) for n in names}


def as_params(arrays, dtype=np.float64):
    return {n: jnp.asarray(np.asarray(v, dtype=dtype)) for n, v in arrays.items()}


def run(tx, problem, steps, *, dtype=np.float64, jit=True, params=None, grad_fn=None):
    """Drive ``tx`` through ``steps`` closed-loop steps; return the trajectory by name and the last state."""
    params = as_params(problem.theta0, dtype) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    trajectory = {n: [] for n in params}
    for t in range(steps):
        grads = {
            n: jnp.asarray(problem.gradient(n, np.asarray(p), t).astype(dtype)) for n, p in params.items()
        }
        if grad_fn is not None:
            grads = grad_fn(grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for n, p in params.items():
            trajectory[n].append(np.asarray(p))
    return {n: np.stack(v) for n, v in trajectory.items()}, state


def assert_trajectories_close(actual, expected, *, rtol=1e-12, atol=1e-12):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)
