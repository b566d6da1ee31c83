"""`tether parity`: the same optimizer gives the same numbers in every framework.

For every installed backend (PyTorch; JAX/optax; Keras on each installed
backend), every device it sees, every case of `_parity_cases.CASES` and two
problems (the closed-loop problem and a small MLP trained by the framework's own
autodiff), in float64 and float32: run the framework's public optimizer and
compare its trajectory with the core's float64 NumPy run. Each backend runs in
its own subprocess (`KERAS_BACKEND` is fixed at import), which streams its
results back as JSON lines.
"""

import argparse
import json
import sys
import time
import traceback

from ._workers import BACKENDS, emit, installed, module_name, run_worker, wanted
from ._workers import devices as all_devices

# --- the worker: one backend, in its own process ----------------------------------------------------


def worker(backend, device_filter, steps):
    """Run every case on one backend; print one JSON line per result."""
    import importlib
    import warnings

    # the zero-anchor FTP cases check ALGORITHMS.md's rule on nonzero tensors on purpose
    warnings.filterwarnings("ignore", message=r".*anchor='zero' but .* not zero")

    import numpy as np

    from ._parity_cases import CASES, DTYPES, PROBLEMS, TOLERANCE, max_deviation, reference_trajectory

    driver = importlib.import_module(module_name("parity", backend))
    devices = [d for d in all_devices(backend) if wanted(d, device_filter)]
    problems = [cls(seed=0, steps=steps) for cls in PROBLEMS.values()]
    references = {(c.name, p.name): reference_trajectory(c, p) for c in CASES for p in problems}
    emit({"plan": len(devices) * len(CASES) * len(problems) * len(DTYPES), "devices": devices})
    for device in devices:
        for case in CASES:
            for dtype in DTYPES:
                for problem in problems:
                    tol = TOLERANCE[dtype]
                    record = {
                        "backend": backend,
                        "device": device,
                        "optimizer": case.name,
                        "problem": problem.name,
                        "scope": problem.scope,
                        "dtype": dtype,
                        "tolerance": tol,
                    }
                    try:
                        reference = references[(case.name, problem.name)]
                        trajectory = None if reference is None else driver.run(case, problem, dtype, device)
                        if trajectory is None:
                            record.update(verdict="n/a", deviation=None)
                        else:
                            dev = max_deviation(trajectory, reference)
                            ok = bool(np.isfinite(dev) and dev <= tol)
                            record.update(verdict="pass" if ok else "FAIL", deviation=dev)
                    except Exception as exc:  # reported as a failure of this case, and the run goes on
                        record.update(
                            verdict="ERROR",
                            deviation=None,
                            error=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=4),
                        )
                    emit(record)


