#!/usr/bin/env python3
"""``model.fit`` step time of tether's Keras optimizers against Keras's own, per backend.

The measuring code is `tether._bench_keras` (so that `tether bench` has it after a plain
install); this script keeps its command line:

    python benchmarks/bench_keras.py                      # every backend, a markdown table
    python benchmarks/bench_keras.py --backend jax --quick
"""

import sys

from tether._bench_keras import main

if __name__ == "__main__":
    sys.exit(main())
