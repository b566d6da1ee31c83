"""`tether robustness`: what robust fine-tuning keeps, on a real pre-trained model, offline.

Fine-tune a pre-trained model on an in-distribution (ID) task with every method, under the
same budget, and measure the ID test accuracy, the accuracy on out-of-distribution (OOD)
sets, and how far the weights moved (`‖θ − θ₀‖`). The built-in task, `digits`, fine-tunes
the LeNet-5 MNIST classifier of `advertorch` on scikit-learn's 8×8 digits and measures OOD
accuracy on 5,000 real MNIST digits and on corruptions of the ID test set; every file comes
from installed packages (`pip install "tether[robustness]"`).

The methods: `pretrained` (no fine-tuning), `adamw`, `l2sp` (L2-SP around Adam), `marssp`
(MARS-SP around Adam), `ftp` (AdamFTP), `spd` (AdamSPD), `tpgm` (AdamW, then TPGM on the ID
validation split), `wiseft` (AdamW, then WiSE-FT with α chosen on the ID validation split)
and `lpft` (a linear probe, then full fine-tuning). The selection rule (run unless `--quick`):
the learning rate is chosen for AdamW from `LEARNING_RATES` by ID validation accuracy and
used by every method; then each method's own hyperparameter is chosen from its grid
(`GRIDS`) the same way, with seed 0. OOD data is never used to choose anything.

    tether robustness --quick                     # 1 seed, 6 epochs, no selection: a few minutes
    tether robustness --seeds 3 --json out.json   # the full run: selection, then 3 seeds
    tether robustness --backend jax --report docs/robustness-jax
"""

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

METHODS = ("pretrained", "adamw", "l2sp", "marssp", "ftp", "spd", "tpgm", "wiseft", "lpft")
BACKENDS = ("torch", "jax", "keras")
#: The learning rates AdamW's is chosen from (then used by every method).
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
#: Each method's own hyperparameter: its name, the grid it is chosen from, and the value used
#: without selection (`--quick`).
GRIDS = {
    "l2sp": ("alpha", (0.01, 0.1, 1.0), 0.1),
    "marssp": ("radius", (0.5, 2.0, 8.0), 2.0),
    "spd": ("weight_decay", (0.5, 1.0, 2.0), 1.0),
    "tpgm": ("tpgm_lr", (1e-3, 1e-2), 1e-2),
}
#: WiSE-FT's mixing weights, chosen on the ID validation split.
WISE_ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


@dataclasses.dataclass
class Task:
    """A robustness comparison: a pre-trained model and the data to fine-tune and test it on.

    Attributes:
        name: shown in the report.
        weights: the pre-trained weights by name, NumPy arrays in PyTorch's layout.
        train, val, test: ``(x, y)`` pairs of the ID task (``x`` float32 NCHW, ``y`` int labels).
        ood: OOD test sets by name, ``(x, y)`` pairs.
        architecture: the network every backend builds (``"lenet5"``).
        head: the names of the classifier's weights (a linear probe trains only those).
    """

    name: str
    weights: dict
    train: tuple
    val: tuple
    test: tuple
    ood: dict
    architecture: str = "lenet5"
    head: tuple = ("linear2.weight", "linear2.bias")


def digits_task(seed: int = 0) -> Task:
    """The built-in task: advertorch's LeNet-5 MNIST classifier fine-tuned on scikit-learn's digits."""
    from ._robust_digits import digits, pretrained_weights

    train, val, test, ood = digits(seed)
    return Task("digits", pretrained_weights(), train, val, test, ood)


TASKS: dict[str, Callable[[], Task]] = {"digits": digits_task}


@dataclasses.dataclass
class Budget:
    """The training budget every method gets.

    Attributes:
        epochs: passes over the ID train split.
        batch_size: examples per optimizer step.
        tpgm_iters: projection updates of `tpgm`'s call at the end of fine-tuning (the ViT
            recipe), on batches of the ID validation split.
    """

    epochs: int = 20
    batch_size: int = 32
    tpgm_iters: int = 100


def batch_order(n, budget, seed):
    """The mini-batches of every epoch as index arrays: the same data order on every backend."""
    rng = np.random.default_rng(seed)
    order = []
    for _ in range(budget.epochs):
        perm = rng.permutation(n)
        order.extend(perm[i : i + budget.batch_size] for i in range(0, n, budget.batch_size))
    return order