# --- the orchestrator ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; on a pipe, a line per backend."""

    def __init__(self, stream=None, width=30):
        self.stream, self.width = stream or sys.stderr, width
        self.tty = self.stream.isatty()
        self.done = self.total = 0

    def update(self, label):
        self.done += 1
        if self.tty and self.total:
            filled = int(self.width * min(self.done / self.total, 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
            self.stream.flush()

    def say(self, text):
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 80) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def run_backend(backend, device_filter, steps, progress):
    """Run one backend's worker in a subprocess; return its records."""
    records = []

    def on_result(obj):
        if "plan" in obj:
            progress.total += obj["plan"]
            return
        records.append(obj)
        progress.update(f"{backend} {obj['device']} {obj['optimizer']} {obj['problem']} {obj['dtype']}")

    args = ["parity", "--worker", backend, "--device", device_filter, "--steps", str(steps)]
    code, tail = run_worker(backend, args, on_result)
    if code != 0:
        records.append(
            {
                "backend": backend,
                "device": "-",
                "optimizer": "(worker)",
                "problem": "-",
                "dtype": "-",
                "tolerance": None,
                "deviation": None,
                "verdict": "ERROR",
                "error": f"worker exited with status {code}:\n{tail}",
            }
        )
    return records


def summarize(records):
    """One row per backend × device × optimizer × problem scope × dtype: the worst over its problems.

    The scope is ``"arrays"`` (the closed-loop problem and the MLP: the same arrays, in PyTorch's
    layout, in every framework) or ``"same model"`` (a CNN built from each framework's own
    layers, in its own layout).
    """
    rows = {}
    for r in records:
        key = (r["backend"], r["device"], r["optimizer"], r.get("scope", "arrays"), r["dtype"])
        row = rows.setdefault(key, {"deviation": None, "tolerance": r["tolerance"], "verdicts": []})
        if r["tolerance"] is not None:
            row["tolerance"] = max(row["tolerance"] or 0.0, r["tolerance"])
        row["verdicts"].append(r["verdict"])
        if r.get("deviation") is not None:
            row["deviation"] = max(row["deviation"] or 0.0, r["deviation"])
    table = []
    for (backend, device, optimizer, scope, dtype), row in rows.items():
        verdicts = row["verdicts"]
        if "ERROR" in verdicts:
            verdict = "ERROR"
        elif "FAIL" in verdicts:
            verdict = "FAIL"
        elif all(v == "n/a" for v in verdicts):
            verdict = "n/a"
        else:
            verdict = "pass"
        table.append((backend, device, optimizer, scope, dtype, row["deviation"], row["tolerance"], verdict))
    return table


def markdown_tables(records):
    """One Markdown table per problem: optimizer × dtype rows, a column per backend (and device)."""
    columns = list(
        dict.fromkeys(
            f"{r['backend']}" + ("" if r["device"] == "cpu" else f" ({r['device']})") for r in records
        )
    )
    out = []
    for problem in dict.fromkeys(r["problem"] for r in records):
        cells = {}
        for r in records:
            if r["problem"] != problem:
                continue
            column = f"{r['backend']}" + ("" if r["device"] == "cpu" else f" ({r['device']})")
            value = (
                "n/a"
                if r["verdict"] == "n/a"
                else r["verdict"]
                if r.get("deviation") is None
                else f"{r['deviation']:.1e}"
            )
            if r["verdict"] in ("FAIL", "ERROR") and r.get("deviation") is not None:
                value += f" {r['verdict']}"
            cells[(r["optimizer"], r["dtype"], column)] = value
        keys = list(dict.fromkeys((o, d) for o, d, _ in cells))
        out.append(f"### {problem}: max |backend − core|\n")
        out.append("| optimizer | dtype | " + " | ".join(columns) + " |")
        out.append("|---|---|" + "---:|" * len(columns))
        for optimizer, dtype in keys:
            row = [cells.get((optimizer, dtype, c), "-") for c in columns]
            out.append(f"| {optimizer} | {dtype} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def format_table(table):
    header = ("backend", "device", "optimizer", "problem", "dtype", "max |Δ|", "tolerance", "verdict")
    cells = [header] + [
        (b, d, o, p, t, "-" if dev is None else f"{dev:.2e}", "-" if tol is None else f"{tol:.0e}", v)
        for b, d, o, p, t, dev, tol, v in table
    ]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args):
    if args.worker:
        worker(args.worker, args.device, args.steps)
        return 0
    chosen = args.backends.split(",") if args.backends else list(BACKENDS)
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        print(f"tether parity: unknown backend(s) {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    progress = Progress()
    records, status = [], {}
    start = time.perf_counter()
    for backend in chosen:
        if not installed(backend):
            status[backend] = "skipped (not installed)"
            progress.say(f"{backend}: skipped, not installed ({', '.join(BACKENDS[backend][0])})")
            continue
        t0 = time.perf_counter()
        found = run_backend(backend, args.device, args.steps, progress)
        records += found
        bad = sum(r["verdict"] in ("FAIL", "ERROR") for r in found)
        devices = sorted({r["device"] for r in found if r["device"] != "-"})
        status[backend] = "failed" if bad else ("no device" if not devices else "passed")
        progress.say(
            f"{backend}: {len(found)} runs on {devices or 'no matching device'}, {bad} failed "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    table = summarize(records)
    print(format_table(table) if table else "(no runs)")
    for r in records:
        if r["verdict"] == "ERROR":
            print(
                f"\nERROR {r['backend']} {r['device']} {r['optimizer']} {r['problem']} {r['dtype']}:\n"
                f"{r.get('traceback') or r.get('error')}"
            )
    failed = [row for row in table if row[-1] in ("FAIL", "ERROR")]
    ran = [row for row in table if row[-1] == "pass"]
    if args.device == "gpu" and not ran and not failed:
        print("tether parity: no GPU found on any installed backend; nothing to compare on GPU.")
    print(
        f"\n{len(ran)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s; "
        + ", ".join(f"{b}: {s}" for b, s in status.items())
        + ")"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_tables(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "backends": status,
                    "rows": [
                        dict(
                            zip(
                                (
                                    "backend",
                                    "device",
                                    "optimizer",
                                    "problem",
                                    "dtype",
                                    "max_abs_deviation",
                                    "tolerance",
                                    "verdict",
                                ),
                                row,
                            )
                        )
                        for row in table
                    ],
                    "records": records,
                },
                f,
                indent=1,
            )
    return 1 if failed else 0


def add_arguments(parser):
    parser.add_argument("--backends", help=f"comma-separated subset of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu", "all"),
        default="cpu",
        help="which devices to compare on (default: cpu)",
    )
    parser.add_argument("--steps", type=int, default=25, help="steps per trajectory (default: 25)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write one Markdown table per problem (docs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
