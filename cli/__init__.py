"""tether: robust fine-tuning optimizers that keep fine-tuned weights tethered to their anchor.

- `tether.core`: the math (FTP, SPD, projections), backend-neutral;
- `tether.adapters.torch`, `tether.adapters.jax`, `tether.adapters.keras`:
  the optimizers for each framework.
"""

__version__ = "0.1.0"
