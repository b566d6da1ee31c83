#!/usr/bin/env bash
# The GPU check: the CUDA tests, `tether parity --device gpu` and the GPU benchmark, one command,
# the tables written to a folder. For a bare CUDA machine that has PyTorch, Triton and JAX (with
# optax and flax) but no network; under 8 minutes on one H100.
#
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with network: tether's pure-Python needs into .whl/
#   benchmarks/gpu_check.sh [OUT]            # there, from the checkout (OUT: gpu-check/ by default)
#
# tether itself is built there from the checkout (its C kernels too, where a C compiler is) into a
# private folder put first on PYTHONPATH; nothing is installed into the machine's environment.
# Writes OUT/device.txt, tests.txt, parity.txt, parity.md, bench.txt and bench.json, and OUT/summary.md with
# each step's exit status; exits non-zero when any step failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.whl

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    # pure Python: any interpreter and platform takes them
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
        array-api-compat==1.16.0 array-api-strict==2.6.1
fi

OUT=${1:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ! nvidia-smi > "$OUT/device.txt" 2>&1; then
    echo "gpu_check: nvidia-smi found no GPU (see $OUT/device.txt)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1

SITE=$(mktemp -d)
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 3
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . || exit 3
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - >> "$OUT/device.txt" 2>&1 <<'EOF'
import torch
from tether.adapters import _torch_ops, _triton_ops
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("triton kernels:", "on" if _triton_ops.available() else "off (no triton)")
print("C kernels:", "on" if _torch_ops._kernels is not None else "off (not built)")
EOF

status=0
summary="$OUT/summary.md"
echo "| step | exit status | seconds |" > "$summary"
echo "|---|---:|---:|" >> "$summary"
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, its output into OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    echo "| $name | $rc | $((SECONDS - start)) |" >> "$summary"
    [[ $rc -eq 0 ]] || status=1
}

# the CUDA tests: the Triton kernels compiled for the GPU against the multi-tensor path, the
# optimizers' behaviour on CUDA tensors, and the parity CLI's GPU case
step tests 240 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/torch/test_torch_triton.py tests/torch/test_torch_behaviour.py tests/cli/test_parity.py
step parity 150 "$PY" -m tether parity --device gpu --markdown "$OUT/parity.md"
step bench 180 "$PY" -m tether bench --device gpu --backends torch,jax --json "$OUT/bench.json"

cat "$summary"
exit $status