def deviation(weights, anchor):
    """`‖θ − θ₀‖₂` over every tensor, and per tensor."""
    per = {n: float(np.linalg.norm((weights[n] - anchor[n]).ravel())) for n in anchor}
    return float(np.sqrt(sum(v * v for v in per.values()))), per


#: The module and class of each backend, and the extras it needs.
_BACKENDS = {
    "torch": ("_robust_torch", "TorchBackend", "torch,robustness"),
    "jax": ("_robust_jax", "JaxBackend", "jax,flax,robustness"),
    "keras": ("_robust_keras", "KerasBackend", "keras,robustness"),
}


def _backend(name, task):
    """The backend's runner; a missing framework is a one-line install hint, not a traceback."""
    import importlib

    from ._robust_digits import MissingExtra

    module, cls, extras = _BACKENDS[name]
    try:
        return getattr(importlib.import_module(f"tether.{module}"), cls)(task)
    except ModuleNotFoundError as missing:
        if missing.name and missing.name.split(".")[0] == "tether":
            raise
        raise MissingExtra(f'--backend {name} needs {missing.name}: pip install "tether[{extras}]"') from None


def _accuracy(backend, weights, data):
    x, y = data
    return 100.0 * float(np.mean(backend.predict(weights, x) == y))


class _StepClock:
    """Seconds per optimizer step, timed from the `WARMUP`-th step on: a framework that compiles
    its step (JAX) pays the compilation in the first steps, which is not the step's cost."""

    WARMUP = 5

    def __init__(self, steps, on_step):
        self.steps, self.on_step, self.done = steps, on_step, 0
        self.start = time.perf_counter()
        self.warm = None if steps > 2 * self.WARMUP else self.start

    def tick(self):
        self.done += 1
        if self.done == self.WARMUP and self.warm is None:
            self.warm = time.perf_counter()
        if self.on_step is not None:
            self.on_step()

    def seconds_per_step(self):
        counted = self.steps - (self.WARMUP if self.warm is not self.start else 0)
        return (time.perf_counter() - self.warm) / max(counted, 1)


class Run:
    """One method, one seed: fine-tune, then measure ID, OOD and the drift."""

    def __init__(self, task, backend, budget, lr, hparams, on_step=None):
        self.task, self.backend, self.budget = task, backend, budget
        self.lr, self.hparams, self.on_step = lr, hparams, on_step

    def train(self, method, seed):
        """The fine-tuned weights (PyTorch layout) and the seconds per optimizer step."""
        if method == "pretrained":
            return dict(self.task.weights), 0.0
        base = {"tpgm": "adamw", "wiseft": "adamw"}.get(method, method)
        order = batch_order(len(self.task.train[1]), self.budget, seed)
        clock = _StepClock(len(order), self.on_step)
        weights = self.backend.finetune(base, self.lr, self.hparams, order, seed, clock.tick)
        seconds = clock.seconds_per_step()
        if method == "tpgm":
            iters = self.budget.tpgm_iters
            val_order = batch_order(len(self.task.val[1]), Budget(iters, self.budget.batch_size), seed)[
                :iters
            ]
            weights = self.backend.tpgm(weights, self.hparams["tpgm_lr"], val_order)
        if method == "wiseft":
            weights = self.wise_ft(weights)
        return weights, seconds

    def wise_ft(self, finetuned):
        """WiSE-FT with α chosen on the ID validation split (ties: the smaller α, nearer the anchor)."""
        from tether.core import wise_ft

        best = None
        for alpha in WISE_ALPHAS:
            mixed = {n: wise_ft(self.task.weights[n], finetuned[n], float(alpha)) for n in finetuned}
            score = _accuracy(self.backend, mixed, self.task.val)
            if best is None or score > best[0]:
                best = (score, mixed, float(alpha))
        self.hparams["alpha"] = best[2]
        return best[1]

    def measure(self, weights):
        task = self.task
        ood = {name: _accuracy(self.backend, weights, data) for name, data in task.ood.items()}
        total, per_tensor = deviation(weights, task.weights)
        return {
            "id": _accuracy(self.backend, weights, task.test),
            "val": _accuracy(self.backend, weights, task.val),
            "ood": ood,
            "ood_mean": float(np.mean(list(ood.values()))),
            "deviation": total,
            "drift": per_tensor,
        }


def _default_hparams(method):
    if method in GRIDS:
        name, _, default = GRIDS[method]
        return {name: default}
    return {}


