"""`tether bench`: the step cost of tether's optimizers against each framework's own, as one table.

For every installed backend (PyTorch; JAX/optax; Keras on each installed
backend) and every device it sees (`--device`; by default the CPU and a GPU
where there is one), time tether's optimizers against the framework's own AdamW
and SGD with momentum 0.9, interleaving the runs so that a change in the
machine's load hits all alike, and count the optimizer state's bytes per
parameter. What is timed:

- torch: `optimizer.step()` on ViT-B/16-shaped parameters against
  `torch.optim.AdamW` / `SGD` (fused=True: what a user who cares about speed
  picks; the foreach implementations are a second column); the ratio is the
  median over rounds of the per-round ratio;
- jax: the jitted, donated `update` + `optax.apply_updates` on ViT-B/16-shaped
  parameters against `optax.adamw` / `optax.sgd`; the ratio of the medians;
- keras/*: a whole `model.fit` step of an MLP against `keras.optimizers.AdamW`
  / `SGD`; the ratio of the medians.

Each backend runs in its own subprocess (`KERAS_BACKEND` is fixed at import),
which streams its rows back as JSON lines. `--quick` is a smoke check (small
shapes, few repeats); the figures worth quoting come from a full run on a quiet
machine. The same code runs as `python benchmarks/bench_{torch,jax,keras}.py`.
"""

import argparse
import json
import sys
import time
import traceback

from ._workers import BACKENDS, GPU_NAMES, emit, installed, module_name, run_worker, wanted
from ._workers import devices as all_devices

COLUMNS = (
    ("backend", "backend"),
    ("device", "device"),
    ("optimizer", "optimizer"),
    ("baseline", "baseline"),
    ("ms", "ms"),
    ("baseline ms", "baseline_ms"),
    ("ratio", "ratio"),
    ("floor", "floor"),
    ("traffic here", "traffic_ratio"),
    ("vs foreach", "foreach_ratio"),
    ("state B/param", "state_bytes_per_param"),
    ("baseline state B/param", "baseline_state_bytes_per_param"),
)


# --- the worker: one backend, in its own process ----------------------------------------------------


def worker(backend, device_filter, quick):
    """Measure on every wanted device of one backend; print one JSON line per row."""
    import importlib

    module = importlib.import_module(module_name("bench", backend))
    devices = [d for d in all_devices(backend) if wanted(d, device_filter)]
    emit({"devices": devices})
    failed = False
    for device in devices:
        try:
            for row in module.measure(quick, device):
                emit({**row, "backend": backend})
        except Exception as exc:  # reported, and the other devices still run
            failed = True
            emit({"backend": backend, "device": device, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
    return 1 if failed else 0


# --- the orchestrator ---------------------------------------------------------------------------------


def run_backend(backend, device_filter, quick):
    """Run one backend's worker in a subprocess; return (rows, devices, error or None)."""
    rows, devices, errors = [], [], []

    def on_result(obj):
        nonlocal devices
        if "devices" in obj:
            devices = obj["devices"]
        elif "error" in obj:
            errors.append(f"{obj['device']}: {obj['error']}")
        else:
            rows.append(obj)

    args = ["bench", "--worker", backend, "--device", device_filter, *(["--quick"] if quick else [])]
    code, tail = run_worker(backend, args, on_result)
    error = None
    if code != 0 or errors:
        error = "\n".join([f"worker exited with status {code}", *errors, tail])
    return rows, devices, error


def _number(value, digits):
    if value is None:
        return "-"
    return f"{value:.{digits + 1 if abs(value) < 10 else digits}f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def format_table(rows):
    cells = [tuple(title for title, _ in COLUMNS)]
    for r in rows:
        cells.append(
            (
                r["backend"],
                r["device"],
                r["optimizer"],
                r["baseline"],
                _number(r.get("ms"), 1),
                _number(r.get("baseline_ms"), 1),
                _ratio(r.get("ratio")),
                _ratio(r.get("floor")),
                _ratio(r.get("traffic_ratio")),
                _ratio(r.get("foreach_ratio")),
                _number(r.get("state_bytes_per_param"), 1),
                _number(r.get("baseline_state_bytes_per_param"), 1),
            )
        )
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(COLUMNS))]
    right = {title for title, _ in COLUMNS[4:]}  # the numbers
    lines = [
        "  ".join(
            str(c).rjust(w) if title in right else str(c).ljust(w)
            for c, w, (title, _) in zip(row, widths, COLUMNS)
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


NOTES = (
    "ms: median time per step (torch, jax: the optimizer step alone; keras: a whole model.fit step).\n"
    "ratio: torch, the median over interleaved rounds of the per-round ratio; jax and keras, the ratio of "
    "the medians.\nfloor: the least ratio memory traffic allows (full-size reads and writes per value over the "
    "baseline's); traffic here: torch on a CPU, the ratio the same passes take at this machine's measured costs "
    "of a read, a write-back and a streaming store (not with --quick); vs foreach: torch, the ratio to torch.optim's foreach implementation.\nstate B/param: the optimizer state's bytes divided by the number of parameters "
    "(float32 parameters take 4)."
)


def main(args):
    if args.worker:
        return worker(args.worker, args.device, args.quick)
    wanted = args.backends.split(",") if args.backends else list(BACKENDS)
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        print(f"tether bench: unknown backend(s) {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    rows, status, errors = [], {}, []
    start = time.perf_counter()
    for backend in wanted:
        if not installed(backend):
            status[backend] = "skipped (not installed)"
            print(f"{backend}: skipped, not installed ({', '.join(BACKENDS[backend][0])})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        found, devices, error = run_backend(backend, args.device, args.quick)
        rows += found
        if error:
            status[backend] = "crashed"
            errors.append((backend, error))
        else:
            status[backend] = "measured" if found else "no device"
        print(
            f"{backend}: {len(found)} rows on {devices or 'no matching device'}"
            f"{', CRASHED' if error else ''} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    print(format_table(rows) if rows else "(no rows)")
    print("\n" + NOTES)
    kernels = sorted({r["kernels"] for r in rows if r.get("kernels")})
    if kernels:
        print(f"\ntorch: FTP's CPU steps ran the C kernels: {', '.join(kernels)}.")
    for backend, error in errors:
        print(f"\nERROR {backend}:\n{error}")
    if args.device != "cpu" and not any(r["device"] in GPU_NAMES for r in rows):
        what = "nothing measured on GPU" if args.device == "gpu" else "CPU figures only"
        print(f"\ntether bench: no GPU found on any installed backend; {what}.")
    print(
        f"\n{len(rows)} rows ({time.perf_counter() - start:.0f} s; "
        + ", ".join(f"{b}: {s}" for b, s in status.items())
        + ")"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"quick": args.quick, "device": args.device, "backends": status, "rows": rows}, f, indent=1
            )
    return 1 if errors else 0


def add_arguments(parser):
    parser.add_argument("--backends", help=f"comma-separated subset of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "all"),
        default="all",
        help="which devices to measure on (default: all, the CPU and a GPU where there is one)",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke check")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
