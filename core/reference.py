"""The reference run: the core's optimizers driven tensor by tensor on NumPy.

Every adapter is checked against this: the same hyperparameters, the same
gradients, and the trajectories must agree (1e-12 in float64). It is also the
closed-loop problem of `ALGORITHMS.md`'s golden files, made from a seed:

    g_t = h ⊙ (θ − target) + noise_t

so that any framework can replay a trajectory without sharing data.
"""

from dataclasses import dataclass, field

import numpy as np

from .base import AdamState, adam_direction, adam_init, sgd_direction, sgd_init
from .baselines import l2_sp_gradient, mars_sp_project
from .ftp import ftp_init, ftp_project
from .norms import rowdot
from .spd import spd_step
from .tpgm import (
    clip_constraint,
    initial_constraint,
    projection_ratio,
    tpgm_norm,
    tpgm_project,
    tpgm_projected,
)

_SGD = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
#: The optimizers the reference knows, with their hyperparameters (PyTorch names) and defaults:
#: the fused FTP and SPD steps, and SGD with L2-SP's gradient term or MARS-SP's projection (§8).
DEFAULTS = {
    "adam_ftp": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, k=1.0),
    "sgd_ftp": dict(_SGD, k=1.0),
    "adam_spd": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False),
    "sgd_l2sp": dict(_SGD, alpha=0.0),
    "sgd_marssp": dict(_SGD, radius=1.0),
}
ANCHOR_MODES = ("init", "zero", None)


class ReferenceOptimizer:
    """One of `adam_ftp`, `sgd_ftp`, `adam_spd` over a dict of named NumPy arrays.

    `anchors` maps a name to its anchor mode (`"init"`, `"zero"` or `None`);
    missing names take `"init"`. :meth:`step` takes the gradients by name and
    returns the new parameters; a name missing from the gradients is skipped
    (its state and step count are untouched), as every adapter does.
    `epsilon_hat` gives the Adam kinds Keras's ε (`adam_direction`), for the Keras
    wrappers around `keras.optimizers.Adam`.
    """

    def __init__(self, kind, params, *, anchors=None, epsilon_hat=False, **hparams):
        if kind not in DEFAULTS:
            raise ValueError(f"unknown optimizer {kind!r}; expected one of {sorted(DEFAULTS)}")
        unknown = set(hparams) - set(DEFAULTS[kind])
        if unknown:
            raise TypeError(f"{kind}: unknown hyperparameters {sorted(unknown)}")
        self.kind = kind
        self.epsilon_hat = bool(epsilon_hat)
        self.hparams = {**DEFAULTS[kind], **hparams}
        anchors = anchors or {}
        self.params = {n: np.array(p, copy=True) for n, p in params.items()}
        self.modes = {n: anchors.get(n, "init") for n in self.params}
        for name, mode in self.modes.items():
            if mode not in ANCHOR_MODES:
                raise ValueError(f"anchor mode of {name!r} must be one of {ANCHOR_MODES}, got {mode!r}")
        self.anchors = {n: (p.copy() if self.modes[n] == "init" else None) for n, p in self.params.items()}
        self.steps = {n: 0 for n in self.params}
        self.base = {n: self._base_init(p) for n, p in self.params.items()}
        self.ftp = {n: ftp_init(p) for n, p in self.params.items() if kind.endswith("ftp") and self.modes[n]}

    def _base_init(self, p):
        if self.kind.startswith("sgd"):
            return sgd_init(p)
        return adam_init(p, amsgrad=self.hparams["amsgrad"])

    def _direction(self, name, grad, step):
        h, param = self.hparams, self.params[name]
        if self.kind.startswith("sgd"):
            return sgd_direction(
                grad,
                param,
                self.base[name],
                step,
                lr=h["lr"],
                momentum=h["momentum"],
                dampening=h["dampening"],
                weight_decay=h["weight_decay"],
                nesterov=h["nesterov"],
            )
        decay = h["weight_decay"] if self.kind == "adam_ftp" else 0.0
        return adam_direction(
            grad,
            self.base[name],
            step,
            lr=h["lr"],
            beta1=h["betas"][0],
            beta2=h["betas"][1],
            eps=h["eps"],
            amsgrad=h["amsgrad"],
            weight_decay=decay,
            param=param,
            epsilon_hat=self.epsilon_hat,
        )

    def step(self, grads):
        """Apply one step to every parameter that has a gradient; return the parameters."""
        for name, grad in grads.items():
            if grad is None:
                continue
            param = self.params[name]
            grad = np.asarray(grad, dtype=param.dtype)
            self.steps[name] += 1
            step = self.steps[name]
            anchor = self.anchors[name]
            if self.kind == "sgd_l2sp" and self.modes[name]:
                grad = l2_sp_gradient(grad, param, anchor, self.hparams["alpha"])
            direction, self.base[name] = self._direction(name, grad, step)
            if not self.modes[name]:
                self.params[name] = param - direction
            elif self.kind == "sgd_l2sp":
                self.params[name] = param - direction
            elif self.kind == "sgd_marssp":
                self.params[name] = mars_sp_project(param - direction, anchor, self.hparams["radius"])
            elif self.kind == "adam_spd":
                self.params[name] = spd_step(param, direction, anchor, grad, self.hparams["weight_decay"])
            else:
                self.params[name], self.ftp[name] = ftp_project(
                    param, direction, anchor, grad, self.ftp[name], step, k=self.hparams["k"]
                )
        return self.params

    def radius(self, name):
        """The FTP radius `γ` of an anchored tensor."""
        return self.ftp[name].radius