def select(task, backend, budget, methods, progress):
    """The selection rule: AdamW's learning rate, then each method's own hyperparameter, on ID val."""
    scores = {}
    for lr in LEARNING_RATES:
        run = Run(task, backend, budget, lr, {}, progress.tick)
        scores[lr] = run.measure(run.train("adamw", 0)[0])["val"]
        progress.note(f"selection: adamw lr {lr:g}: ID val {scores[lr]:.1f}%")
    lr = max(LEARNING_RATES, key=lambda v: (scores[v], -v))
    chosen = {m: _default_hparams(m) for m in methods}
    for method in methods:
        if method not in GRIDS:
            continue
        name, grid, _ = GRIDS[method]
        results = []
        for value in grid:
            run = Run(task, backend, budget, lr, {name: value}, progress.tick)
            results.append((run.measure(run.train(method, 0)[0])["val"], value))
            progress.note(f"selection: {method} {name} {value:g}: ID val {results[-1][0]:.1f}%")
        chosen[method] = {name: max(results, key=lambda r: r[0])[1]}  # the first best in grid order
    return lr, chosen


class Progress:
    """A progress bar on a terminal (optimizer steps done / planned), notes on their own lines."""

    def __init__(self, total, stream=None, quiet=False):
        self.stream, self.total, self.done, self.quiet = stream or sys.stderr, total, 0, quiet
        self.tty = self.stream.isatty()
        self.label = ""

    def tick(self, steps=1):
        self.done += steps
        if self.tty and not self.quiet and self.total and (self.done % 20 == 0 or self.done >= self.total):
            width = 30
            filled = int(width * min(self.done / self.total, 1.0))
            self.stream.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {self.label[:50]:<50}")
            self.stream.flush()

    def note(self, text):
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r" + " " * 90 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def compare(
    task: Task,
    methods=METHODS,
    *,
    seeds: int = 3,
    backend: str = "torch",
    budget: Budget | None = None,
    selection: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Fine-tune `task`'s model with every method and measure it: the data of the report.

    Returns:
        ``{"task", "backend", "seeds", "lr", "hparams", "rows": [...]}``: one row per method with
        the mean and standard deviation over seeds of ``id``, each OOD set, ``ood_mean``,
        ``deviation`` (accuracies in percent), ``seconds`` per optimizer step, and the per-tensor
        ``drift`` of the first seed.
    """
    budget = budget or Budget()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    steps = len(batch_order(len(task.train[1]), budget, 0))
    trained = [m for m in methods if m != "pretrained"]
    planned = steps * len(trained) * seeds
    if selection:
        planned += steps * (len(LEARNING_RATES) + sum(len(GRIDS[m][1]) for m in methods if m in GRIDS))
    progress = progress or Progress(planned)
    progress.total = planned
    runner = _backend(backend, task)
    if selection:
        lr, hparams = select(task, runner, budget, methods, progress)
    else:
        lr, hparams = 1e-3, {m: _default_hparams(m) for m in methods}
    rows = []
    for method in methods:
        results = []
        for seed in range(seeds):
            progress.label = f"{method} seed {seed}"
            run = Run(task, runner, budget, lr, dict(hparams[method]), progress.tick)
            weights, seconds = run.train(method, seed)
            results.append({**run.measure(weights), "seconds": seconds, "hparams": run.hparams})
            if method == "pretrained":
                results = results * seeds  # nothing random: one evaluation stands for every seed
                break
        rows.append(_summarize(method, results))
        row = rows[-1]
        progress.note(
            f"{method:10s} ID {row['id']:.1f}  OOD mean {row['ood_mean']:.1f}  ‖θ − θ₀‖ {row['deviation']:.2f}"
        )
    return {
        "task": task.name,
        "backend": backend,
        "seeds": seeds,
        "epochs": budget.epochs,
        "batch_size": budget.batch_size,
        "lr": lr,
        "hparams": {r["method"]: r["hparams"] for r in rows},
        "rows": rows,
    }


def _summarize(method, results):
    def stat(values):
        return float(np.mean(values)), float(np.std(values))

    id_mean, id_std = stat([r["id"] for r in results])
    ood = {n: stat([r["ood"][n] for r in results]) for n in results[0]["ood"]}
    ood_mean, ood_std = stat([r["ood_mean"] for r in results])
    dev, dev_std = stat([r["deviation"] for r in results])
    return {
        "method": method,
        "id": id_mean,
        "id_std": id_std,
        "ood": {n: v[0] for n, v in ood.items()},
        "ood_std": {n: v[1] for n, v in ood.items()},
        "ood_mean": ood_mean,
        "ood_mean_std": ood_std,
        "deviation": dev,
        "deviation_std": dev_std,
        "seconds": float(np.mean([r["seconds"] for r in results])),
        "hparams": results[0]["hparams"],
        "drift": results[0]["drift"],
    }


# --- output ----------------------------------------------------------------------------------------


def format_table(result):
    """The report as a plain-text (and Markdown) table: mean ± std over seeds."""
    rows = result["rows"]
    ood_names = list(rows[0]["ood"])
    header = ["method", "ID", *ood_names, "OOD mean", "‖θ − θ₀‖", "ms/step"]

    def cell(mean, std):
        return f"{mean:.1f} ± {std:.1f}" if result["seeds"] > 1 else f"{mean:.1f}"

    lines = [header]
    for r in rows:
        lines.append(
            [
                r["method"],
                cell(r["id"], r["id_std"]),
                *(cell(r["ood"][n], r["ood_std"][n]) for n in ood_names),
                cell(r["ood_mean"], r["ood_mean_std"]),
                f"{r['deviation']:.2f}",
                "-" if r["seconds"] == 0 else f"{1000 * r['seconds']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def to_json(result):
    """The JSON the command writes: accuracies in percent."""
    keep = ("method", "id", "ood", "ood_mean", "deviation", "seconds", "hparams")
    return {
        "task": result["task"],
        "backend": result["backend"],
        "seeds": result["seeds"],
        "epochs": result["epochs"],
        "lr": result["lr"],
        "rows": [{k: r[k] for k in keep} | {"std": _stds(r)} for r in result["rows"]],
    }


def _stds(row):
    return {"id": row["id_std"], "ood": row["ood_std"], "ood_mean": row["ood_mean_std"]}


def plot(result, path):
    """A PNG: ID vs OOD mean per method, and each method's drift per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        left.errorbar(r["id"], r["ood_mean"], xerr=r["id_std"], yerr=r["ood_mean_std"], fmt="o", capsize=3)
        left.annotate(r["method"], (r["id"], r["ood_mean"]), textcoords="offset points", xytext=(5, 5))
    left.set_xlabel("ID test accuracy (%)")
    left.set_ylabel("OOD mean accuracy (%)")
    left.set_title(f"{result['task']} ({result['backend']}, {result['seeds']} seed(s))")
    left.grid(alpha=0.3)
    layers = [n for n in rows[0]["drift"] if n.endswith("weight")]
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        right.bar(
            np.arange(len(layers)) + i * width, [r["drift"][n] for n in layers], width, label=r["method"]
        )
    right.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=20)
    right.set_ylabel("‖θ − θ₀‖₂ of the layer")
    right.set_title("drift per layer (first seed)")
    right.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result, directory):
    """The table as Markdown and the plot, ready for the docs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot(result, directory / "robustness.png")
    chosen = ", ".join(f"{m}: {h}" for m, h in result["hparams"].items() if h)
    text = (
        f"# {result['task']} on {result['backend']}\n\n"
        f"{result['seeds']} seed(s), {result['epochs']} epochs, batch {result['batch_size']}, "
        f"learning rate {result['lr']:g}; chosen on the ID validation split: {chosen or '-'}.\n\n"
        f"{format_table(result)}\n\n![ID vs OOD and drift per layer](robustness.png)\n"
    )
    (directory / "robustness.md").write_text(text)
    (directory / "robustness.json").write_text(json.dumps(to_json(result), indent=1))


# --- the command ---------------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "--task", default="digits", choices=sorted(TASKS), help="the built-in task (default: digits)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), metavar="METHOD", help=f"of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per method (default: 3; 1 with --quick)"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="torch", help="the framework (keras: KERAS_BACKEND's)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: 20; 6 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 epochs, no selection: a few minutes")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of ID vs OOD and the drift per layer")
    parser.add_argument("--report", metavar="DIR", help="write the table (Markdown), the plot and the JSON")


def main(args):
    from ._robust_digits import MissingExtra

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        print(f"tether robustness: unknown methods {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    seeds = args.seeds or (1 if args.quick else 3)
    budget = Budget(epochs=args.epochs or (6 if args.quick else 20))
    try:
        task = TASKS[args.task]()
        result = compare(
            task, args.methods, seeds=seeds, backend=args.backend, budget=budget, selection=not args.quick
        )
    except MissingExtra as missing:
        print(f"tether robustness: {missing}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=1))
    if args.plot:
        plot(result, args.plot)
    if args.report:
        write_report(result, args.report)
    return 0
