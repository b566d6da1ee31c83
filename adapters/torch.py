r"""PyTorch optimizers for robust fine-tuning: FTP and SPD (``ALGORITHMS.md`` §3–§6).

``AdamFTP``, ``SGDFTP`` and ``AdamSPD`` are `torch.optim.Optimizer`\ s with the base step
fused in; ``FTP`` and ``SPD`` wrap any other torch optimizer. Each parameter group takes an
``anchor`` key:

- ``"init"`` (default): the anchor ``θ₀`` is a copy of the tensor taken when the optimizer is built;
- ``"zero"``: ``θ₀ = 0`` and nothing is stored (PEFT/LoRA adapters, a new head pulled to zero);
- ``None``: unanchored, the tensor takes the plain base step.

All state (anchor, moments, step count, radius and its moments, previous displacement) lives in
``optimizer.state[p]``, so ``state_dict()`` / ``load_state_dict()`` carry it and a resumed run
continues bit for bit. The arithmetic is `tether.core`'s: per-tensor scalar rules are core
calls on stacked vectors, and the full-size passes are kernels checked against the core
(``adapters/_torch_ops.py``): on the CPU one pass over each tensor a block of rows at a time,
elsewhere multi-tensor (``torch._foreach_*``) ops.
"""

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import _torch_ops as ops

__all__ = ["FTP", "SGDFTP", "SPD", "AdamFTP", "AdamSPD"]

ANCHOR_MODES = ("init", "zero", None)
#: Keys kept out of ``Optimizer.load_state_dict``'s cast to the parameter's dtype.
_SCALAR_KEYS = ("step", "radius", "radius_exp_avg", "radius_exp_avg_sq")
#: Full-size state keys whose shape must equal the parameter's.
_FULL_KEYS = ("anchor", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "prev_displacement")


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _evaluate(closure):
    """The loss of `step(closure)`: the closure re-evaluates the model with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _number(owner, name, value, low, high=None, *, high_open=False):
    """Check that a hyperparameter is a real number in ``[low, high]`` (or ``[low, high)``)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a Python float, got {type(value).__name__}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if not value >= low or too_high:
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{owner}: invalid {name} {value!r}; it must be {bound}")


