"""One rank of test_torch_distributed.py's runs: 2 gloo ranks on the CPU, float64.

    python torch_dist_child.py PHASE RANK WORLD STORE OUT

``STORE`` is the file of the ranks' rendezvous (``init_method="file://..."``), ``OUT`` a folder
for the results. Phases:

- ``parity``: every class under FSDP2, on DTensors made with ``distribute_tensor``, under DDP and
  under ``ZeroRedundancyOptimizer``, each beside a single-process run of the same data (rank 0
  writes ``OUT/parity.pt``: the distributed run's parameters, gathered, and the single
  process's); each on the CPU's path and on the accelerators' (no scratch, no C kernels). The
  snippets of ``docs/scale.md`` the same way; what each class says to FSDP1's flattened
  parameters (``OUT/fsdp1.pt``) and to a state dict of plain tensors.
- ``save``: every class under DDP and FSDP2 runs `SPLIT` steps, saves with
  ``torch.distributed.checkpoint`` (the page's snippet), runs to `STEPS`; each rank writes its
  shards of the parameters and state (``OUT/{mode}-{kind}-{rank}.expected.pt``).
- ``load``: fresh processes build another model and optimizer, load the checkpoint (the page's
  snippet), run from `SPLIT` to `STEPS` and write ``OUT/{mode}-{kind}-{rank}.resumed.pt``.
"""

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.optim
import torch.nn.parallel
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch_helpers import BUILDERS, make_params, named_groups, set_grads, snippet

from tether.adapters import _torch_ops
from tether.adapters import torch as tether_torch
from tether.adapters.torch import FTP, L2SP, MARSSP, SGDFTP, SPD, AdamFTP, AdamSPD
from tether.core.reference import closed_loop_problem

STEPS, SPLIT = 5, 2
#: Rows that two ranks split unevenly, and a one-row layer whose second shard is empty.
SIZES = (6, 5, 3, 1)
#: Placements of the `distribute_tensor` run: rows split (unevenly, and one shard empty), a
#: matrix split along the axis MARS sums over, a vector split, a replicated scalar and matrix.
SHAPES = {
    "conv.weight": (5, 3, 3, 3),
    "fc.weight": (8, 11),
    "fc.bias": (7,),
    "scale": (),
    "head.weight": (4, 8),
    "tail.weight": (1, 4),
}
PLACEMENTS = {
    "conv.weight": Shard(0),
    "fc.weight": Shard(1),
    "fc.bias": Shard(0),
    "scale": Replicate(),
    "head.weight": Replicate(),
    "tail.weight": Shard(0),
}
PATHS = ("cpu", "accelerator")


def model(seed=0):
    torch.manual_seed(seed)
    a, b, c, d = SIZES
    return torch.nn.Sequential(
        torch.nn.Linear(a, b),
        torch.nn.LayerNorm(b),
        torch.nn.GELU(),
        torch.nn.Linear(b, c),
        torch.nn.GELU(),
        torch.nn.Linear(c, d),
    ).double()


def groups(net):
    """Named groups: everything anchored at its start but the last bias, which is unanchored."""
    named = list(net.named_parameters())
    last = named[-1][0]
    return [
        {"params": [(n, p) for n, p in named if n != last]},
        {"params": [(n, p) for n, p in named if n == last], "anchor": None},
    ]


def batch(t, rank):
    return torch.randn(
        4, SIZES[0], generator=torch.Generator().manual_seed(100 * t + rank), dtype=torch.float64
    )


def train(net, opt, start, stop, ranks, collectives=None):
    """Steps ``start..stop`` on the batches of ``ranks`` (the loss is their mean, as DDP and FSDP average).

    ``collectives``: a list that receives the number of all-reduces of each ``opt.step()``.
    """
    for t in range(start, stop):
        opt.zero_grad()
        x = torch.cat([batch(t, r) for r in ranks])
        net(x).pow(2).mean().backward()
        if collectives is None:
            opt.step()
            continue
        with CountedAllReduce() as counted:
            opt.step()
        collectives.append(counted.calls)


