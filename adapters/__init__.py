"""Framework adapters: ``tether.adapters.torch``, ``tether.adapters.jax``, ``tether.adapters.keras``.

Each is imported on its own, so that using one framework never imports another.
"""
