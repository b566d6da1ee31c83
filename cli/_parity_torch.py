"""`tether parity` driver for PyTorch: `tether.adapters.torch` on every device torch sees."""

import numpy as np
import torch

from tether.adapters import torch as tt

from ._parity_cases import MLP, full_hparams

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(case, params):
    """The case's optimizer over named parameters, one group per anchor mode."""
    anchored = [p for n, p in params.items() if n not in case.unanchored]
    free = [p for n, p in params.items() if n in case.unanchored]
    if case.wrapper:  # the wrappers anchor every parameter they see the same way
        groups = [{"params": anchored}] + ([{"params": free, "anchor": None}] if free else [])
    else:
        groups = [{"params": anchored, "anchor": case.anchor}] + (
            [{"params": free, "anchor": None}] if free else []
        )
    h = full_hparams(case)
    if case.wrapper == "ftp" and case.kind == "adam_ftp":
        inner = torch.optim.AdamW(
            groups, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"]
        )
        return tt.FTP(inner, k=h["k"])
    if case.wrapper == "ftp":
        inner = torch.optim.SGD(
            groups,
            lr=h["lr"],
            momentum=h["momentum"],
            dampening=h["dampening"],
            weight_decay=h["weight_decay"],
            nesterov=h["nesterov"],
        )
        return tt.FTP(inner, k=h["k"])
    if case.wrapper == "spd":
        inner = torch.optim.Adam(groups, lr=h["lr"], betas=h["betas"], eps=h["eps"], amsgrad=h["amsgrad"])
        return tt.SPD(inner, weight_decay=h["weight_decay"])
    if case.kind == "adam_ftp":
        return tt.AdamFTP(
            groups,
            lr=h["lr"],
            betas=h["betas"],
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            amsgrad=h["amsgrad"],
            k=h["k"],
        )
    if case.kind == "sgd_ftp":
        return tt.SGDFTP(
            groups,
            lr=h["lr"],
            momentum=h["momentum"],
            dampening=h["dampening"],
            weight_decay=h["weight_decay"],
            nesterov=h["nesterov"],
            k=h["k"],
        )
    return tt.AdamSPD(
        groups,
        lr=h["lr"],
        betas=h["betas"],
        eps=h["eps"],
        weight_decay=h["weight_decay"],
        amsgrad=h["amsgrad"],
    )


def _mlp_loss(problem, params, dtype, device):
    x = torch.as_tensor(problem.x, dtype=dtype, device=device)
    y = torch.as_tensor(problem.y, dtype=dtype, device=device)
    hidden = torch.tanh(x @ params["fc.weight"].T + params["fc.bias"])
    out = hidden @ params["head.weight"].T + params["head.bias"]
    return torch.mean((out - y) ** 2)


def run(case, problem, dtype, device):
    """The case's trajectory on `problem`: `{name: array (steps, *shape)}`."""
    dt = DTYPES[dtype]
    params = {
        n: torch.nn.Parameter(torch.tensor(v, dtype=dt, device=device)) for n, v in problem.theta0.items()
    }
    opt = build(case, params)
    trajectory = {n: [] for n in params}
    for t in range(problem.steps):
        opt.zero_grad()
        if isinstance(problem, MLP):
            _mlp_loss(problem, params, dt, device).backward()
        else:
            grads = problem.gradients({n: p.detach().cpu().numpy() for n, p in params.items()}, t)
            for n, p in params.items():
                p.grad = torch.as_tensor(grads[n], dtype=dt, device=device)
        opt.step()
        for n, p in params.items():
            trajectory[n].append(p.detach().cpu().numpy().astype(np.float64))
    return {n: np.stack(v) for n, v in trajectory.items()}
