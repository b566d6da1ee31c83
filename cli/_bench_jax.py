"""Time tether's optax transformations against optax's own on ViT-B/16-shaped parameters.

    python benchmarks/bench_jax.py            # the full run: 86M parameters in 152 tensors
    python benchmarks/bench_jax.py --quick    # a smoke check on a narrow, shallow ViT

Each optimizer's ``update`` is jitted on its own; then, ``--repeats`` times, every
optimizer in turn runs ``--iters`` timed steps (interleaved, so that a change in the
machine's load hits all of them alike). The table reports the median time per step
(and the fastest round's, less sensitive to other load on the machine) and the ratio
to the optax baseline of the same family:
``adam_ftp`` and ``adam_spd`` against ``optax.adamw``, ``sgd_ftp`` against
``optax.sgd(momentum=0.9)``. Two measurements per optimizer:

- ``update``: the jitted ``tx.update(grads, state, params)`` alone;
- ``step``: ``update`` then ``optax.apply_updates``, jitted together with the
  parameters and the state donated, as a training loop runs it.

Parameters and gradients are float32, with PyTorch's ``(out, in)`` layout for the
linear weights (FTP's MARS norm is per row of the first axis).

**The floor.** The donated step is bound by memory traffic: counting full-size reads and
writes per value, ``optax.adamw`` makes 7 (θ, g, m, v in; θ, m, v out) and
``optax.sgd(momentum=0.9)`` 5; ``adam_spd`` needs 11, ``adam_ftp`` 12 and ``sgd_ftp`` 10 (as
the PyTorch steps: one sweep for the base step and the reductions, one for the decay or the
projection). ``floor`` is a row's count over its baseline's; ``ratio / floor`` says how far
from it XLA's fusion of the step is.
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from tether.adapters import jax as tj


def vit_shapes(width=768, depth=12, mlp=3072, patch=16, tokens=197, classes=1000):
    """The parameter shapes of a ViT-B/16 (timm's names and PyTorch's layout)."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (width,), b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,), b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,),
        })  # fmt: skip
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    shapes.update({"head.weight": (classes, width), "head.bias": (classes,)})
    return shapes


def shapes_for(quick):
    return vit_shapes(width=192, depth=2, mlp=768, classes=100) if quick else vit_shapes()


#: Full-size reads and writes per value of each donated step (see the module's docstring).
PASSES = {
    "optax.adamw": 7,
    "tether adam_ftp": 12,
    "tether adam_spd": 11,
    "optax.sgd(momentum=0.9)": 5,
    "tether sgd_ftp": 10,
}


def floor(name, baseline):
    """The least ratio to the baseline that memory traffic allows (`PASSES`)."""
    return PASSES[name] / PASSES[baseline] if baseline else 1.0


def optimizers():
    """(name, baseline name, transformation) in the order of the table."""
    return [
        ("optax.adamw", None, optax.adamw(1e-4, weight_decay=0.05)),
        ("tether adam_ftp", "optax.adamw", tj.adam_ftp(1e-4, weight_decay=0.05)),
        ("tether adam_spd", "optax.adamw", tj.adam_spd(1e-4, weight_decay=0.5)),
        ("optax.sgd(momentum=0.9)", None, optax.sgd(1e-2, momentum=0.9)),
        ("tether sgd_ftp", "optax.sgd(momentum=0.9)", tj.sgd_ftp(1e-2, momentum=0.9)),
    ]


def make_tree(shapes, key, scale):
    keys = jax.random.split(key, len(shapes))
    return {
        n: scale * jax.random.normal(k, s, jnp.float32)
        for (n, s), k in zip(shapes.items(), keys, strict=True)
    }


def tree_bytes(tree):
    """The bytes of every array leaf of a pytree (an optax state)."""
    return sum(
        int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")
    )


