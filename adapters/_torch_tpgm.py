r"""TPGM for PyTorch (``ALGORITHMS.md`` §7), re-exported as `tether.adapters.torch.TPGM`."""

import fnmatch
import math
from collections.abc import Callable, Iterable

import torch

from .. import core

__all__ = ["TPGM"]

#: The constraints' Adam (PyTorch's Adam, no weight decay), as in the authors' code.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


class _Loss(torch.nn.Module):
    """Holds the model, so that `torch.func.functional_call` swaps in the projected weights while
    the user's ``loss_fn(batch)`` calls the model as usual."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


class TPGM:
    r"""Trainable Projected Gradient Method: per-tensor constraints learned on validation data.

    Tian et al., "Trainable Projected Gradient Method for Robust Fine-Tuning", CVPR 2023
    (``ALGORITHMS.md`` §7). Each anchored tensor (a trainable parameter of ``model`` when TPGM is
    built, i.e. the pre-trained weights, unless ``exclude`` names it) has a constraint
    ``γ``. One call of `step`, with the fine-tuned weights ``θ`` held fixed:

    $$
    c = \theta - \theta_0, \quad n = \mathrm{norm}(c), \quad
    r = \mathrm{clip}\Big(\frac{\gamma}{n + 10^{-8}}, 0, 1\Big), \quad
    \theta_p = \theta_0 + r \odot c
    $$

    ``iters`` times: ``γ ← clip(γ, 1e-8, max n)``, the loss of the model at ``θ_p`` on the next
    validation batch, one Adam step (learning rate ``lr``, β = (0.9, 0.999), ε = 1e-8) on every
    ``γ`` with ``∂L/∂γ``; then the projection ``θ ← θ₀ + clip(γ / (n + 1e-8), 0, 1) ⊙ c``, in
    place. On the first call ``γ = min(n) / 2``. TPGM runs beside any optimizer: every ``f``
    optimizer steps (the ResNet recipe) or once at the end of fine-tuning (the ViT recipe).

    Args:
        model: the model being fine-tuned, with its pre-trained weights loaded (the anchors are
            copied now).
        norm: ``"mars"`` (per row, the output units: axis 0 of every ``torch.nn`` weight; a bias
            is one row) or ``"l2"`` (the whole tensor).
        lr: the constraints' Adam learning rate ``μ``.
        exclude: parameter names or glob patterns (``"head.*"``) of tensors without a constraint,
            such as a new head; a pattern that matches no trainable parameter is an error.

    Raises:
        ValueError: an unknown ``norm``, a negative or non-finite ``lr``, a pattern that matches
            nothing, or a model with no trainable (non-excluded) floating-point parameter.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        norm: str = "mars",
        lr: float = 1e-2,
        exclude: str | Iterable[str] = (),
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TPGM: model must be a torch.nn.Module, got {type(model).__name__}")
        self.norm = core.check_norm(norm)
        self.lr = _learning_rate(lr)
        patterns = [exclude] if isinstance(exclude, str) else list(exclude)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"TPGM: exclude takes names or glob patterns, got {pattern!r}")
            if not any(fnmatch.fnmatchcase(n, pattern) for n in trainable):
                raise ValueError(f"TPGM: exclude pattern {pattern!r} matches no trainable parameter")
        self.model = model
        self.names = [n for n in trainable if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        for name in self.names:
            if not torch.is_floating_point(trainable[name]) or torch.is_complex(trainable[name]):
                raise TypeError(
                    f"TPGM: parameter {name!r} has dtype {trainable[name].dtype}; expected real floats"
                )
        if not self.names:
            raise ValueError("TPGM: the model has no trainable parameter to constrain")
        self.anchors = {
            n: trainable[n].detach().clone(memory_format=torch.preserve_format) for n in self.names
        }
        self.constraints = None  # set on the first call: γ = min(n) / 2
        self.exp_avg = self.exp_avg_sq = None
        self.steps = 0
        self._source = self._iterator = None

    # -- one call ----------------------------------------------------------------------------------

    def step(
        self, loss_fn: Callable[[object], torch.Tensor], batches: Iterable, iters: int = 1
    ) -> torch.Tensor | None:
        """One TPGM call: ``iters`` projection updates on validation batches, then the projection.

        Args:
            loss_fn: ``loss_fn(batch)`` returns the validation loss; it calls the model as usual,
                and sees the projected weights (the model is in eval mode during the call and
                its mode is restored afterwards).
            batches: any iterable of validation batches. TPGM keeps one iterator over it across
                calls (while the same object is passed) and restarts it when it is exhausted.
            iters: projection updates before the projection; 0 only projects.

        Returns:
            The last projection update's loss (detached), or ``None`` when ``iters == 0``.
        """
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"TPGM: iters must be an integer >= 0, got {iters!r}")
        if not callable(loss_fn):
            raise TypeError("TPGM: loss_fn must be callable: loss_fn(batch) -> scalar loss")
        params = self._params()
        with torch.no_grad():
            displacements = [p.detach() - self.anchors[n] for n, p in zip(self.names, params, strict=True)]
            norms = [core.tpgm_norm(c, self.norm) for c in displacements]
            if self.constraints is None:
                self.constraints = [core.initial_constraint(n).detach() for n in norms]
                self.exp_avg = [torch.zeros_like(g) for g in self.constraints]
                self.exp_avg_sq = [torch.zeros_like(g) for g in self.constraints]
        loss = None
        if iters:
            training = self.model.training
            self.model.eval()
            try:
                wrapped = _Loss(self.model, loss_fn)
                for _ in range(iters):
                    loss = self._update(wrapped, displacements, norms, self._next(batches))
            finally:
                self.model.train(training)
        with torch.no_grad():
            for i, (p, c, n) in enumerate(zip(params, displacements, norms, strict=True)):
                gamma = core.clip_constraint(self.constraints[i], n)
                self.constraints[i] = gamma
                projected = core.tpgm_projected(
                    self.anchors[self.names[i]], c, core.projection_ratio(gamma, n)
                )
                p.copy_(projected)
        return loss

    def _update(self, wrapped, displacements, norms, batch):
        """One projection update: clip the constraints, the loss at ``θ_p``, one Adam step on them."""
        gammas = []
        for i, n in enumerate(norms):
            self.constraints[i] = core.clip_constraint(self.constraints[i], n).detach()
            gammas.append(self.constraints[i].clone().requires_grad_(True))
        with torch.enable_grad():
            projected = {
                f"model.{name}": core.tpgm_projected(self.anchors[name], c, core.projection_ratio(g, n))
                for name, c, n, g in zip(self.names, displacements, norms, gammas, strict=True)
            }
            loss = torch.func.functional_call(wrapped, projected, (batch,))
            grads = torch.autograd.grad(loss, gammas, allow_unused=True)
        self.steps += 1
        with torch.no_grad():
            for i, g in enumerate(grads):
                g = torch.zeros_like(gammas[i]) if g is None else g
                direction, state = core.adam_direction(
                    g,
                    core.AdamState(self.exp_avg[i], self.exp_avg_sq[i]),
                    self.steps,
                    lr=self.lr,
                    beta1=BETA1,
                    beta2=BETA2,
                    eps=EPS,
                )
                self.exp_avg[i], self.exp_avg_sq[i] = state.exp_avg, state.exp_avg_sq
                self.constraints[i] = self.constraints[i] - direction
        return loss.detach()

    def _params(self):
        found = dict(self.model.named_parameters())
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(f"TPGM: the model no longer has the parameters {missing}")
        params = [found[n] for n in self.names]
        for name, p in zip(self.names, params, strict=True):
            anchor = self.anchors[name]
            if p.shape != anchor.shape or p.device != anchor.device:
                raise ValueError(
                    f"TPGM: parameter {name!r} is {tuple(p.shape)} on {p.device}, its anchor "
                    f"{tuple(anchor.shape)} on {anchor.device}"
                )
        return params

    def _next(self, batches):
        """The next validation batch: one iterator per ``batches`` object, restarted when exhausted."""
        if batches is not self._source:
            self._source, self._iterator = batches, iter(batches)
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(batches)
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(
                "TPGM: batches is exhausted and cannot be restarted (pass a list or a DataLoader, "
                "not a one-shot generator)"
            ) from None

    @torch.no_grad()
    def diagnostics(self) -> dict[str, dict]:
        """Per constrained tensor, by name: ``"distance"``, ``‖θ − θ₀‖₂`` now, and ``"constraint"``,
        its ``γ`` (absent before the first call). Python floats, for logging."""
        params = dict(self.model.named_parameters())
        out = {}
        for i, name in enumerate(self.names):
            displacement = params[name].detach() - self.anchors[name]
            entry = {
                "distance": torch.linalg.vector_norm(
                    displacement.to(_compute_dtype(displacement.dtype))
                ).item()
            }
            if self.constraints is not None:
                entry["constraint"] = self.constraints[i].item()
            out[name] = entry
        return out

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The anchors, the constraints and their Adam state, by parameter name."""
        per_name = {}
        for i, name in enumerate(self.names):
            entry = {"anchor": self.anchors[name]}
            if self.constraints is not None:
                entry.update(
                    constraint=self.constraints[i], exp_avg=self.exp_avg[i], exp_avg_sq=self.exp_avg_sq[i]
                )
            per_name[name] = entry
        return {"method": "TPGM", "norm": self.norm, "lr": self.lr, "steps": self.steps, "state": per_name}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`, checked against this TPGM's parameters before anything changes.

        Raises:
            ValueError: another method's state, other parameter names, or a tensor of the wrong
                shape (naming the parameter and key).
        """
        if not isinstance(state_dict, dict) or state_dict.get("method") != "TPGM":
            raise ValueError("TPGM: not a TPGM state dict (its 'method' is not 'TPGM')")
        state = state_dict.get("state", {})
        if sorted(state) != sorted(self.names):
            raise ValueError(
                f"TPGM: the state dict constrains {sorted(state)}, this TPGM {sorted(self.names)}"
            )
        norm = core.check_norm(state_dict["norm"])
        lr = _learning_rate(state_dict["lr"])
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"TPGM: the state dict's steps must be an integer >= 0, got {steps!r}")
        started = {"constraint" in entry for entry in state.values()}
        if len(started) > 1:
            raise ValueError("TPGM: the state dict has constraints for some parameters only")
        keys = {"anchor", "constraint", "exp_avg", "exp_avg_sq"} if started == {True} else {"anchor"}
        params = dict(self.model.named_parameters())
        for name, entry in state.items():
            if set(entry) != keys:
                raise ValueError(
                    f"TPGM: the state of parameter {name!r} has {sorted(entry)}, expected {sorted(keys)}"
                )
            for key, value in entry.items():
                expected = tuple(params[name].shape) if key == "anchor" else ()
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"TPGM: the saved {key!r} of parameter {name!r} is {shape}, expected {expected}"
                    )
        self.norm, self.lr, self.steps = norm, lr, steps
        for name in self.names:
            p = params[name]
            self.anchors[name] = state[name]["anchor"].to(device=p.device, dtype=p.dtype, copy=True)
        if started == {True}:
            dtype = lambda name: _compute_dtype(params[name].dtype)  # noqa: E731
            self.constraints, self.exp_avg, self.exp_avg_sq = (
                [state[n][key].to(device=params[n].device, dtype=dtype(n), copy=True) for n in self.names]
                for key in ("constraint", "exp_avg", "exp_avg_sq")
            )
        else:
            self.constraints = self.exp_avg = self.exp_avg_sq = None


def _learning_rate(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"TPGM: lr must be a finite number >= 0, got {lr!r}")
    return float(lr)
