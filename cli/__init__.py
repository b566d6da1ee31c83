"""tether: robust fine-tuning optimizers that keep fine-tuned weights tethered to their anchor.

- :mod:`tether.core`: the math (FTP, SPD, projections), backend-neutral;
- :mod:`tether.adapters.torch`, :mod:`tether.adapters.jax`, :mod:`tether.adapters.keras`:
  the optimizers for each framework.
"""

__version__ = "0.1.0"