class Runner:
    """One optimizer's compiled update and step, with its live state.

    ``with_update=False`` compiles only the donated step (what `tether bench` times).
    """

    def __init__(self, tx, params, grads, with_update=True):
        self.grads = grads
        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        self.update = jax.jit(tx.update)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step, donate_argnums=(0, 1))
        # compile both and take one step, so that the timed steps see a mid-run state
        if with_update:
            jax.block_until_ready(self.update(self.grads, self.state, self.params))
        self.params, self.state = jax.block_until_ready(self.step(self.params, self.state, self.grads))

    def time_update(self, iters):
        start = time.perf_counter()
        for _ in range(iters):
            out = self.update(self.grads, self.state, self.params)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / iters

    def time_step(self, iters):
        start = time.perf_counter()
        for _ in range(iters):
            self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)
        return (time.perf_counter() - start) / iters


def setup(quick, device=None):
    """The shapes and the parameter and gradient trees (on ``device``, a `jax.Device`, if given)."""
    shapes = shapes_for(quick)
    key_params, key_grads = jax.random.split(jax.random.key(0))
    params = make_tree(shapes, key_params, 0.02)
    grads = make_tree(shapes, key_grads, 1e-3)
    if device is not None:
        params, grads = jax.device_put(params, device), jax.device_put(grads, device)
    return shapes, params, grads


# --- for `tether bench` ---------------------------------------------------------------------------------


def measure(quick: bool, device: str, repeats: int | None = None, iters: int | None = None) -> list[dict]:
    """One row per tether transformation against its optax baseline (see `tether bench`).

    The time is the donated ``update + apply_updates`` step; the ratio is the ratio of the medians.
    """
    repeats = repeats or (5 if quick else 7)  # quick rounds are cheap next to compiling: take more
    iters = iters or (2 if quick else 3)
    _, params, grads = setup(quick, jax.devices(device)[0])
    count = sum(int(p.size) for p in jax.tree.leaves(params))
    entries = optimizers()
    runners = {name: Runner(tx, params, grads, with_update=False) for name, _, tx in entries}
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name].append(runner.time_step(iters))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return [
        {
            "backend": "jax",
            "device": device,
            "optimizer": name.removeprefix("tether "),
            "baseline": baseline,
            "ms": ms[name],
            "baseline_ms": ms[baseline],
            "ratio": ms[name] / ms[baseline],
            "ratio_kind": "ratio of medians",
            "floor": floor(name, baseline),
            "state_bytes_per_param": tree_bytes(runners[name].state) / count,
            "baseline_state_bytes_per_param": tree_bytes(runners[baseline].state) / count,
            "params": count,
            "repeats": repeats,
            "iters": iters,
        }
        for name, baseline, _ in entries
        if baseline
    ]


# --- the script (benchmarks/bench_jax.py) -------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a narrow, shallow ViT and few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per round (default 3, quick 2)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    iters = args.iters or (2 if args.quick else 3)
    shapes, params, grads = setup(args.quick)
    count = sum(int(p.size) for p in jax.tree.leaves(params))
    print(
        f"# {count / 1e6:.1f}M parameters in {len(shapes)} tensors (float32); "
        f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}; {repeats} rounds x {iters} steps, interleaved"
    )

    entries = optimizers()
    runners = {}
    for name, _, tx in entries:
        runners[name] = Runner(tx, params, grads)
    times = {name: {"update": [], "step": []} for name, _, _ in entries}
    for _ in range(repeats):
        for name, _, _ in entries:
            times[name]["update"].append(runners[name].time_update(iters))
            times[name]["step"].append(runners[name].time_step(iters))

    for label, reduce in (("median", statistics.median), ("fastest round", min)):
        summary = {name: {k: reduce(v) for k, v in t.items()} for name, t in times.items()}
        print(f"\n{label} over {repeats} rounds:\n")
        print(
            "| optimizer | update (ms) | vs optax | update + apply, donated (ms) | vs optax | floor "
            "| ratio / floor |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, baseline, _ in entries:
            cells = [name]
            for kind in ("update", "step"):
                ms = 1e3 * summary[name][kind]
                ratio = summary[name][kind] / summary[baseline][kind] if baseline else 1.0
                cells += [f"{ms:.1f}", f"{ratio:.2f}x"]
            cells += [f"{floor(name, baseline):.2f}x", f"{ratio / floor(name, baseline):.2f}"]
            print("| " + " | ".join(cells) + " |")
    return 0
