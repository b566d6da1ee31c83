"""The step traces under torch.compile(fullgraph=True): no graph break, no host read; with a tensor
``lr`` and a scheduler, PyTorch's recipe compiles one graph that no learning rate recompiles."""

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch_helpers import BUILDERS, require_kernels, snippet

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, SGDFTP, SPD, AdamFTP, AdamSPD

# inductor's imports use torch.jit.script_method, deprecated in this torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class PlainSGD(torch.optim.Optimizer):
    """A base optimizer whose step traces: torch.optim's own steps graph-break on purpose
    (``_use_grad_for_differentiable``), so a wrapper around them compiles, but not fullgraph."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if isinstance(group["lr"], torch.Tensor):
                torch._foreach_add_(params, torch._foreach_mul(grads, -group["lr"]))
            else:
                torch._foreach_add_(params, grads, alpha=-group["lr"])


COMPILABLE = {
    **{kind: BUILDERS[kind] for kind in ("AdamFTP", "SGDFTP", "AdamSPD")},
    "FTP": lambda groups: FTP(PlainSGD(groups, lr=0.05), k=0.7),
    "SPD": lambda groups: SPD(PlainSGD(groups, lr=0.05), weight_decay=0.5),
}


def _compiled_matches_eager(kind, backend, steps=3):
    torch.manual_seed(0)
    eager_net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    compiled_net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    compiled_net.load_state_dict(eager_net.state_dict())
    groups = lambda net: [  # noqa: E731
        {"params": net[0].parameters()},
        {"params": net[1].weight, "anchor": "zero"},
        {"params": net[1].bias, "anchor": None},
    ]
    eager, compiled = COMPILABLE[kind](groups(eager_net)), COMPILABLE[kind](groups(compiled_net))
    step = torch.compile(compiled.step, backend=backend, fullgraph=True)
    for t in range(steps):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
        for net in (eager_net, compiled_net):
            for p in net.parameters():
                p.grad = None
            net(x).pow(2).sum().backward()
        eager.step()
        step()
    for a, b in zip(eager_net.parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", ["kernels", "whole", "row_blocks"])
@pytest.mark.parametrize("kind", sorted(COMPILABLE))
def test_fullgraph_eager_backend(kind, blocks, monkeypatch):
    # a traced step never calls the C kernels; "kernels": the eager steps do
    if blocks == "kernels":
        require_kernels()
    else:
        monkeypatch.setattr(_torch_ops, "_kernels", None)
    if blocks == "row_blocks":  # the CPU's single pass, a row at a time
        monkeypatch.setattr(_torch_ops, "BLOCK", 1)
    torch._dynamo.reset()
    _compiled_matches_eager(kind, "eager")


def test_fullgraph_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("AdamSPD", "inductor", steps=2)


#: Schedulers that change ``lr`` at every step (OneCycleLR, as its betas or momentum would too).
SCHEDULERS = {
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=6),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=20, cycle_momentum=False
    ),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t)),
}
TENSOR_LR = {
    "AdamFTP": lambda groups: AdamFTP(groups, lr=torch.tensor(0.05), weight_decay=0.01, amsgrad=True, k=0.5),
    "SGDFTP": lambda groups: SGDFTP(groups, lr=torch.tensor(0.05), momentum=0.9, weight_decay=0.001, k=0.8),
    "AdamSPD": lambda groups: AdamSPD(groups, lr=torch.tensor(0.05), weight_decay=1.0),
    "FTP": lambda groups: FTP(PlainSGD(groups, lr=torch.tensor(0.05)), k=0.7),
    "SPD": lambda groups: SPD(PlainSGD(groups, lr=torch.tensor(0.05)), weight_decay=0.5),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("kind", sorted(TENSOR_LR))
def test_a_scheduled_tensor_lr_compiles_once(kind, scheduler):
    """PyTorch's recipe: ``opt.step()`` and ``scheduler.step()`` in one compiled function, a tensor lr.

    A float lr was a constant of the graph: each new value recompiled it, until torch gave up
    (``FailOnRecompileLimitHit`` under fullgraph). The scheduler's own code is not traced by
    torch (``lr_scheduler.py`` is skipped), so the function is not one graph, but the step is.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    compiled_net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    compiled_net.load_state_dict(eager_net.state_dict())
    groups = lambda net: [{"params": net[0].parameters()}, {"params": net[1].parameters()}]  # noqa: E731
    eager, compiled = TENSOR_LR[kind](groups(eager_net)), TENSOR_LR[kind](groups(compiled_net))
    eager_scheduler, compiled_scheduler = SCHEDULERS[scheduler](eager), SCHEDULERS[scheduler](compiled)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def step():
        compiled.step()
        compiled_scheduler.step()

    rates = set()
    for t in range(10):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
        for net in (eager_net, compiled_net):
            net.zero_grad()
            net(x).pow(2).sum().backward()
        eager.step()
        eager_scheduler.step()
        step()
        rates.add(float(compiled.param_groups[0]["lr"]))
    assert len(rates) > 5  # the scheduler did change lr
    assert counter.frame_count == 1  # one graph, never recompiled
    for a, b in zip(eager_net.parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # eager takes the C kernels, a graph cannot
    assert float(compiled.param_groups[0]["lr"]) == float(eager.param_groups[0]["lr"])


#: torch.optim's optimizer of the same kind, with a tensor lr.
TORCH_OPTIM = {
    "AdamFTP": lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.05), foreach=True, capturable=True),
    "AdamSPD": lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.05), foreach=True, capturable=True),
    "SGDFTP": lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.05), momentum=0.9),
}


def _cycled_momentum_frames(make, steps=12):
    """Graphs compiled for ``make``'s optimizer under OneCycleLR, which writes a new float momentum
    (``betas[0]`` or ``momentum``) at every step; and the parameters."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = make(net.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    counter = CompileCounter()

    def step():
        opt.step()
        scheduler.step()

    compiled = torch.compile(step, backend=counter)
    for t in range(steps):
        opt.zero_grad()
        net(torch.randn(5, 4, generator=torch.Generator().manual_seed(t))).pow(2).sum().backward()
        compiled()
    return counter.frame_count, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("kind", sorted(TORCH_OPTIM))
def test_a_momentum_cycling_scheduler_compiles_as_for_torch_optim(kind):
    """One recompilation, after which the momentum is an input of the graph: as many graphs as
    torch.optim's (a check with math.isfinite on that input broke the step in three)."""
    frames, params = _cycled_momentum_frames(TENSOR_LR[kind])
    torch_frames, _ = _cycled_momentum_frames(TORCH_OPTIM[kind])
    assert frames <= torch_frames <= 2
    with torch.compiler.set_stance("force_eager"):
        _, eager = _cycled_momentum_frames(TENSOR_LR[kind])
    for a, b in zip(params, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_pages_compiled_step_is_one_graph(monkeypatch):
    """docs/scale.md's snippet, compiled and eager (``torch.compile`` taken out) on the same data."""
    runs = []
    for compiled in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(5, 4, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(12)]
        counter = CompileCounter()
        compile_ = functools.partial(torch.compile, backend=counter) if compiled else lambda fn: fn
        monkeypatch.setattr(torch, "compile", compile_)
        namespace = {"model": model, "batches": batches, "loss_fn": torch.nn.functional.mse_loss}
        exec(snippet("compile"), namespace)
        monkeypatch.undo()
        runs.append([p.detach().clone() for p in model.parameters()])
        if compiled:
            assert counter.frame_count == 1
            rates = namespace["scheduler"].get_last_lr()
    assert rates[0] < 1e-3  # the scheduler moved lr
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
