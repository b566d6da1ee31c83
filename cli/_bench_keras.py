"""``model.fit`` step time of tether's Keras optimizers against Keras's own, per backend.

Pairs: AdamSPD and AdamFTP against ``keras.optimizers.AdamW``, SGDFTP against
``keras.optimizers.SGD`` (both with momentum 0.9). Each backend runs in its own
process (``KERAS_BACKEND`` is fixed at import). Within a process the optimizers
share one MLP architecture and its initial weights; after a warm-up (tracing,
compilation), the timed ``fit`` calls are interleaved across optimizers and the
median over the repeats is reported, as milliseconds per training step.

    python benchmarks/bench_keras.py                      # every backend, a markdown table
    python benchmarks/bench_keras.py --backend jax --quick
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from ._workers import devices

BACKENDS = ("tensorflow", "jax", "torch")
#: (tether optimizer, Keras baseline, target ratio)
PAIRS = (("AdamSPD", "AdamW", 1.3), ("AdamFTP", "AdamW", 1.6), ("SGDFTP", "SGD", 1.6))
BASELINE_LABELS = {"AdamW": "keras AdamW", "SGD": "keras SGD(momentum=0.9)"}


def make_optimizer(name):
    import keras

    from tether.adapters import keras as tk

    return {
        "AdamW": lambda: keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01),
        "SGD": lambda: keras.optimizers.SGD(learning_rate=1e-2, momentum=0.9),
        "AdamSPD": lambda: tk.AdamSPD(learning_rate=1e-3, weight_decay=0.5),
        "AdamFTP": lambda: tk.AdamFTP(learning_rate=1e-3, weight_decay=0.01),
        "SGDFTP": lambda: tk.SGDFTP(learning_rate=1e-2, momentum=0.9),
    }[name]()


def variables_bytes(variables):
    """The bytes of a list of Keras variables (an optimizer's ``variables``)."""
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def time_fit(quick, steps=None, repeats=None):
    """Time every optimizer on this process's backend; return the medians (and minima) in ms per step."""
    import keras
    import numpy as np

    width, depth, features, batch = (512, 2, 256, 64) if quick else (1024, 3, 512, 128)
    steps = steps or (10 if quick else 30)
    repeats = repeats or (5 if quick else 7)
    keras.utils.set_random_seed(0)

    def model():
        layers = [keras.Input((features,))]
        layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        layers += [keras.layers.Dense(10)]
        return keras.Sequential(layers)

    reference = model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * batch, features)).astype("float32")
    y = rng.standard_normal((steps * batch, 10)).astype("float32")
    names = sorted({n for pair in PAIRS for n in pair[:2]})
    models = {}
    for name in names:
        m = model()
        m.set_weights(reference.get_weights())
        m.compile(optimizer=make_optimizer(name), loss="mse")
        m.fit(x[: 2 * batch], y[: 2 * batch], batch_size=batch, epochs=2, verbose=0)  # trace, compile
        models[name] = m
    times = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:  # interleaved, so that drift in the machine's load hits every optimizer alike
            start = time.perf_counter()
            models[name].fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {
        "backend": keras.backend.backend(),
        "params": reference.count_params(),
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "ms": {n: statistics.median(t) for n, t in times.items()},
        "min_ms": {n: min(t) for n, t in times.items()},
        "state_bytes": {n: variables_bytes(m.optimizer.variables) for n, m in models.items()},
    }


# --- for `tether bench` ---------------------------------------------------------------------------------


def measure(quick: bool, device: str, steps: int | None = None, repeats: int | None = None) -> list[dict]:
    """One row per tether optimizer against Keras's own (see `tether bench`): the ratio of the medians."""
    import keras

    # a device scope only where it changes something (a backend puts new tensors on its GPU when it
    # has one); under torch, keras.device("cpu:0") on a CPU-only machine leaves fit with no gradients
    scope = (
        contextlib.nullcontext()
        if device == devices(f"keras/{keras.backend.backend()}")[-1]
        else keras.device(f"{device}:0")
    )
    with scope:  # quick: 3 timed calls, not the script's 5, to keep `tether bench --quick` short
        r = time_fit(quick, steps, repeats or (3 if quick else None))
    return [
        {
            "backend": f"keras/{r['backend']}",
            "device": device,
            "optimizer": ours,
            "baseline": BASELINE_LABELS[base],
            "ms": r["ms"][ours],
            "baseline_ms": r["ms"][base],
            "ratio": r["ms"][ours] / r["ms"][base],
            "ratio_kind": "ratio of medians (model.fit step)",
            "state_bytes_per_param": r["state_bytes"][ours] / r["params"],
            "baseline_state_bytes_per_param": r["state_bytes"][base] / r["params"],
            "ratio_of_minima": r["min_ms"][ours] / r["min_ms"][base],
            "params": r["params"],
            "repeats": r["repeats"],
            "steps": r["steps"],
        }
        for ours, base, _ in PAIRS
    ]


# --- the script (benchmarks/bench_keras.py) -----------------------------------------------------------


def table(results):
    lines = [
        "| backend | optimizer | ms/step | baseline | ms/step | ratio | ratio of minima | target | met |",
        "|---|---|---:|---|---:|---:|---:|---:|:-:|",
    ]
    for r in results:
        for ours, base, target in PAIRS:
            ratio = r["ms"][ours] / r["ms"][base]
            fastest = r["min_ms"][ours] / r["min_ms"][base]
            lines.append(
                f"| {r['backend']} | {ours} | {r['ms'][ours]:.1f} | {base} | {r['ms'][base]:.1f} "
                f"| {ratio:.2f}× | {fastest:.2f}× | ≤ {target}× | {'yes' if ratio <= target else 'no'} |"
            )
    first = results[0]
    lines.append("")
    lines.append(
        f"MLP with {first['params']:,} parameters, batch {first['batch']}, median of {first['repeats']} "
        f"interleaved `fit` calls of {first['steps']} steps each (the ratio of the fastest calls "
        "is less sensitive to other load on the machine)."
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer steps and repeats")
    parser.add_argument("--steps", type=int, help="training steps per timed fit call")
    parser.add_argument("--repeats", type=int, help="timed fit calls per optimizer (the median is reported)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(time_fit(args.quick, args.steps, args.repeats)))
        return 0
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    results = []
    for backend in backends:
        command = [sys.executable, "-m", "tether._bench_keras", "--worker"]
        command += ["--quick"] * args.quick
        command += [f"--steps={args.steps}"] * bool(args.steps) + [f"--repeats={args.repeats}"] * bool(
            args.repeats
        )
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{backend}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{backend}: {results[-1]['ms']}", file=sys.stderr)
    if results:
        print(table(results))
    return 0 if len(results) == len(backends) else 1


if __name__ == "__main__":
    sys.exit(main())