class CountedAllReduce:
    """Counts the calls of ``torch.distributed.all_reduce`` in its block."""

    def __enter__(self):
        self.calls, self.all_reduce = 0, dist.all_reduce
        dist.all_reduce = self
        return self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.all_reduce(*args, **kwargs)

    def __exit__(self, *exc):
        dist.all_reduce = self.all_reduce


def full(p):
    return p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p


class accelerator_path:
    """The multi-tensor path that accelerators take, on the CPU: no scratch, no C kernels."""

    def __enter__(self):
        self.saved = tether_torch._Anchored._scratch_for, _torch_ops._kernels
        tether_torch._Anchored._scratch_for = lambda self, params: None
        _torch_ops._kernels = None

    def __exit__(self, *exc):
        tether_torch._Anchored._scratch_for, _torch_ops._kernels = self.saved


def on_path(path, run, *args):
    if path == "cpu":
        return run(*args)
    with accelerator_path():
        return run(*args)


def reference(kind):
    """The single-process run of the model runs: both ranks' batches in one."""
    net = model()
    train(net, BUILDERS[kind](groups(net)), 0, STEPS, ranks=(0, 1))
    return [p.detach().clone() for p in net.parameters()]


def fsdp2_run(kind, mesh, rank, collectives=None):
    net = model()
    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    train(net, BUILDERS[kind](groups(net)), 0, STEPS, ranks=(rank,), collectives=collectives)
    return [full(p).detach().clone() for p in net.parameters()]


def ddp_run(kind, rank):
    net = model()
    ddp = DistributedDataParallel(net)
    train(ddp, BUILDERS[kind](groups(net)), 0, STEPS, ranks=(rank,))
    return [p.detach().clone() for p in net.parameters()]


#: ``ZeroRedundancyOptimizer`` builds each rank's optimizer from a class and keyword arguments.
ZERO = {
    "AdamFTP": (AdamFTP, dict(lr=0.05, eps=1e-8, weight_decay=0.01, amsgrad=True, k=0.5)),
    "SGDFTP": (SGDFTP, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.001, k=0.8)),
    "AdamSPD": (AdamSPD, dict(lr=0.05, eps=1e-8, weight_decay=1.0, amsgrad=True)),
    "FTP": (lambda ps, **kw: FTP(torch.optim.AdamW(ps, **kw), k=0.7), dict(lr=0.05, weight_decay=0.01)),
    "SPD": (lambda ps, **kw: SPD(torch.optim.Adam(ps, **kw), weight_decay=0.5), dict(lr=0.05)),
    "L2SP": (lambda ps, **kw: L2SP(torch.optim.Adam(ps, **kw), alpha=0.3), dict(lr=0.05)),
    "MARSSP": (lambda ps, **kw: MARSSP(torch.optim.SGD(ps, **kw), radius=0.5), dict(lr=0.05, momentum=0.9)),
}


def zero_run(kind, rank):
    """ZeRO-1 (each rank steps whole tensors of its own), one group: the builders' defaults."""
    net = model()
    ddp = DistributedDataParallel(net)
    cls, kwargs = ZERO[kind]
    train(ddp, ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, **kwargs), 0, STEPS, (rank,))
    return [p.detach().clone() for p in net.parameters()]


def zero_reference(kind):
    net = model()
    cls, kwargs = ZERO[kind]
    train(net, cls(net.parameters(), **kwargs), 0, STEPS, ranks=(0, 1))
    return [p.detach().clone() for p in net.parameters()]


def dtensor_problem():
    """The closed-loop problem on `SHAPES`, its noise large enough that the gradient often pushes
    away from the anchor (SPD decays only then)."""
    return closed_loop_problem(seed=3, steps=STEPS, shapes=SHAPES, noise_scale=2.0)


