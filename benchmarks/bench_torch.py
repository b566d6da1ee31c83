#!/usr/bin/env python3
"""Step time and state memory of tether's torch optimizers against torch.optim's fused baselines (foreach a second column).

The measuring code is `tether._bench_torch` (so that `tether bench` has it after a plain
install); this script keeps its command line:

    python benchmarks/bench_torch.py            # the full ViT-B/16 shapes (about 6 GB of memory)
    python benchmarks/bench_torch.py --quick    # 2 blocks of width 256: a smoke check
    python benchmarks/bench_torch.py --device cuda
"""

import sys

from tether._bench_torch import main

if __name__ == "__main__":
    sys.exit(main())
