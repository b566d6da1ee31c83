"""Time tether's optax transformations against optax's own on ViT-B/16-shaped parameters.

The measuring code is `tether._bench_jax` (so that `tether bench` has it after a plain
install); this script keeps its command line:

    python benchmarks/bench_jax.py            # the full run: 86M parameters in 152 tensors
    python benchmarks/bench_jax.py --quick    # a smoke check on a narrow, shallow ViT
"""

import sys

from tether._bench_jax import main

if __name__ == "__main__":
    sys.exit(main())
