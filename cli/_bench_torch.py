"""Step time and state memory of tether's torch optimizers against torch.optim's fused baselines.

ViT-B/16-shaped parameters (150 tensors, 85.8M values, float32, random gradients). Each
optimizer has its own copy of the parameters; the steps are interleaved (one step of each,
in turn, ``--repeats`` times) so that the noise of a shared machine hits all alike, and the
table reports the median time per step (wall clock, and the process's CPU time, which a
busy shared machine disturbs less) and the median over rounds of its ratio to the
baseline's step in the same round. The baseline is what a user who cares about speed
picks, ``torch.optim.AdamW(fused=True)`` and ``SGD(fused=True)``; the foreach
implementations are a second column.

**The floor.** A step over a large model is bound by memory traffic. Counting the
full-size reads and writes per value: fused AdamW reads θ, g, m, v and writes θ, m, v (7);
fused SGD with momentum 5. AdamSPD needs 11 (one sweep updates the moments, writes
θ̃ − θ₀ and takes ⟨g, θ − θ₀⟩, ‖θ − θ₀‖ and ‖θ̃ − θ₀‖; a second decays), AdamFTP 12 (the
sweep also reads c_prev and writes c; the projection reads θ₀ and c and writes θ), SGDFTP
10, ``FTP(AdamW(fused))`` 15 (AdamW's 7; the sweep reads θ̃, g, θ₀ and c_prev and writes c; the
projection) and ``SPD(Adam(fused))`` 15 where every tensor decays, 12 where none does (its decay
pass is skipped then): here the gradient is the same at every step, Adam moves every tensor
against it, and none decays. Each row's ``floor`` is its count over its baseline's: the least
ratio of a step made of these two sweeps per tensor.

**The traffic here.** A CPU core does not pay every pass alike. On a 2-core EPYC a pass that
reads a tensor costs about 12 ms per ViT-B/16's 85.8M float32 values, writing back a tensor
that the same sweep read costs about 1 ms more, and a streaming store (of a tensor that is not
read) about 5 ms: one core's reads are what bounds it. ``traffic here`` weighs each step's
passes (`LINES`: the full-size tensors it reads, writes back, and writes by streaming stores)
by those three costs, measured on this machine before the steps (`line_costs`), over the
baseline's: the ratio that this design's memory traffic alone takes here, where ``floor``
counts every pass as one.

    python benchmarks/bench_torch.py            # the full ViT-B/16 shapes (about 6 GB of memory)
    python benchmarks/bench_torch.py --quick    # 2 blocks of width 256: a smoke check
    python benchmarks/bench_torch.py --model lora   # LoRA's adapters of a 7B decoder: 256 tensors, rows of 8
    python benchmarks/bench_torch.py --threads 1 --dtype float64
    python benchmarks/bench_torch.py --device cuda

`measure` gives the same figures as rows for `tether bench`.
"""

import argparse
import ctypes
import ctypes.util
import statistics
import sys
import time

import torch

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD

