"""What `tether parity` runs: the configurations, the two problems, and the NumPy reference.

Every backend's driver receives a `Case` and a problem, runs the public
optimizer of its framework, and returns the trajectory of every tensor; the
same case run by the core on NumPy in float64 (`reference_trajectory`) is
the yardstick.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tether.core import wise_ft
from tether.core.reference import ReferenceOptimizer, ReferenceTPGM, closed_loop_problem

STEPS = 25


@dataclass(frozen=True)
class Case:
    """One optimizer configuration, in PyTorch's hyperparameter names.

    `kind` is the fused optimizer the case equals (`adam_ftp`, `sgd_ftp`,
    `adam_spd`); `wrapper` (`"ftp"`, `"spd"` or `None`) says the backend
    should build it as a wrapper around its own base optimizer instead (AdamW or
    SGD for FTP, Adam without weight decay for SPD). `anchor` is `"init"` or
    `"zero"`; the tensors named in `unanchored` take the plain base step.
    `epsilon_hat`: the base is Keras's Adam, whose ε is added before the second
    moment's bias correction (PyTorch and optax add it after): a Keras-only case.
    """

    name: str
    kind: str
    hparams: dict = field(hash=False)
    anchor: str = "init"
    unanchored: tuple = ()
    wrapper: str | None = None
    epsilon_hat: bool = False

    def anchors(self, names):
        """Anchor mode by tensor name, as the reference takes it."""
        return {n: (None if n in self.unanchored else self.anchor) for n in names}


CASES = (
    Case("adam_ftp", "adam_ftp", {"lr": 0.05}, unanchored=("head.weight",)),
    Case(
        "adam_ftp k=0.5 wd amsgrad", "adam_ftp", {"lr": 0.05, "weight_decay": 0.01, "amsgrad": True, "k": 0.5}
    ),
    Case("adam_ftp zero anchor", "adam_ftp", {"lr": 0.02}, anchor="zero", unanchored=("head.weight",)),
    Case("sgd_ftp momentum", "sgd_ftp", {"lr": 0.1, "momentum": 0.9}, unanchored=("head.weight",)),
    Case(
        "sgd_ftp nesterov wd k=0.8",
        "sgd_ftp",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001, "k": 0.8},
    ),
    Case("sgd_ftp dampening", "sgd_ftp", {"lr": 0.05, "momentum": 0.5, "dampening": 0.3}),
    Case("adam_spd", "adam_spd", {"lr": 0.05, "weight_decay": 1.0}),
    Case(
        "adam_spd zero anchor amsgrad",
        "adam_spd",
        {"lr": 0.05, "weight_decay": 0.5, "amsgrad": True},
        anchor="zero",
        unanchored=("head.weight",),
    ),
    Case("ftp(adamw) wrapper", "adam_ftp", {"lr": 0.05, "weight_decay": 0.01}, wrapper="ftp"),
    Case("ftp(sgd) wrapper", "sgd_ftp", {"lr": 0.1, "momentum": 0.9, "k": 0.5}, wrapper="ftp"),
    Case(
        "spd(adam) wrapper",
        "adam_spd",
        {"lr": 0.05, "weight_decay": 1.0},
        wrapper="spd",
        unanchored=("head.weight",),
    ),
    Case(
        "ftp(adamw, eps hat) wrapper",
        "adam_ftp",
        {"lr": 0.05, "weight_decay": 0.01},
        wrapper="ftp",
        epsilon_hat=True,
    ),
    Case(
        "spd(adam, eps hat) wrapper",
        "adam_spd",
        {"lr": 0.05, "weight_decay": 1.0},
        wrapper="spd",
        unanchored=("head.weight",),
        epsilon_hat=True,
    ),
    Case(
        "l2sp(sgd) wrapper",
        "sgd_l2sp",
        {"lr": 0.05, "momentum": 0.9, "alpha": 0.5},
        wrapper="l2sp",
        unanchored=("head.weight",),
    ),
    Case("marssp(sgd) wrapper", "sgd_marssp", {"lr": 0.05, "momentum": 0.9, "radius": 0.3}, wrapper="marssp"),
    # Beside an optimizer rather than in it: on the problems with a model (`MODEL_KINDS`), the
    # weights are moved by fixed fine-tuning steps (`finetuning_steps`) and then projected or mixed.
    Case("tpgm mars", "tpgm", {"norm": "mars", "lr": 0.01, "iters": 2}, unanchored=("head.bias",)),
    Case("tpgm l2", "tpgm", {"norm": "l2", "lr": 0.02, "iters": 1}),
    Case("wise_ft", "wise_ft", {"alpha": 0.3}),
)
#: The cases that run beside fine-tuning and need a model and its loss: not on the closed-loop problem.
MODEL_KINDS = ("tpgm", "wise_ft")


def full_hparams(case):
    """The case's hyperparameters with every default filled in (PyTorch names)."""
    from tether.core.reference import DEFAULTS

    return {**DEFAULTS.get(case.kind, {}), **case.hparams}