def dtensor_run(kind, mesh):
    """Parameters and gradients distributed with `PLACEMENTS`; the gradients of the closed-loop problem."""
    problem = dtensor_problem()
    params = {
        n: torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [PLACEMENTS[n]]))
        for n, p in make_params(problem).items()
    }
    opt = BUILDERS[kind](named_groups(params))
    for t in range(STEPS):
        for n, p in params.items():
            g = problem.gradient(n, full(p).detach().numpy(), t)
            p.grad = distribute_tensor(torch.tensor(g), mesh, [PLACEMENTS[n]])
        opt.step()
    return [full(p).detach().clone() for p in params.values()]


def dtensor_reference(kind):
    problem = dtensor_problem()
    params = make_params(problem)
    opt = BUILDERS[kind](named_groups(params))
    for t in range(STEPS):
        set_grads(params, problem, t)
        opt.step()
    return [p.detach().clone() for p in params.values()]


class patched:
    """Module attributes replaced within a block: ``(module, name, value)`` each."""

    def __init__(self, replacements):
        self.replacements = replacements

    def __enter__(self):
        self.saved = [(module, name, getattr(module, name)) for module, name, _ in self.replacements]
        for module, name, value in self.replacements:
            setattr(module, name, value)

    def __exit__(self, *exc):
        for module, name, value in self.saved:
            setattr(module, name, value)


#: What the distributed pieces of each snippet of docs/scale.md are in one process.
ONE_PROCESS = {
    "fsdp2": [(torch.distributed.fsdp, "fully_shard", lambda module: module)],
    "zero": [
        (torch.nn.parallel, "DistributedDataParallel", lambda module: module),
        (
            torch.distributed.optim,
            "ZeroRedundancyOptimizer",
            lambda params, optimizer_class, **kwargs: optimizer_class(params, **kwargs),
        ),
    ],
}


def docs_run(name, rank):
    """The page's snippet ``name`` makes ``model`` and ``optimizer``; the steps of the model runs."""
    namespace = {"model": model()}
    exec(snippet(name), namespace)
    train(namespace["model"], namespace["optimizer"], 0, STEPS, ranks=(rank,))
    return [full(p).detach().clone() for p in namespace["model"].parameters()]


def docs_reference(name):
    namespace = {"model": model()}
    with patched(ONE_PROCESS[name]):
        exec(snippet(name), namespace)
    train(namespace["model"], namespace["optimizer"], 0, STEPS, ranks=(0, 1))
    return [p.detach().clone() for p in namespace["model"].parameters()]


def plain_state_refused(rank, mesh):
    """What an optimizer of DTensor parameters says to a state dict of plain (gathered) tensors,
    and an optimizer of plain parameters to one of DTensors."""
    net = model()
    fully_shard(net, mesh=mesh)
    opt = BUILDERS["AdamFTP"](groups(net))
    train(net, opt, 0, 1, ranks=(rank,))
    sharded = opt.state_dict()
    plain = {**sharded, "state": {i: {k: full(v) for k, v in s.items()} for i, s in sharded["state"].items()}}
    messages = []
    for target, state_dict in ((opt, plain), (BUILDERS["AdamFTP"](groups(model())), sharded)):
        try:
            target.load_state_dict(state_dict)
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    return messages


def attempt(run, *args):
    """``run(*args)``, or the error it raised as text (the next cases still run, and report their own)."""
    try:
        return run(*args)
    except Exception:
        return traceback.format_exc()