#: The two families: each a dict whose first entry is the baseline of the others and whose
#: second is torch.optim's foreach implementation (the second column).
ADAM = {
    "torch AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, fused=True),
    "torch AdamW(foreach)": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, foreach=True),
    "AdamSPD": lambda p: AdamSPD(p, lr=1e-4, weight_decay=1.0),
    "AdamFTP": lambda p: AdamFTP(p, lr=1e-4, weight_decay=0.01),
    "FTP(AdamW(fused))": lambda p: FTP(torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, fused=True)),
    "SPD(Adam(fused))": lambda p: SPD(torch.optim.Adam(p, lr=1e-4, fused=True), weight_decay=1.0),
}
SGD = {
    "torch SGD(momentum=0.9, fused)": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "torch SGD(momentum=0.9, foreach)": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True),
    "SGDFTP": lambda p: SGDFTP(p, lr=1e-2, momentum=0.9),
}
#: Full-size reads and writes per value of each step (see the module's docstring).
PASSES = {
    "torch AdamW(fused)": 7,
    "torch AdamW(foreach)": 7,
    "AdamSPD": 11,
    "AdamFTP": 12,
    "FTP(AdamW(fused))": 15,
    "SPD(Adam(fused))": 12,  # no tensor decays here (a fixed gradient); 15 where all do
    "torch SGD(momentum=0.9, fused)": 5,
    "torch SGD(momentum=0.9, foreach)": 5,
    "SGDFTP": 10,
}
#: The full-size tensors each step moves on the CPU (the C kernels' passes): how many it reads, how
#: many of those it writes back (written after the same sweep read them), and how many it writes by
#: streaming stores without reading them (FTP's projection writes θ so).
LINES = {
    "torch AdamW(fused)": (4, 3, 0),  # reads θ, g, m, v; writes θ, m, v
    "AdamSPD": (7, 4, 0),  # the sweep: θ, g, m, v, θ₀ (θ, m, v written); the decay: θ, θ₀ (θ)
    "AdamFTP": (8, 3, 1),  # the sweep: θ, g, m, v, θ₀, c_prev (m, v, c); the projection: θ₀, c (θ streamed)
    "FTP(AdamW(fused))": (10, 4, 1),  # AdamW; the sweep: θ̃, g, θ₀, c_prev (c); the projection
    "SPD(Adam(fused))": (9, 3, 0),  # before: θ, g, θ₀; Adam; after: θ̃, θ₀ (no tensor decays here)
    "torch SGD(momentum=0.9, fused)": (3, 2, 0),  # reads θ, g, b; writes θ, b
    "SGDFTP": (7, 2, 1),  # the sweep: θ, g, b, θ₀, c_prev (b, c); the projection
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def steady_malloc():
    """Make glibc's ``malloc`` reuse freed memory: no page faults for per-step temporaries.

    ``torch.optim.AdamW(foreach=True)`` allocates its denominators (the model's size) at every
    step. By default glibc may return them to the system and fault fresh pages in at the
    next step (83,000 faults per ViT-B/16 step, about half of AdamW's time), or may not,
    depending on the process's allocation history, so AdamW's step time flips between
    about 160 and 300 ms from one process to the next. Fixing the mmap and trim thresholds
    (``mallopt``) gives every optimizer its fault-free time: the baseline at its best.
    Returns whether it could (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # (mallopt takes a C int: 2 GiB - 1 is the largest trim threshold it can set)
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def kernels_state():
    """Whether FTP's CPU steps run the C kernels: "on", or "off" and why."""
    if _torch_ops._kernels is not None:
        return "on"
    try:
        from tether.adapters import _kernels  # noqa: F401
    except ImportError:
        return "off (not built)"
    return "off (--no-kernels)"


def vit_shapes(depth=12, width=768, mlp=3072, patch=16, tokens=197):
    """The parameter shapes of a ViT-B/16 backbone (no classification head)."""
    shapes = [(width, 3, patch, patch), (width,), (1, 1, width), (1, tokens, width)]
    for _ in range(depth):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (mlp, width), (mlp,), (width, mlp), (width,)]
    return [*shapes, (width,), (width,)]


def lora_shapes(layers=32, width=4096, rank=8, targets=4):
    """The adapters of LoRA at rank ``rank`` (PEFT's default, 8) on the q, k, v and o projections of
    a LLaMA-7B-sized decoder: each target's A ``(rank, width)`` and B ``(width, rank)``, as PEFT's
    ``lora_A`` and ``lora_B`` weights (B's rows, MARS's rows, are ``rank`` values wide)."""
    return [(rank, width), (width, rank)] * (layers * targets)


#: ``--model``: the parameter shapes, full size and under ``--quick``.
MODELS = {
    "vit-b16": (vit_shapes, dict(depth=2, width=256, mlp=1024)),
    "lora": (lora_shapes, dict(layers=2, width=256, rank=8)),
}


def shapes_for(quick, model="vit-b16"):
    """The parameter shapes of ``model`` (a key of `MODELS`), small under ``quick``."""
    make, small = MODELS[model]
    return make(**small) if quick else make()


def make_params(shapes, grads, device):
    params = []
    for shape, g in zip(shapes, grads, strict=True):
        p = torch.nn.Parameter((torch.randn(shape, device=device) * 0.02).to(g.dtype))
        p.grad = g
        params.append(p)
    return params