def finetuning_steps(problem):
    """Fixed displacements, one dict per step in PyTorch's layout: fine-tuning as the TPGM and
    WiSE-FT cases see it (each backend adds them to its weights, then projects or mixes)."""
    rng = np.random.default_rng(7)
    return [
        {n: 0.05 * rng.standard_normal(np.shape(v)) for n, v in problem.theta0.items()}
        for _ in range(problem.steps)
    ]


# --- the problems -----------------------------------------------------------------------------------


class ClosedLoop:
    """`g_t = h ⊙ (θ − target) + noise_t`: gradients computed in NumPy from each backend's θ."""

    name = "closed-loop"
    scope = "arrays"

    def __init__(self, seed=0, steps=STEPS):
        self.problem = closed_loop_problem(seed, steps)
        self.steps = steps
        self.theta0 = self.problem.theta0

    def gradients(self, params, step_index):
        """Gradients by name at `params` (NumPy arrays, any float dtype), in float64."""
        return {
            n: self.problem.gradient(n, np.asarray(p, dtype=np.float64), step_index)
            for n, p in params.items()
        }


class MLP:
    """A two-layer tanh network on a fixed batch, mean squared error; each backend's own autodiff.

    `fc.weight` (16, 8) and `fc.bias` (16,) make the hidden layer, `head.weight`
    (3, 16) and `head.bias` (3,) the output: PyTorch's (out, in) layout everywhere,
    so that the MARS rows are the same units in every framework. The loss is the
    mean over the batch and the outputs of `(head(tanh(fc(x))) − y)²`.
    """

    name = "mlp"
    scope = "arrays"
    shapes: ClassVar[dict] = {
        "fc.weight": (16, 8),
        "fc.bias": (16,),
        "head.weight": (3, 16),
        "head.bias": (3,),
    }

    def __init__(self, seed=0, steps=STEPS, batch=32):
        rng = np.random.default_rng(seed + 1000)
        self.steps = steps
        self.theta0 = {
            "fc.weight": rng.standard_normal((16, 8)) / np.sqrt(8),
            "fc.bias": 0.1 * rng.standard_normal(16),
            "head.weight": rng.standard_normal((3, 16)) / 4.0,
            "head.bias": 0.1 * rng.standard_normal(3),
        }
        self.x = rng.standard_normal((batch, 8))
        self.y = np.sin(self.x[:, :3]) + 0.1 * rng.standard_normal((batch, 3))

    def gradients(self, params, step_index=None):
        """Hand-written backward pass in float64 (the reference's gradients)."""
        w1, b1, w2, b2 = (np.asarray(params[n], dtype=np.float64) for n in self.shapes)
        hidden = np.tanh(self.x @ w1.T + b1)
        out = hidden @ w2.T + b2
        d_out = 2.0 * (out - self.y) / out.size
        d_hidden = (d_out @ w2) * (1.0 - hidden**2)
        return {
            "fc.weight": d_hidden.T @ self.x,
            "fc.bias": d_hidden.sum(axis=0),
            "head.weight": d_out.T @ hidden,
            "head.bias": d_out.sum(axis=0),
        }


