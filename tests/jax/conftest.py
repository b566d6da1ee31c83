"""Shared setup for the optax adapter's tests: float64 on, before any array is made.

The nox session ``tests-jax`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
so that the sharding test sees four host CPU devices; without it that test skips.
"""

import jax

jax.config.update("jax_enable_x64", True)