def state_bytes(opt):
    """The bytes of every tensor in ``opt.state`` (step counts included), a wrapper's and its base's."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    base = getattr(opt, "optimizer", None)
    return total + (state_bytes(base) if isinstance(base, torch.optim.Optimizer) else 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(builders, shapes, device, repeats, warmup, dtype=torch.float32):
    """``{name: (median wall s, wall ratio, median CPU s, CPU ratio, state bytes, foreach wall ratio)}``.

    The ratios are to the first of ``builders`` (the last one to the second, the foreach
    baseline): the median over rounds of the per-round ratio.
    """
    grads = [(torch.randn(s, device=device) * 1e-3).to(dtype) for s in shapes]
    opts = {name: build(make_params(shapes, grads, device)) for name, build in builders.items()}
    wall = {name: [] for name in opts}
    cpu = {name: [] for name in opts}
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    for _ in range(repeats):
        for name, opt in opts.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.step()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    base, foreach = list(opts)[:2]

    def ratio(times, name, to):
        # the ratio to the baseline's step of the same round, then the median over rounds:
        # a shared machine's load drifts between rounds far more than within one
        return statistics.median(a / b for a, b in zip(times[name], times[to], strict=True))

    result = {}
    for name in opts:
        result[name] = (
            statistics.median(wall[name]),
            ratio(wall, name, base),
            statistics.median(cpu[name]),
            ratio(cpu, name, base),
            state_bytes(opts[name]),
            ratio(wall, name, foreach),
        )
    del opts
    return result


def floor(name, builders):
    """The least ratio to the family's baseline that memory traffic allows (`PASSES`)."""
    return PASSES[name] / PASSES[next(iter(builders))]


def line_costs(shapes, device, repeats, dtype=torch.float32):
    """``{"read", "write_back", "stream"}``: the seconds of one pass of each kind over tensors of
    ``shapes`` on this machine, or ``None`` (not a CPU, or no C kernels: no streaming stores).

    A read is ``torch.sum``; a write-back is ``mul_(1.0)`` (a read and its write) less a read;
    a streaming store is FTP's projection of ``c`` with a zero anchor (``c`` read, ``θ`` written
    by streaming stores where the tensor is large enough, as in a step) less a read. The three
    are interleaved over ``repeats`` rounds; each is the median.
    """
    if device.type != "cpu" or _torch_ops._kernels is None or dtype not in _torch_ops._KERNEL_DTYPES:
        return None
    stats = _torch_ops.statistics_dtype(dtype)
    xs = [torch.randn(s).to(dtype) for s in shapes]
    outs = [torch.empty_like(x) for x in xs]
    row_sums = [torch.ones(_torch_ops._rows_cols(x)[0], dtype=stats) for x in xs]
    states = [{"prev_inv_norm": torch.empty_like(n)} for n in row_sums]
    radii, anchors = torch.ones(len(xs), dtype=stats), [None] * len(xs)
    passes = {
        "read": lambda: [x.sum() for x in xs],
        "read_write": lambda: [x.mul_(1.0) for x in xs],
        # radius 1, row sums 1: θ ← c / (1 + 1e-8) (c in float32), as FTP's projection writes θ
        "stream": lambda: _torch_ops._ftp_project_kernels_(outs, anchors, xs, row_sums, radii, states),
    }
    times = {name: [] for name in passes}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run_pass in passes.items():
            start = time.perf_counter()
            run_pass()
            times[name].append(time.perf_counter() - start)
    read, read_write, stream = (statistics.median(times[name][1:]) for name in passes)
    return {"read": read, "write_back": max(read_write - read, 0.0), "stream": max(stream - read, 0.0)}


def traffic(name, builders, costs):
    """`LINES` of ``name`` at ``costs`` (`line_costs`) over its family's baseline's; ``None`` without them."""
    if costs is None or name not in LINES:
        return None

    def seconds(lines):
        reads, write_backs, streamed = lines
        return reads * costs["read"] + write_backs * costs["write_back"] + streamed * costs["stream"]

    return seconds(LINES[name]) / seconds(LINES[next(iter(builders))])


# --- for `tether bench` ---------------------------------------------------------------------------------


