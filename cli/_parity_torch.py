"""`tether parity` driver for PyTorch: `tether.adapters.torch` on every device torch sees."""

import numpy as np
import torch

from tether.adapters import torch as tt

from ._parity_cases import MLP, MODEL_KINDS, SameModel, finetuning_steps, full_hparams

DTYPES = {"float64": torch.float64, "float32": torch.float32}


FUSED = {"adam_ftp": tt.AdamFTP, "sgd_ftp": tt.SGDFTP, "adam_spd": tt.AdamSPD}
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


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
    if case.wrapper in ("l2sp", "marssp"):
        inner = torch.optim.SGD(groups, **{key: h[key] for key in _SGD_KEYS})
        if case.wrapper == "l2sp":
            return tt.L2SP(inner, alpha=h["alpha"])
        return tt.MARSSP(inner, radius=h["radius"])
    k = h.pop("k")
    if case.kind == "adam_ftp":  # AdamW's decoupled decay is Adam-FTP's wd term
        h.pop("amsgrad")
        return tt.FTP(torch.optim.AdamW(groups, **h), k=k)
    return tt.FTP(torch.optim.SGD(groups, **h), k=k)


class _MLP(torch.nn.Module):
    """`MLP` built from torch.nn layers (PyTorch's layout, as the problem is written)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


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


def _model(problem, dt, device):
    """The problem's network with `problem.theta0`'s weights, and its loss on the fixed batch."""
    net = (_Network() if isinstance(problem, SameModel) else _MLP()).to(dtype=dt, device=device)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.as_tensor(problem.theta0[n]))
    x = torch.as_tensor(problem.x, dtype=dt, device=device)
    y = torch.as_tensor(problem.y, dtype=dt, device=device)
    return net, lambda batch=None: torch.mean((net(x) - y) ** 2)


def _record(trajectory, named):
    for n, p in named.items():
        trajectory[n].append(p.detach().cpu().numpy().astype(np.float64))


def run(case, problem, dtype, device):
    """The case's trajectory on `problem`: `{name: array (steps, *shape)}`."""
    dt = DTYPES[dtype]
    if case.epsilon_hat:
        return None  # Keras's Adam: torch.optim.Adam adds ε after the bias correction
    if case.kind in MODEL_KINDS:
        return _beside_finetuning(case, problem, dt, device)
    net, loss_fn = None, None
    if isinstance(problem, (MLP, SameModel)):
        net, loss_fn = _model(problem, dt, device)
        params = dict(net.named_parameters())
    else:
        params = {
            n: torch.nn.Parameter(torch.tensor(v, dtype=dt, device=device)) for n, v in problem.theta0.items()
        }
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
        _record(trajectory, params)
    return {n: np.stack(v) for n, v in trajectory.items()}


def _beside_finetuning(case, problem, dt, device):
    """TPGM calls (`tt.TPGM`) or WiSE-FT mixes (`tt.wise_ft`) after fixed fine-tuning steps."""
    net, loss_fn = _model(problem, dt, device)
    params = dict(net.named_parameters())
    anchor = {k: v.clone() for k, v in net.state_dict().items()}
    h = case.hparams
    tpgm = None
    if case.kind == "tpgm":
        tpgm = tt.TPGM(net, norm=h["norm"], lr=h["lr"], exclude=list(case.unanchored))
    trajectory = {n: [] for n in params}
    for delta in finetuning_steps(problem):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(torch.as_tensor(delta[n], dtype=dt, device=device))
        if tpgm is not None:
            tpgm.step(loss_fn, [None], iters=h["iters"])
            _record(trajectory, params)
        else:
            _record(trajectory, tt.wise_ft(net, anchor, h["alpha"]))
    return {n: np.stack(v) for n, v in trajectory.items()}
