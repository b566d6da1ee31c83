"""The step traces under torch.compile(fullgraph=True): no graph break, no host read."""

import pytest
import torch
from torch_helpers import BUILDERS, require_kernels

from tether.adapters import _torch_ops
from tether.adapters.torch import FTP, SPD

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
            torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])


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