def measure(quick: bool, device: str, repeats: int | None = None, warmup: int = 2) -> list[dict]:
    """One row per tether optimizer (and torch's foreach one) against torch.optim's fused baseline."""
    steady_malloc()
    shapes = shapes_for(quick)
    repeats = repeats or (5 if quick else 9)
    n = sum(torch.Size(s).numel() for s in shapes)
    costs = None if quick else line_costs(shapes, torch.device(device), repeats)  # quick: all in cache
    rows = []
    for builders in (ADAM, SGD):
        result = run(builders, shapes, torch.device(device), repeats, warmup)
        base = next(iter(builders))
        for name, (seconds, ratio, cpu_seconds, cpu_ratio, nbytes, foreach_ratio) in result.items():
            if name == base:
                continue
            rows.append(
                {
                    "backend": "torch",
                    "device": device,
                    "optimizer": name,
                    "baseline": base,
                    "ms": seconds * 1e3,
                    "baseline_ms": result[base][0] * 1e3,
                    "ratio": ratio,
                    "ratio_kind": "median of per-round ratios",
                    "foreach_ratio": None if "foreach" in name else foreach_ratio,
                    "floor": floor(name, builders),
                    "traffic_ratio": traffic(name, builders, costs),
                    "state_bytes_per_param": nbytes / n,
                    "baseline_state_bytes_per_param": result[base][4] / n,
                    "cpu_ms": cpu_seconds * 1e3,
                    "cpu_ratio": cpu_ratio,
                    "params": n,
                    "repeats": repeats,
                    "threads": torch.get_num_threads(),
                    "kernels": kernels_state(),
                }
            )
    return rows


# --- the script (benchmarks/bench_torch.py) -----------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="small shapes: 2 blocks (layers) of width 256 (a smoke check)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the parameters and state")
    ap.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="vit-b16",
        help="the parameters: a ViT-B/16 backbone, or LoRA's adapters (rank 8 on q, k, v, o) of a "
        "LLaMA-7B-sized decoder (256 tensors, 8.4M values, B's rows 8 values wide)",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (AdamW's step time then depends on the process's history)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (on a shared machine, 1 avoids OpenMP barrier stalls that dwarf the work)",
    )
    ap.add_argument(
        "--no-kernels",
        action="store_true",
        help="the PyTorch single pass instead of the C kernels (adapters/_kernels.c) for FTP's CPU steps",
    )
    args = ap.parse_args(argv)
    if args.no_kernels:
        _torch_ops._kernels = None
    steady = not args.default_malloc and steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = shapes_for(args.quick, args.model)
    repeats = args.repeats or (5 if args.quick else 9)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"{args.model}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters, {args.dtype}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {repeats} interleaved steps, "
        f"malloc {'steady (mallopt)' if steady else 'default'}, C kernels {kernels_state()}"
    )
    costs = None if args.quick else line_costs(shapes, device, repeats, DTYPES[args.dtype])  # quick: in cache
    if costs is not None:
        print(
            "one pass over every tensor: a read {read:.1f} ms, a write-back {write_back:.1f} ms, "
            "a streaming store {stream:.1f} ms".format(**{k: v * 1e3 for k, v in costs.items()})
        )
    print(
        "| optimizer | wall (ms) | wall vs base | floor | traffic here | vs foreach | CPU (ms) | CPU vs base "
        "| state (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for builders in (ADAM, SGD):
        result = run(builders, shapes, device, repeats, args.warmup, DTYPES[args.dtype])
        for name, (seconds, wall_ratio, cpu_seconds, cpu_ratio, nbytes, foreach_ratio) in result.items():
            versus_foreach = "" if "foreach" in name else f"{foreach_ratio:.2f}x"
            here = traffic(name, builders, costs)
            print(
                f"| {name} | {seconds * 1e3:.1f} | {wall_ratio:.2f}x | {floor(name, builders):.2f}x "
                f"| {'' if here is None else f'{here:.2f}x'} | {versus_foreach} | {cpu_seconds * 1e3:.1f} "
                f"| {cpu_ratio:.2f}x | {nbytes / 2**20:.0f} |"
            )
    return 0