class _Anchored(Optimizer):
    """Shared bookkeeping: anchor snapshots, hyperparameter and gradient checks, state loading."""

    def add_param_group(self, param_group):
        merged = {**self.defaults, **param_group}
        self._check_group(merged)
        super().add_param_group(param_group)
        if param_group["anchor"] == "init":
            for p in param_group["params"]:
                state = self.state[p]
                if "anchor" not in state:
                    state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)

    def _check_group(self, group):
        owner = type(self).__name__
        if group.get("anchor", "init") not in ANCHOR_MODES:
            raise ValueError(f"{owner}: unknown anchor {group['anchor']!r}; expected 'init', 'zero' or None")

    # -- gradients ----------------------------------------------------------------------

    @staticmethod
    def _name(group, gi, i):
        names = group.get("param_names")
        return repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"

    def _gather(self):
        """``[(group, params, grads)]`` of the tensors with a gradient, all checked before any update."""
        owner = type(self).__name__
        work = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                name = self._name(group, gi, i)
                if g.is_sparse:
                    raise TypeError(
                        f"{owner}: parameter {name} has a sparse gradient, which is not supported"
                    )
                if torch.is_complex(p) or torch.is_complex(g):
                    raise TypeError(f"{owner}: parameter {name} is complex, which is not supported")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(
                        f"{owner}: the gradient of parameter {name} is {tuple(g.shape)} {g.dtype} "
                        f"on {g.device}, the parameter {tuple(p.shape)} {p.dtype} on {p.device}"
                    )
                params.append(p)
                grads.append(g)
            if params:
                work.append((group, params, grads))
        return work

    @staticmethod
    def _buckets(params, grads):
        """Split a group's tensors by (device, dtype): stacks and foreach kernels need one of each."""
        buckets = defaultdict(lambda: ([], []))
        for p, g in zip(params, grads, strict=True):
            ps, gs = buckets[(p.device, p.dtype)]
            ps.append(p)
            gs.append(g)
        return list(buckets.values())

    def _scratch_for(self, params):
        """A float32/float64 CPU bucket's `ops.Scratch` (the CPU's single pass); ``None`` otherwise.

        Elsewhere the multi-tensor kernels run: an accelerator has them and a caching
        allocator; 16-bit tensors keep the path whose statistics are computed as they were.
        """
        if params[0].device.type != "cpu" or params[0].dtype not in (torch.float32, torch.float64):
            return None
        if "_scratch" not in self.__dict__:  # made lazily: torch pickles only the state and groups
            self._scratch = ops.Scratch()
        return self._scratch

    def _new_step(self, p):
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _init_radius(self, p, state):
        if "radius" not in state:
            zero = torch.zeros((), dtype=_compute_dtype(p.dtype), device=p.device)
            state["radius"] = zero
            state["radius_exp_avg"] = zero.clone()
            state["radius_exp_avg_sq"] = zero.clone()
            state["prev_displacement"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["prev_inv_norm"] = torch.zeros(ops.mars_shape(p), dtype=p.dtype, device=p.device)

    # -- state dict ---------------------------------------------------------------------

    def _own_state_dict(self, state_dict):
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`; anchors and moments must match the parameters' shapes and dtypes.

        Raises:
            ValueError: a saved anchor or moment does not match its parameter's shape or dtype,
                or an ``"init"``-anchored tensor has state but no anchor.
        """
        owner = type(self).__name__
        own = self._own_state_dict(state_dict)
        saved_groups = own["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{owner}: the state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        index = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{owner}: parameter group {gi} of the state dict has a different size")
            for i, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                index[key] = (p, self._name(group, gi, i), saved)
        for key, values in own["state"].items():
            if key not in index:
                continue
            p, name, saved = index[key]
            if saved.get("anchor") == "init" and "anchor" not in values:
                raise ValueError(f"{owner}: the state of parameter {name} has no anchor")
            for k in _FULL_KEYS:
                v = values.get(k)
                if v is None:
                    continue
                if tuple(v.shape) != tuple(p.shape) or (k == "anchor" and v.dtype != p.dtype):
                    raise ValueError(
                        f"{owner}: the saved {k} of parameter {name} is {tuple(v.shape)} {v.dtype}, "
                        f"but the parameter is {tuple(p.shape)} {p.dtype}"
                    )
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (radius state must
        # stay float32 for bf16 parameters) and leaves 'step' where it was saved: load those apart.
        kept = {
            key: {k: values[k] for k in _SCALAR_KEYS if k in values} for key, values in own["state"].items()
        }
        stripped = {
            key: {k: v for k, v in values.items() if k not in _SCALAR_KEYS}
            for key, values in own["state"].items()
        }
        self._load_base(state_dict)
        super().load_state_dict({**own, "state": stripped})
        self._after_load()
        for key, values in kept.items():
            if key in index:
                p = index[key][0]
                for k, v in values.items():
                    self.state[p][k] = v.to(device=p.device, copy=True)

    def _load_base(self, state_dict):
        pass

    def _after_load(self):
        pass


class _Fused(_Anchored):
    """A base step fused with FTP or SPD, bucketed by device and dtype."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one step for every parameter that has a gradient (the others are skipped).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        for group, params, grads in self._gather():
            for bucket_params, bucket_grads in self._buckets(params, grads):
                states = [self.state[p] for p in bucket_params]
                for p, state in zip(bucket_params, states, strict=True):
                    self._init_state(group, p, state)
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                t = ops.steps_vector(steps, _compute_dtype(bucket_params[0].dtype))
                self._step_bucket(group, bucket_params, bucket_grads, states, t)
        return loss

    @staticmethod
    def _anchors(group, states):
        """``None`` for an unanchored group, else each tensor's ``θ₀`` (``None`` for a zero anchor)."""
        if group["anchor"] is None:
            return None
        return [s.get("anchor") for s in states]


class _AdamBase(_Fused):
    def __init__(self, params, defaults):
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        owner = type(self).__name__
        _number(owner, "lr", group["lr"], 0.0)
        _number(owner, "eps", group["eps"], 0.0)
        _number(owner, "weight_decay", group["weight_decay"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{owner}: betas must be a pair of floats, got {betas!r}")
        for j, beta in enumerate(betas):
            _number(owner, f"betas[{j}]", beta, 0.0, 1.0, high_open=True)

    def _init_state(self, group, p, state):
        if "step" not in state:
            state["step"] = self._new_step(p)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def _moments(states):
        """``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs)`` of a bucket."""
        return (
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s.get("max_exp_avg_sq") for s in states],
        )


class AdamFTP(_AdamBase):
    r"""Adam with Fast Trainable Projection (FTP).

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023
    (``ALGORITHMS.md`` §3, §4). Each anchored tensor takes PyTorch's Adam direction ``d``
    (with the decoupled term ``lr · wd · θ``, which is projected too), then

    $$
    c = (\theta - d) - \theta_0, \quad n = \mathrm{MARS}(c) + 10^{-8}, \quad
    \theta \leftarrow \theta_0 + \mathrm{clip}(\gamma / n, 0, 1) \odot c
    $$

    with one radius ``γ`` per tensor learned online by its own Adam (learning rate 1e-2) on
    ``∇γ = Σ rowdot(g, c_prev) / n_prev``, positive gradients scaled by ``k``, ``γ`` clipped
    to ``[1e-8, max n]``. Unanchored tensors (``anchor=None``) take the plain AdamW step.

    Args:
        params: tensors, ``model.named_parameters()``, or dicts of parameter groups, each
            with an optional ``anchor`` key (``"init"``, ``"zero"`` or ``None``).
        lr: learning rate.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ``ε`` (added to ``√v̂``).
        weight_decay: decoupled weight decay, inside the projected step.
        amsgrad: use the maximum of the second moments.
        k: in ``[0, 1]``; positive radius gradients (which would shrink ``γ``) are multiplied by it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        k: float = 1.0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, k=k, anchor="init"
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        _number(type(self).__name__, "k", group["k"], 0.0, 1.0)

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        if group["anchor"] is not None:
            self._init_radius(p, state)

    def _step_bucket(self, group, params, grads, states, t):
        beta1, beta2 = group["betas"]
        ops.adam_ftp_step_(
            params,
            grads,
            self._moments(states),
            self._anchors(group, states),
            states,
            t,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            k=group["k"],
            scratch=self._scratch_for(params),
        )


class AdamSPD(_AdamBase):
    r"""Adam with Selective Projection Decay (SPD).

    Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models",
    NeurIPS 2024 (``ALGORITHMS.md`` §3, §5). Each anchored tensor takes PyTorch's Adam step
    ``θ̃ = θ − d`` (no weight-decay term), then decays toward its anchor only when the
    gradient pushes it away (``c = −⟨g, θ − θ₀⟩ < 0``):

    $$
    r = \mathrm{clip}\Big(\frac{\|\tilde\theta - \theta_0\|_2 - \|\theta - \theta_0\|_2}
    {\|\tilde\theta - \theta_0\|_2}, 0, 1\Big), \qquad
    \theta \leftarrow \tilde\theta - \lambda\, r\, (\tilde\theta - \theta_0)
    $$

    ``λ`` (``weight_decay``) is not multiplied by the learning rate. Unanchored tensors take
    the plain Adam step with no decay. State per tensor: ``exp_avg``, ``exp_avg_sq``, the
    anchor (``"init"`` only) and ``max_exp_avg_sq`` with amsgrad; nothing else full-size.

    Args:
        params: tensors, ``model.named_parameters()``, or dicts of parameter groups, each
            with an optional ``anchor`` key (``"init"``, ``"zero"`` or ``None``).
        lr: learning rate.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ``ε``.
        weight_decay: SPD's ``λ``, the strength of the selective decay toward the anchor.
        amsgrad: use the maximum of the second moments.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, anchor="init"
        )
        super().__init__(params, defaults)

    def _step_bucket(self, group, params, grads, states, t):
        beta1, beta2 = group["betas"]
        ops.adam_spd_step_(
            params,
            grads,
            self._moments(states),
            self._anchors(group, states),
            t,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            scratch=self._scratch_for(params),
        )


class SGDFTP(_Fused):
    r"""SGD (PyTorch's form, with momentum, dampening, Nesterov) with Fast Trainable Projection.

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023
    (``ALGORITHMS.md`` §3, §4). The direction is ``d = lr · u`` with ``u = g + wd · θ``
    passed through the momentum buffer; each anchored tensor is then projected:

    $$
    c = (\theta - d) - \theta_0, \quad n = \mathrm{MARS}(c) + 10^{-8}, \quad
    \theta \leftarrow \theta_0 + \mathrm{clip}(\gamma / n, 0, 1) \odot c
    $$

    with the learned radius ``γ`` of `AdamFTP`. Unanchored tensors take the plain SGD step.

    Args:
        params: tensors, ``model.named_parameters()``, or dicts of parameter groups, each
            with an optional ``anchor`` key (``"init"``, ``"zero"`` or ``None``).
        lr: learning rate.
        momentum: momentum factor ``μ``.
        dampening: dampening ``τ`` of the momentum.
        weight_decay: L2 penalty added to the gradient (projected too).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        k: in ``[0, 1]``; positive radius gradients are multiplied by it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        k: float = 1.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            k=k,
            anchor="init",
        )
        super().__init__(params, defaults)

    def _check_group(self, group):
        super()._check_group(group)
        owner = type(self).__name__
        _number(owner, "lr", group["lr"], 0.0)
        _number(owner, "momentum", group["momentum"], 0.0)
        _number(owner, "dampening", group["dampening"], 0.0, 1.0)
        _number(owner, "weight_decay", group["weight_decay"], 0.0)
        _number(owner, "k", group["k"], 0.0, 1.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov needs momentum > 0 and dampening == 0")

    def _init_state(self, group, p, state):
        if "step" not in state:
            state["step"] = self._new_step(p)
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["anchor"] is not None:
            self._init_radius(p, state)

    def _step_bucket(self, group, params, grads, states, t):
        ops.sgd_ftp_step_(
            params,
            grads,
            [s.get("momentum_buffer") for s in states],
            self._anchors(group, states),
            states,
            t,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            k=group["k"],
            scratch=self._scratch_for(params),
        )


class _Wrapper(_Anchored):
    """Shares the wrapped optimizer's ``param_groups``, so schedulers and ``zero_grad`` see one set."""

    def __init__(self, optimizer, defaults):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        # the base's defaults too: schedulers look there for 'betas' or 'momentum'
        super().__init__(optimizer.param_groups, {**optimizer.defaults, **defaults})
        # one list: a group added through either optimizer is seen by both
        self.param_groups = optimizer.param_groups

    def add_param_group(self, param_group):
        if getattr(self, "param_groups", None) is not self.optimizer.param_groups:
            super().add_param_group(param_group)  # in __init__: the wrapped optimizer's groups
            return
        self._check_group({**self.defaults, **param_group})
        self.optimizer.add_param_group(param_group)
        self._adopt_groups()

    def _adopt_groups(self):
        """Give groups added to the wrapped optimizer directly the wrapper's defaults and anchors."""
        for group in self.param_groups:
            if "anchor" not in group or any(key not in group for key in self.defaults):
                self._check_group({**self.defaults, **group})
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
            if group["anchor"] == "init":
                for p in group["params"]:
                    if "anchor" not in self.state[p]:
                        self.state[p]["anchor"] = p.detach().clone(memory_format=torch.preserve_format)

    def state_dict(self) -> dict:
        """The wrapper's state plus the wrapped optimizer's (key ``"base"``)."""
        state_dict = super().state_dict()
        state_dict["base"] = self.optimizer.state_dict()
        return state_dict

    def _own_state_dict(self, state_dict):
        return {k: v for k, v in state_dict.items() if k != "base"}

    def _load_base(self, state_dict):
        if "base" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}: the state dict has no 'base' entry (the wrapped optimizer's)"
            )
        self.optimizer.load_state_dict(state_dict["base"])

    def _after_load(self):
        # Both loads replaced their group dicts: share the wrapped optimizer's again.
        for own, base in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            for key, value in own.items():
                base.setdefault(key, value)
        self.param_groups = self.optimizer.param_groups


class FTP(_Wrapper):
    r"""Fast Trainable Projection around any torch optimizer.

    Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023
    (``ALGORITHMS.md`` §6). After the wrapped optimizer's step ``θ̃``, each anchored tensor
    is projected:

    $$
    c = \tilde\theta - \theta_0, \quad n = \mathrm{MARS}(c) + 10^{-8}, \quad
    \theta \leftarrow \theta_0 + \mathrm{clip}(\gamma / n, 0, 1) \odot c
    $$

    with the learned radius ``γ`` of `AdamFTP` (the base's own weight decay, if any,
    is inside ``θ̃`` and projected too). ``FTP(torch.optim.AdamW(...))`` equals `AdamFTP`
    up to rounding. Groups of the wrapped optimizer may carry an ``anchor`` key.

    Args:
        optimizer: the base `torch.optim.Optimizer`; its ``param_groups`` are shared.
        k: in ``[0, 1]``; positive radius gradients are multiplied by it.
    """

    def __init__(self, optimizer: Optimizer, *, k: float = 1.0) -> None:
        super().__init__(optimizer, dict(k=k, anchor="init"))

    def _check_group(self, group):
        super()._check_group(group)
        _number(type(self).__name__, "k", group["k"], 0.0, 1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take the wrapped optimizer's step, then project every anchored tensor that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        self._adopt_groups()
        pending = []
        for group, params, grads in self._gather():
            if group["anchor"] is None:
                continue
            for bucket_params, bucket_grads in self._buckets(params, grads):
                states = [self.state[p] for p in bucket_params]
                for p, state in zip(bucket_params, states, strict=True):
                    if "step" not in state:
                        state["step"] = self._new_step(p)
                    self._init_radius(p, state)
                pending.append((group, bucket_params, bucket_grads, states))
        self.optimizer.step()
        # g is read after the base step, which must not change gradients in place (none of torch.optim does).
        for group, params, grads, states in pending:
            buffers = [s["prev_displacement"] for s in states]
            radius_grads = ops.radius_gradients_(
                grads, buffers, [s["prev_inv_norm"] for s in states], k=group["k"]
            )
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            t = ops.steps_vector(steps, _compute_dtype(params[0].dtype))
            anchors = [s.get("anchor") for s in states]
            displacements = ops.displacements_into(buffers, params, anchors)
            ops.ftp_finish(params, anchors, displacements, radius_grads, t, states, self._scratch_for(params))
        return loss


class SPD(_Wrapper):
    r"""Selective Projection Decay around any torch optimizer that does not decay weights itself.

    Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models",
    NeurIPS 2024 (``ALGORITHMS.md`` §6). Before the wrapped step it measures
    ``⟨g, θ − θ₀⟩`` and ``‖θ − θ₀‖₂`` per anchored tensor; after it, where
    ``c = −⟨g, θ − θ₀⟩ < 0``:

    $$
    \theta \leftarrow \tilde\theta - \lambda\, r\, (\tilde\theta - \theta_0), \qquad
    r = \mathrm{clip}\Big(\frac{\|\tilde\theta - \theta_0\|_2 - \|\theta - \theta_0\|_2}
    {\|\tilde\theta - \theta_0\|_2}, 0, 1\Big)
    $$

    ``SPD(torch.optim.Adam(...), weight_decay=λ)`` equals `AdamSPD` up to rounding.
    The wrapper's ``λ`` lives in each group under the key ``spd_weight_decay``.

    Args:
        optimizer: the base `torch.optim.Optimizer`, whose own ``weight_decay`` must be 0.
        weight_decay: SPD's ``λ`` (not multiplied by the learning rate).
    """

    def __init__(self, optimizer: Optimizer, *, weight_decay: float) -> None:
        super().__init__(optimizer, dict(spd_weight_decay=weight_decay, anchor="init"))

    def _check_group(self, group):
        super()._check_group(group)
        owner = type(self).__name__
        _number(owner, "weight_decay", group["spd_weight_decay"], 0.0)
        if group.get("weight_decay", 0) != 0:
            raise ValueError(
                f"{owner}: the wrapped optimizer has weight_decay={group['weight_decay']!r}; "
                "SPD replaces weight decay, so the base's must be 0"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Measure, take the wrapped optimizer's step, then decay selectively toward the anchors.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        self._adopt_groups()
        work = self._gather()
        for group in self.param_groups:
            self._check_group(group)
        pending = []
        for group, params, grads in work:
            if group["anchor"] is None:
                continue
            for bucket_params, bucket_grads in self._buckets(params, grads):
                anchors = [self.state[p].get("anchor") for p in bucket_params]
                displacements = self._displacements(bucket_params, anchors)
                alignment = torch.stack(
                    [ops.dot(g, c) for g, c in zip(bucket_grads, displacements, strict=True)]
                )
                distance = ops.norms(displacements)
                del displacements
                pending.append((group, bucket_params, anchors, alignment, distance))
        self.optimizer.step()
        for group, params, anchors, alignment, distance in pending:
            displacements = self._displacements(params, anchors)
            keep = ops.spd_keep(alignment, distance, ops.norms(displacements), group["spd_weight_decay"])
            for p, c, factor in zip(params, displacements, (keep - 1).unbind(0), strict=True):
                p.addcmul_(c, factor)
            del displacements
        return loss

    @staticmethod
    def _displacements(params, anchors):
        if anchors[0] is None:
            return list(params)
        return torch._foreach_sub(params, anchors)