class ReferenceTPGM:
    """TPGM (ALGORITHMS.md §7) on named NumPy arrays, with the gradient of the loss given by a function.

    `constrained` names the tensors with a constraint (the others are never projected); their
    anchors are the arrays given. :meth:`call` is one TPGM call on the current weights, with
    `gradients(params)` returning `∂L/∂θ` by name at the weights it is given (the projected
    ones); `∂L/∂γ` follows by the chain rule through `θ_p = θ₀ + r(γ) ⊙ c`.
    """

    def __init__(self, anchors, *, constrained, norm="mars", lr=1e-2):
        self.anchors = {n: np.array(anchors[n], copy=True) for n in constrained}
        self.norm, self.lr = norm, lr
        self.constraints = None
        self.adam = {n: AdamState(np.zeros(()), np.zeros(())) for n in self.anchors}
        self.steps = 0

    def call(self, params, gradients, iters):
        """One TPGM call; returns the weights with the constrained ones projected."""
        displacements = {n: params[n] - a for n, a in self.anchors.items()}
        norms = {n: tpgm_norm(c, self.norm) for n, c in displacements.items()}
        if self.constraints is None:
            self.constraints = {n: initial_constraint(v) for n, v in norms.items()}
        for _ in range(iters):
            projected = dict(params)
            for n, c in displacements.items():
                self.constraints[n] = clip_constraint(self.constraints[n], norms[n])
                ratio = projection_ratio(self.constraints[n], norms[n])
                projected[n] = tpgm_projected(self.anchors[n], c, ratio)
            grads = gradients(projected)
            self.steps += 1
            for n, c in displacements.items():
                moving = projection_ratio(self.constraints[n], norms[n]) < 1  # d r / d γ = 0 elsewhere
                rows = rowdot(grads[n], c) if self.norm == "mars" else np.sum(grads[n] * c)
                grad = np.sum(np.where(moving, rows / (norms[n] + 1e-8), 0.0))
                direction, self.adam[n] = adam_direction(grad, self.adam[n], self.steps, lr=self.lr)
                self.constraints[n] = self.constraints[n] - direction
        out = dict(params)
        for n in displacements:
            out[n], self.constraints[n] = tpgm_project(
                params[n], self.anchors[n], self.constraints[n], self.norm
            )
        return out


@dataclass
class ClosedLoopProblem:
    """Named tensors with a noisy quadratic loss: `g_t = h ⊙ (θ − target) + noise_t`."""

    theta0: dict
    target: dict
    curvature: dict
    noise: dict = field(repr=False)

    def gradient(self, name, theta, step_index):
        """The gradient of tensor `name` at `theta` on (0-based) step `step_index`."""
        return self.curvature[name] * (theta - self.target[name]) + self.noise[name][step_index]


#: The shapes of the golden files: a scalar, a bias, a matrix and a conv kernel.
DEFAULT_SHAPES = {
    "conv.weight": (6, 3, 3, 3),
    "fc.weight": (8, 12),
    "fc.bias": (8,),
    "scale": (),
    "head.weight": (4, 8),
}


def closed_loop_problem(seed, steps, shapes=None, dtype=np.float64, noise_scale=0.1):
    """Make a `ClosedLoopProblem` from a seed (float64 by default)."""
    rng = np.random.default_rng(seed)
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    theta0, target, curvature, noise = {}, {}, {}, {}
    for name, shape in shapes.items():
        theta0[name] = rng.standard_normal(shape).astype(dtype)
        target[name] = (theta0[name] + rng.standard_normal(shape)).astype(dtype)
        curvature[name] = rng.uniform(0.5, 2.0, shape).astype(dtype)
        noise[name] = (noise_scale * rng.standard_normal((steps, *shape))).astype(dtype)
    return ClosedLoopProblem(theta0, target, curvature, noise)


def run_reference(kind, problem, steps, *, anchors=None, **hparams):
    """Run the reference optimizer on a closed-loop problem; return the trajectory by name."""
    opt = ReferenceOptimizer(kind, problem.theta0, anchors=anchors, **hparams)
    trajectory = {n: [] for n in problem.theta0}
    for t in range(steps):
        grads = {n: problem.gradient(n, p, t) for n, p in opt.params.items()}
        for n, p in opt.step(grads).items():
            trajectory[n].append(p.copy())
    return {n: np.stack(v) for n, v in trajectory.items()}