class SameModel:
    """One small CNN + MLP built from each framework's own layers, with the same weights.

    The network: `conv` (Conv2d 2→4, 3×3, no padding), tanh, the mean over the 4×4 map,
    `fc` (Linear 4→8), tanh, `head` (Linear 8→3); the loss is the mean squared error on a fixed
    batch. `theta0` and every trajectory are in PyTorch's layout (`conv.weight` `(4, 2, 3, 3)`,
    `fc.weight` `(8, 4)`); Keras and flax keep their kernels as `(3, 3, 2, 4)` and `(4, 8)`,
    outputs on the last axis, and convert on the way in and out. The MARS rows are output
    units in every layout (ALGORITHMS.md §1), so the same model gives the same trajectory.
    """

    name = "same-model"
    scope = "same model"
    #: PyTorch layout → Keras / flax layout of each weight (biases are the same).
    TO_CHANNELS_LAST: ClassVar[dict] = {
        "conv.weight": (2, 3, 1, 0),
        "fc.weight": (1, 0),
        "head.weight": (1, 0),
    }

    def __init__(self, seed=0, steps=STEPS, batch=16):
        rng = np.random.default_rng(seed + 2000)
        self.steps = steps
        self.theta0 = {
            "conv.weight": rng.standard_normal((4, 2, 3, 3)) / np.sqrt(18),
            "conv.bias": 0.1 * rng.standard_normal(4),
            "fc.weight": rng.standard_normal((8, 4)) / 2.0,
            "fc.bias": 0.1 * rng.standard_normal(8),
            "head.weight": rng.standard_normal((3, 8)) / np.sqrt(8),
            "head.bias": 0.1 * rng.standard_normal(3),
        }
        self.x = rng.standard_normal((batch, 2, 6, 6))  # NCHW
        self.y = rng.standard_normal((batch, 3))

    @classmethod
    def to_channels_last(cls, name, value):
        """A PyTorch-layout weight (or input batch, ``name="x"``) in Keras's and flax's layout."""
        if name == "x":
            return np.transpose(value, (0, 2, 3, 1))
        axes = cls.TO_CHANNELS_LAST.get(name)
        return value if axes is None else np.transpose(value, axes)

    @classmethod
    def from_channels_last(cls, name, value):
        axes = cls.TO_CHANNELS_LAST.get(name)
        return value if axes is None else np.transpose(value, np.argsort(axes))

    def gradients(self, params, step_index=None):
        """Hand-written backward pass in float64 (the reference's gradients)."""
        p = {n: np.asarray(v, dtype=np.float64) for n, v in params.items()}
        windows = np.lib.stride_tricks.sliding_window_view(self.x, (3, 3), axis=(2, 3))  # N C 4 4 3 3
        conv = np.einsum("ncijab,ocab->noij", windows, p["conv.weight"]) + p["conv.bias"][:, None, None]
        act = np.tanh(conv)
        pooled = act.mean(axis=(2, 3))
        hidden = np.tanh(pooled @ p["fc.weight"].T + p["fc.bias"])
        out = hidden @ p["head.weight"].T + p["head.bias"]
        d_out = 2.0 * (out - self.y) / out.size
        d_hidden = (d_out @ p["head.weight"]) * (1.0 - hidden**2)
        d_pooled = d_hidden @ p["fc.weight"]
        d_conv = (d_pooled[:, :, None, None] / 16.0) * (1.0 - act**2)
        return {
            "conv.weight": np.einsum("noij,ncijab->ocab", d_conv, windows),
            "conv.bias": d_conv.sum(axis=(0, 2, 3)),
            "fc.weight": d_hidden.T @ pooled,
            "fc.bias": d_hidden.sum(axis=0),
            "head.weight": d_out.T @ hidden,
            "head.bias": d_out.sum(axis=0),
        }


PROBLEMS = {"closed-loop": ClosedLoop, "mlp": MLP, "same-model": SameModel}
DTYPES = ("float64", "float32")
#: Largest |backend − reference| allowed, by dtype (float32 trajectories drift by rounding).
TOLERANCE = {"float64": 1e-10, "float32": 2e-4}


def reference_trajectory(case, problem):
    """The case run by the core on NumPy in float64: `{name: (steps, *shape)}`.

    `None` where the case does not apply: TPGM and WiSE-FT on the closed-loop problem.
    """
    names = list(problem.theta0)
    if case.kind in MODEL_KINDS:
        return None if isinstance(problem, ClosedLoop) else _beside_finetuning(case, problem)
    opt = ReferenceOptimizer(
        case.kind, problem.theta0, anchors=case.anchors(names), epsilon_hat=case.epsilon_hat, **case.hparams
    )
    trajectory = {n: [] for n in names}
    for t in range(problem.steps):
        for n, p in opt.step(problem.gradients(opt.params, t)).items():
            trajectory[n].append(p.copy())
    return {n: np.stack(v) for n, v in trajectory.items()}


def _beside_finetuning(case, problem):
    """TPGM calls or WiSE-FT mixes after each fixed fine-tuning step (`finetuning_steps`)."""
    h = case.hparams
    params = {n: v.copy() for n, v in problem.theta0.items()}
    constrained = [n for n in params if n not in case.unanchored]
    tpgm = ReferenceTPGM(problem.theta0, constrained=constrained, norm=h.get("norm"), lr=h.get("lr"))
    trajectory = {n: [] for n in params}
    for delta in finetuning_steps(problem):
        params = {n: v + delta[n] for n, v in params.items()}
        if case.kind == "tpgm":
            params = tpgm.call(params, problem.gradients, h["iters"])
            shown = params
        else:
            shown = {n: wise_ft(problem.theta0[n], v, h["alpha"]) for n, v in params.items()}
        for n, v in shown.items():
            trajectory[n].append(np.array(v, copy=True))
    return {n: np.stack(v) for n, v in trajectory.items()}


def max_deviation(trajectory, reference):
    """Largest absolute difference over every tensor and step."""
    return max(float(np.max(np.abs(np.asarray(trajectory[n], np.float64) - reference[n]))) for n in reference)
