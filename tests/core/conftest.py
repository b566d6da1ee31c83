"""Backends that the core's test module runs on: each converts inputs, compiles, and converts back.

A test writes a function of arrays (hyperparameters closed over) and calls
``backend.call(fn, *args)``; ``args`` are NumPy arrays, Python numbers or
NamedTuples of them. Under ``jax`` the function runs in ``jax.jit``; under
``torch`` in ``torch.compile(fullgraph=True)`` (the eager backend: it proves
the function traces with no graph break, without paying inductor's compile
time in every test; ``test_core.py`` compiles one full step with inductor).
"""

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


@dataclasses.dataclass
class Backend:
    name: str
    dtype: Any  # a NumPy dtype: what the test's arrays are made in
    to_array: Callable  # NumPy array -> backend array of the backend's dtype
    compile: Callable  # function -> function
    rtol: float

    def convert(self, tree):
        if tree is None or (isinstance(tree, (bool, int, float)) and not isinstance(tree, np.generic)):
            return tree
        if isinstance(tree, tuple):
            items = [self.convert(t) for t in tree]
            return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
        return self.to_array(np.asarray(tree, dtype=self.dtype))

    def back(self, tree):
        if tree is None or isinstance(tree, (bool, int, float)):
            return tree
        if isinstance(tree, tuple):
            items = [self.back(t) for t in tree]
            return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
        if hasattr(tree, "detach"):
            tree = tree.detach().cpu()
        if type(tree).__module__.startswith("array_api_strict"):
            return np.asarray(tree._array)
        return np.asarray(tree)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on this backend; return NumPy results."""
        return self.back(self.compile(fn)(*self.convert(args)))

    def close(self, actual, expected, rtol=None, atol=0.0):
        np.testing.assert_allclose(actual, expected, rtol=rtol or self.rtol, atol=atol)


def _numpy(dtype):
    return Backend(
        f"numpy-{np.dtype(dtype).name}",
        np.dtype(dtype),
        np.asarray,
        lambda f: f,
        1e-12 if dtype == np.float64 else 2e-5,
    )


def _strict():
    import array_api_strict as xps

    return Backend("array_api_strict", np.dtype(np.float64), lambda a: xps.asarray(a), lambda f: f, 1e-12)


def _jax():
    import jax
    import jax.numpy as jnp

    return Backend("jax-jit-float32", np.dtype(np.float32), lambda a: jnp.asarray(a), jax.jit, 2e-5)


def _torch():
    import torch
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 4096
    torch._dynamo.config.accumulated_cache_size_limit = 8192
    warnings.filterwarnings("ignore", message=".*lru_cache.*", category=UserWarning)

    def compile_(fn):
        return torch.compile(fn, fullgraph=True, backend="eager", dynamic=False)

    return Backend(
        "torch-compile-float64",
        np.dtype(np.float64),
        lambda a: torch.from_numpy(np.array(a)),
        compile_,
        1e-12,
    )


FACTORIES = {
    "numpy-float64": lambda: _numpy(np.float64),
    "numpy-float32": lambda: _numpy(np.float32),
    "array_api_strict": _strict,
    "jax-jit": _jax,
    "torch-compile": _torch,
}
_MODULES = {"array_api_strict": "array_api_strict", "jax-jit": "jax", "torch-compile": "torch"}


@pytest.fixture(params=list(FACTORIES), scope="session")
def backend(request):
    if request.param in _MODULES:
        pytest.importorskip(_MODULES[request.param])
    return FACTORIES[request.param]()