def parity(rank, out):
    mesh = init_device_mesh("cpu", (2,))
    results, collectives = {}, {}
    for kind in BUILDERS:
        collectives[kind] = []
        for path in PATHS:
            counts = collectives[kind] if path == "cpu" else None
            results["fsdp2", kind, path] = attempt(on_path, path, fsdp2_run, kind, mesh, rank, counts)
            results["dtensor", kind, path] = attempt(on_path, path, dtensor_run, kind, mesh)
        results["ddp", kind, "cpu"] = attempt(ddp_run, kind, rank)
        results["zero", kind, "cpu"] = attempt(zero_run, kind, rank)
    for name in ONE_PROCESS:
        results["docs", name, "cpu"] = attempt(docs_run, name, rank)
    refusal = attempt(plain_state_refused, rank, mesh)
    if rank == 0:
        start = [p.detach().clone() for p in model().parameters()]
        problem = dtensor_problem()
        starts = {"dtensor": [p.detach().clone() for p in make_params(problem).values()]}
        references = {"zero": zero_reference, "dtensor": dtensor_reference, "docs": docs_reference}
        saved = {
            (mode, kind, path): (got, references.get(mode, reference)(kind), starts.get(mode, start))
            for (mode, kind, path), got in results.items()
        }
        torch.save({"runs": saved, "collectives": collectives, "refusal": refusal}, out / "parity.pt")
    fsdp1 = {}
    for use_orig_params in (False, True):
        net = FullyShardedDataParallel(
            model(), use_orig_params=use_orig_params, device_id=torch.device("cpu")
        )
        for kind in BUILDERS:
            try:
                BUILDERS[kind](net.parameters())
                fsdp1[kind, use_orig_params] = None
            except ValueError as error:
                fsdp1[kind, use_orig_params] = str(error)
    if rank == 0:
        torch.save(fsdp1, out / "fsdp1.pt")


# -- torch.distributed.checkpoint -----------------------------------------------------------------


def wrapped(mode, seed, mesh):
    """The model under ``mode`` (what the steps call) and the model itself (what the state dicts take)."""
    net = model(seed)
    if mode == "ddp":
        return DistributedDataParallel(net), net
    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, net


def local_snapshot(net, opt):
    """This rank's shards of every parameter and state tensor (the wrapped optimizer's too)."""
    local = lambda x: x.to_local() if isinstance(x, torch.distributed.tensor.DTensor) else x  # noqa: E731
    out = {f"param:{n}": local(p).detach().clone() for n, p in net.named_parameters()}
    for i, values in opt.state_dict()["state"].items():
        for k, v in values.items():
            for key, value in v.items() if k == "base" else [(k, v)]:
                if torch.is_tensor(value):
                    out[f"state:{i}:{k}:{key}"] = local(value).detach().clone()
    return out


def save(rank, out):
    mesh = init_device_mesh("cpu", (2,))
    for mode in ("ddp", "fsdp2"):
        for kind in BUILDERS:
            run, net = wrapped(mode, 0, mesh)
            opt = BUILDERS[kind](groups(net))
            train(run, opt, 0, SPLIT, ranks=(rank,))
            exec(snippet("dcp-save"), {"model": net, "optimizer": opt, "path": out / f"{mode}-{kind}"})
            train(run, opt, SPLIT, STEPS, ranks=(rank,))
            torch.save(local_snapshot(net, opt), out / f"{mode}-{kind}-{rank}.expected.pt")


def load(rank, out):
    mesh = init_device_mesh("cpu", (2,))
    for mode in ("ddp", "fsdp2"):
        for kind in BUILDERS:
            run, net = wrapped(mode, 1, mesh)  # another start: everything must come from the checkpoint
            opt = BUILDERS[kind](groups(net))
            exec(snippet("dcp-load"), {"model": net, "optimizer": opt, "path": out / f"{mode}-{kind}"})
            train(run, opt, SPLIT, STEPS, ranks=(rank,))
            torch.save(local_snapshot(net, opt), out / f"{mode}-{kind}-{rank}.resumed.pt")


if __name__ == "__main__":
    phase, rank, world, store, out = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        Path(sys.argv[5]),
    )
    torch.set_num_threads(1)  # two ranks on a CI runner's two cores
    # a rank that failed leaves the other waiting in a collective: not for gloo's 30 minutes
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        {"parity": parity, "save": save, "load": load}[phase](rank, out)
        dist.barrier()  # both ranks are done and their files written
    except BaseException:
        dist.destroy_process_group()
        raise
    # the work is done: skip the teardown, where gloo's threads sometimes abort the process
    # ("terminate called without an active exception", about 1 load in 10 here)
    sys.stdout.flush()
    os._exit(0)
