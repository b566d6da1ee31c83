"""Shared fixtures for the Keras adapter's tests; KERAS_BACKEND picks the backend (one process each)."""

import keras
import pytest


@pytest.fixture
def float64():
    """Run a test with ``floatx="float64"`` (and float64 enabled on JAX); restore both afterwards.

    The global dtype policy is set too: Keras makes it from ``floatx`` once and keeps it, so
    that a layer made after this test would otherwise still be float64.
    """
    previous, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    x64 = None
    if keras.backend.backend() == "jax":
        import jax

        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(previous_policy)
    if x64 is not None:
        import jax

        jax.config.update("jax_enable_x64", x64)


@pytest.fixture
def mixed_float16():
    """Run a test under the ``mixed_float16`` dtype policy; restore the previous policy afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)
