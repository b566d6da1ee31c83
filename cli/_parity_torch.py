"""`tether parity` driver for PyTorch: `tether.adapters.torch` on every device torch sees."""

import numpy as np
import torch

from tether.adapters import torch as tt

from ._parity_cases import MLP, SameModel, full_hparams

DTYPES = {"float64": torch.float64, "float32": torch.float32}


FUSED = {"adam_ftp": tt.AdamFTP, "sgd_ftp": tt.SGDFTP, "adam_spd": tt.AdamSPD}


def build(case, params):
    """The case's optimizer over named parameters: one group of anchored tensors, one of free ones."""
    anchored = [p for n, p in params.items() if n not in case.unanchored]
    free = [p for n, p in params.items() if n in case.unanchored]
    # the wrappers take the group key "anchor" too; the fused classes take the case's hyperparameters
    groups = [{"params": anchored, "anchor": case.anchor}] + (
        [{"params": free, "anchor": None}] if free else []
    )
    h = full_hparams(case)
    if case.wrapper is None:
        return FUSED[case.kind](groups, **h)
    if case.wrapper == "spd":
        inner = torch.optim.Adam(groups, lr=h["lr"], betas=h["betas"], eps=h["eps"], amsgrad=h["amsgrad"])
        return tt.SPD(inner, weight_decay=h["weight_decay"])
    k = h.pop("k")
    if case.kind == "adam_ftp":  # AdamW's decoupled decay is Adam-FTP's wd term
        h.pop("amsgrad")
        return tt.FTP(torch.optim.AdamW(groups, **h), k=k)
    return tt.FTP(torch.optim.SGD(groups, **h), k=k)


def _mlp_loss(problem, params, dtype, device):
    x = torch.as_tensor(problem.x, dtype=dtype, device=device)
    y = torch.as_tensor(problem.y, dtype=dtype, device=device)
    hidden = torch.tanh(x @ params["fc.weight"].T + params["fc.bias"])
    out = hidden @ params["head.weight"].T + params["head.bias"]
    return torch.mean((out - y) ** 2)


class _Network(torch.nn.Module):
    """`SameModel` built from torch.nn layers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.fc = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        pooled = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.tanh(self.fc(pooled)))


def _same_model(problem, dt, device):
    """The network with `problem.theta0`'s weights, its parameters by name, and its loss."""
    net = _Network().to(dtype=dt, device=device)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.as_tensor(problem.theta0[n]))
    x = torch.as_tensor(problem.x, dtype=dt, device=device)
    y = torch.as_tensor(problem.y, dtype=dt, device=device)
    return dict(net.named_parameters()), lambda: torch.mean((net(x) - y) ** 2)


def run(case, problem, dtype, device):
    """The case's trajectory on `problem`: `{name: array (steps, *shape)}`."""
    dt = DTYPES[dtype]
    loss_fn = None
    if isinstance(problem, SameModel):
        params, loss_fn = _same_model(problem, dt, device)
    else:
        params = {
            n: torch.nn.Parameter(torch.tensor(v, dtype=dt, device=device)) for n, v in problem.theta0.items()
        }
    if isinstance(problem, MLP):
        loss_fn = lambda: _mlp_loss(problem, params, dt, device)  # noqa: E731
    opt = build(case, params)
    trajectory = {n: [] for n in params}
    for t in range(problem.steps):
        opt.zero_grad()
        if loss_fn is not None:
            loss_fn().backward()
        else:
            grads = problem.gradients({n: p.detach().cpu().numpy() for n, p in params.items()}, t)
            for n, p in params.items():
                p.grad = torch.as_tensor(grads[n], dtype=dt, device=device)
        opt.step()
        for n, p in params.items():
            trajectory[n].append(p.detach().cpu().numpy().astype(np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}
