r"""PyTorch optimizers for robust fine-tuning: FTP, SPD and the baselines (``ALGORITHMS.md`` §3–§8).

``AdamFTP``, ``SGDFTP`` and ``AdamSPD`` are `torch.optim.Optimizer`\ s with the base step
fused in; ``FTP``, ``SPD``, ``L2SP`` and ``MARSSP`` wrap any other torch optimizer; ``TPGM``
runs beside one, and ``wise_ft`` mixes fine-tuned and pre-trained weights. Each parameter group
takes an ``anchor`` key:

- ``"init"`` (default): the anchor ``θ₀`` is a copy of the tensor taken when the optimizer is built;
- ``"zero"``: ``θ₀ = 0`` and nothing is stored (PEFT/LoRA adapters, a new head pulled to zero);
- ``None``: unanchored, the tensor takes the plain base step.

All state (anchor, moments, step count, radius and its moments, previous displacement) lives in
``optimizer.state[p]``, so ``state_dict()`` / ``load_state_dict()`` carry it and a resumed run
continues bit for bit, through ``torch.distributed.checkpoint`` too. The arithmetic is
`tether.core`'s: per-tensor scalar rules are core calls on stacked vectors, and the full-size
passes are kernels checked against the core (``adapters/_torch_ops.py``): on the CPU one pass
over each tensor a block of rows at a time, elsewhere multi-tensor (``torch._foreach_*``) ops.
Parameters may be DTensors (FSDP2's ``fully_shard``, ``distribute_tensor``): a step runs on
the local shards, and a few collectives per step sum the per-tensor statistics across the ranks.
"""

import functools
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from .. import core
from . import _torch_ops as ops
from ._torch_tpgm import TPGM

__all__ = ["FTP", "L2SP", "MARSSP", "SGDFTP", "SPD", "TPGM", "AdamFTP", "AdamSPD", "wise_ft"]

ANCHOR_MODES = ("init", "zero", None)
#: 0-d state: the step count, FTP's radius and its moments.
_SCALAR_KEYS = frozenset(
    ("step", "radius", "radius_exp_avg", "radius_exp_avg_sq", "spd_ratio", "spd_decayed")
)
#: Keys kept out of ``Optimizer.load_state_dict``'s cast to the parameter's dtype (at least float32).
_KEPT_KEYS = (*_SCALAR_KEYS, "prev_inv_norm")
#: Full-size state keys whose shape must equal the parameter's.
_FULL_KEYS = frozenset(
    ("anchor", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "prev_displacement")
)


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _evaluate(closure):
    """The loss of `step(closure)`: the closure re-evaluates the model with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _number(owner, name, value, low, high=None, *, high_open=False):
    """Check that a hyperparameter is a finite real number in ``[low, high]`` (or ``[low, high)``)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a Python float, got {type(value).__name__}")
    too_high = high is not None and (value >= high if high_open else value > high)
    # comparisons, not math.isfinite: a float that torch.compile made an input (a scheduler's
    # momentum) is compared in the graph, and isfinite would break it
    if not low <= value < math.inf or too_high:
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{owner}: invalid {name} {value!r}; it must be finite and {bound}")


def _learning_rate(owner, lr):
    """Check ``lr``: a Python float (`_number`) or, as ``torch.optim`` takes it, a one-element floating tensor.

    A scheduler changes a tensor ``lr`` in place (``fill_``), so a compiled step sees the same input,
    not a new constant to guard on. Its value is checked where it is set (`_check_lr_value`): a step
    does not read a device value on the host.
    """
    if not isinstance(lr, torch.Tensor):
        _number(owner, "lr", lr, 0.0)
    elif lr.numel() != 1 or not torch.is_floating_point(lr):
        raise ValueError(
            f"{owner}: a tensor lr must hold one floating-point value, got {tuple(lr.shape)} {lr.dtype}"
        )


def _check_lr_value(owner, lr):
    """The value of a tensor ``lr`` (a host read: where a group is added or loaded, never in a step)."""
    if isinstance(lr, torch.Tensor):
        _number(owner, "lr", float(lr.detach().reshape(())), 0.0)


def _lr(group, device):
    """The group's ``lr`` as the kernels take it: a float, or a 0-d tensor on the tensors' ``device``
    (copied there without a wait if it is elsewhere)."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        return lr
    return lr.reshape(()).to(device, non_blocking=True)


def _flag(owner, name, value):
    """Check that a switch is a bool (``"yes"`` is truthy, and would silently switch it on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


# -- sharded parameters ------------------------------------------------------------------


def _dtensor_class():
    """``DTensor`` once ``torch.distributed.tensor`` is imported (no DTensor exists before), else ``None``.

    Not imported here: the import takes more than a second.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _is_sharded(x):
    """Whether ``x`` is a DTensor (sharded or replicated across a device mesh)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(x, dtensor)


def _local(x):
    """The local shard of a DTensor (which shares its memory), or ``x`` itself (``None`` too)."""
    return x.to_local() if _is_sharded(x) else x


def _check_layout(owner, name, p):
    """Parameters whose rows FTP and SPD can find: whole tensors or DTensors, not flattened shards.

    Raises:
        ValueError: ``p`` is a flat shard of FSDP1 (``FullyShardedDataParallel``, whatever its
            ``use_orig_params``), or a DTensor with a ``Partial`` placement.
    """
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"{owner}: parameter {_named(name)} is a flattened shard of FullyShardedDataParallel (FSDP1). "
            "FTP's norms are per row and per tensor and SPD's per tensor, and a flat shard holds "
            "pieces of several tensors, flattened: the step would take them over the wrong numbers. "
            "Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor "
            "parameters keep their shapes."
        )
    if _is_sharded(p) and any(placement.is_partial() for placement in p.placements):
        raise ValueError(
            f"{owner}: parameter {_named(name)} is a DTensor with a Partial placement {p.placements}"
        )


def _shards(params):
    """The `ops.Shards` of a bucket with DTensor parameters (``None`` when none is one).

    A mesh dimension that shards a tensor makes its whole-tensor sums partial; its MARS row
    sums too, unless it splits a matrix's rows (axis 0): each rank then holds whole rows.
    """
    if not any(_is_sharded(p) for p in params):
        return None
    layouts = []
    for p in params:
        whole, rows = [], []
        for dim, placement in enumerate(p.placements if _is_sharded(p) else ()):
            if placement.is_shard() and p.device_mesh.size(dim) > 1:
                group = p.device_mesh.get_group(dim)
                whole.append(group)
                if p.ndim < 2 or placement.dim != 0:
                    rows.append(group)
        layouts.append((tuple(whole), tuple(rows)))
    return ops.Shards(layouts)


def _mars_zeros(p, dtype):
    """Zeros shaped as ``MARS(p)`` (``prev_inv_norm``); for a DTensor, a DTensor on its mesh whose rows
    are split as ``p``'s and which is replicated where ``p`` is split along another axis."""
    shape = ops.mars_shape(p)
    if not _is_sharded(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    placements = _mars_placements(p)
    return sys.modules["torch.distributed.tensor"].zeros(
        shape, dtype=dtype, device_mesh=p.device_mesh, placements=placements
    )


def _mars_placements(p):
    replicate = sys.modules["torch.distributed.tensor"].Replicate()
    return tuple(pl if p.ndim >= 2 and pl.is_shard(0) else replicate for pl in p.placements)


#: FTP's per-tensor state beside the base step's (ALGORITHMS.md §4).
_FTP_KEYS = frozenset(("radius", "radius_exp_avg", "radius_exp_avg_sq", "prev_displacement", "prev_inv_norm"))
#: SPD's last ratio ``r`` and whether its condition held, per anchored tensor (for `diagnostics`).
_SPD_KEYS = frozenset(("spd_ratio", "spd_decayed"))


def _init_spd_record(p, state):
    """The 0-d tensors into which a SPD step records its ratio and condition (see `diagnostics`)."""
    if "spd_ratio" not in state:
        state["spd_ratio"] = torch.zeros((), dtype=_compute_dtype(p.dtype), device=p.device)
        state["spd_decayed"] = torch.zeros((), dtype=torch.bool, device=p.device)


def _check_dtype(owner, name, p):
    """FTP and SPD are defined for real floating-point tensors (norms, sign tests)."""
    if torch.is_complex(p):
        raise TypeError(f"{owner}: parameter {name} is complex ({p.dtype}), which is not supported")
    if not torch.is_floating_point(p):
        raise TypeError(f"{owner}: parameter {name} has dtype {p.dtype}; expected a floating-point dtype")


@functools.lru_cache(maxsize=1024)
def _expected_shapes(shape):
    """``{key: shape}``: the shape each checked state key of a parameter of ``shape`` (a ``torch.Size``)
    must have; a key not in it is not checked. Remembered: it is looked up at every step."""
    scalar = torch.Size(())
    return {
        **dict.fromkeys(_FULL_KEYS, shape),
        "prev_inv_norm": _rows_shape(shape),
        **dict.fromkeys(_SCALAR_KEYS, scalar),
    }


@functools.lru_cache(maxsize=1024)
def _rows_shape(shape):
    """``ops.mars_shape`` of a tensor of ``shape`` (a ``torch.Size``), remembered: it is checked at every step."""
    return torch.Size(core.mars_shape(shape))


def _layout(x):
    """``(mesh, placements)`` of a DTensor, ``None`` for a plain tensor."""
    return (x.device_mesh, tuple(x.placements)) if _is_sharded(x) else None


def _expected_layout(key, p):
    """The layout (`_layout`) the state ``key`` of ``p`` must have: a full-size tensor is sharded as
    ``p``, ``prev_inv_norm`` as its rows, and a scalar is a plain tensor."""
    if not _is_sharded(p) or key in _SCALAR_KEYS:
        return None
    return (p.device_mesh, _mars_placements(p) if key == "prev_inv_norm" else tuple(p.placements))


def _describe_layout(layout):
    return "a plain tensor" if layout is None else f"a DTensor {layout[1]} on {layout[0]}"


def _check_state(owner, name, p, state, *, device=True):
    """Each state tensor of ``p`` has its shape (and, with ``device``, its device); anchors its dtype;
    a DTensor parameter's full-size state is sharded as it is.

    ``name`` is the parameter's name, or a function of none that makes it (only an error needs it).
    Runs before every step, so the common case (no DTensor, the state as it was made) does little.

    Raises:
        ValueError: naming the parameter and the key.
    """
    dtensor = _dtensor_class()
    sharded = dtensor is not None and isinstance(p, dtensor)
    where = p.device
    cpu = where.type == "cpu"
    expected_shapes = _expected_shapes(p.shape)
    for key, value in state.items():
        expected = expected_shapes.get(key)
        if expected is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{owner}: the {key!r} of parameter {_named(name)} is a {type(value).__name__}, not a tensor"
            )
        wrong = value.shape != expected or (key == "anchor" and value.dtype != p.dtype)
        # `is_cpu` is a flag where `device` makes an object: this runs for every state tensor at every step
        if wrong or (device and not (value.is_cpu if cpu else value.device == where)):
            raise ValueError(
                f"{owner}: the {key!r} of parameter {_named(name)} is {tuple(value.shape)} {value.dtype}"
                + (f" on {value.device}" if device else "")
                + f"; it must be {tuple(expected)}"
                + (f" {p.dtype}" if key == "anchor" else "")
                + (f" on {p.device}" if device else "")
                + " (a state of another model or optimizer, or a model moved after the optimizer was built)"
            )
        if not (sharded or (dtensor is not None and isinstance(value, dtensor))):
            continue  # a plain tensor for a plain parameter: the layouts agree
        expected_layout = _expected_layout(key, p)
        if _layout(value) != expected_layout:
            raise ValueError(
                f"{owner}: the {key!r} of parameter {_named(name)} is {_describe_layout(_layout(value))}; it "
                f"must be {_describe_layout(expected_layout)} (load the state of sharded parameters with "
                "torch.distributed.checkpoint, which shards it as they are)"
            )


def _named(name):
    """A parameter's name given as a string or as a function that makes it."""
    return name() if callable(name) else name


def _zero_anchor_warning(owner, names):
    return (
        f"{owner}: parameters {', '.join(names)} have anchor='zero' but are not zero. FTP's radius "
        "starts at 1e-8, so the first step projects them to within 1e-8 of zero: a randomly "
        "initialised LoRA matrix would be wiped. For LoRA under FTP anchor the adapters at their "
        "own initialisation (anchor='init'); anchor='zero' is SPD's recipe (decay toward zero)."
    )


def _item(value):
    """A 0-d tensor (a DTensor's whole value) as a Python number."""
    if _is_sharded(value):
        value = value.full_tensor()
    return value.item()


def _keys(keys):
    return ", ".join(repr(k) for k in keys)


def _anchor_list(group, states):
    """Each tensor's ``θ₀`` for an ``"init"`` group, ``None`` per tensor for a ``"zero"`` one (a
    snapshot left from an earlier ``"init"`` is not used)."""
    if group["anchor"] == "zero":
        return [None] * len(states)
    return [s["anchor"] for s in states]


class _Anchored(Optimizer):
    """Shared bookkeeping: anchor snapshots, hyperparameter and gradient checks, state loading."""

    #: The method's name in a state dict (``state_dict()["method"]``): a state dict of another
    #: method (or of ``torch.optim``) is refused by `load_state_dict`.
    method = ""
    #: Whether the method projects with FTP's learned radius (its state and the zero-anchor warning).
    projects = False

    def add_param_group(self, param_group):
        merged = {**self.defaults, **param_group}
        self._check_group(merged)
        self._check_group_values(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_params(group, len(self.param_groups) - 1)
        except (TypeError, ValueError):
            self.param_groups.pop()  # nothing changes on bad input
            raise
        self._adopt_anchors(group)

    def _check_group(self, group):
        owner = type(self).__name__
        if group.get("anchor", "init") not in ANCHOR_MODES:
            raise ValueError(f"{owner}: unknown anchor {group['anchor']!r}; expected 'init', 'zero' or None")

    def _check_group_values(self, group):
        """What `_check_group` leaves to where a group is added or loaded: tensor hyperparameters' values."""

    def _check_params(self, group, gi):
        """Real floating-point parameters only; warn where FTP would project a nonzero tensor to zero."""
        owner = type(self).__name__
        for i, p in enumerate(group["params"]):
            _check_dtype(owner, self._name(group, gi, i), p)
            _check_layout(owner, self._name(group, gi, i), p)
        if self.projects and group["anchor"] == "zero":
            names = [
                self._name(group, gi, i)
                for i, p in enumerate(group["params"])
                if not p.is_meta and bool(p.detach().any())
            ]
            if names:
                warnings.warn(_zero_anchor_warning(owner, names), UserWarning, stacklevel=4)

    def _adopt_anchors(self, group):
        """Snapshot the anchor of every tensor of an ``"init"`` group that has none (a group whose
        ``anchor`` was changed after construction gets it now, never a silent zero)."""
        if group["anchor"] == "init":
            for p in group["params"]:
                state = self.state[p]
                if "anchor" not in state:
                    state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)

    # -- gradients ----------------------------------------------------------------------

    @staticmethod
    def _name(group, gi, i):
        names = group.get("param_names")
        return repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"

    def _gather(self):
        """``[(group, params, grads)]`` of the tensors with a gradient, all checked before any update.

        Every group is checked (hyperparameters, parameter and gradient dtypes, shapes, devices
        and layouts); then each tensor with a gradient gets the state its first step needs
        (`_init_group`: zeros), and the state each tensor holds is checked. Only then do the
        tensors of an ``"init"`` group that have no anchor get one. Empty tensors have nothing
        to update and are left out.
        """
        owner = type(self).__name__
        work, named = [], []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                name = functools.partial(self._name, group, gi, i)  # made only for an error
                if not p.is_floating_point():
                    _check_dtype(owner, name(), p)
                _check_layout(owner, name, p)
                if g.is_sparse:
                    raise TypeError(
                        f"{owner}: parameter {name()} has a sparse gradient, which is not supported"
                    )
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    if torch.is_complex(g):
                        raise TypeError(f"{owner}: the gradient of parameter {name()} is complex")
                    raise ValueError(
                        f"{owner}: the gradient of parameter {name()} is {tuple(g.shape)} {g.dtype} "
                        f"on {g.device}, the parameter {tuple(p.shape)} {p.dtype} on {p.device}"
                    )
                self._check_gradient(group, name, p, g)
                named.append((name, p))
                if p.numel() == 0:
                    continue
                params.append(p)
                grads.append(g)
            if params:
                work.append((group, params, grads))
        # the state is made before any is read: under torch.compile, `_init_group` runs eagerly
        self._init_group(*self.param_groups)
        for name, p in named:
            _check_state(owner, name, p, self.state.get(p, {}))
        for group in self.param_groups:
            self._adopt_anchors(group)
        return work

    def _check_gradient(self, group, name, p, g):
        """What the method needs of a gradient beyond its shape, dtype and device (``name``: `_named`)."""

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
        """A CPU bucket's `ops.Scratch` (the CPU's single pass, and its C kernels); ``None`` otherwise.

        float32 and float64 buckets, and bfloat16 ones where the C kernels were built. Elsewhere
        the multi-tensor kernels run: an accelerator has them and a caching allocator; float16
        (and bfloat16 without the kernels) keeps the path whose statistics are computed as they were.
        """
        dtype = params[0].dtype
        if params[0].device.type != "cpu" or not (
            dtype in (torch.float32, torch.float64) or ops.kernels_available(dtype)
        ):
            return None
        if "_scratch" not in self.__dict__:  # made lazily: torch pickles only the state and groups
            self._scratch = ops.Scratch()
        return self._scratch

    def _new_step(self, p):
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _init_state(self, group, p, state):
        """Make the state that ``p``'s first step of ``group`` needs (none beside the anchor here)."""

    def _init_group(self, *groups):
        """Make the state of the groups' tensors that have a gradient, before a step reads any.

        ``torch.compile`` runs a method of this name eagerly while it traces a step (as it does for
        ``torch.optim``'s optimizers): the traced step finds its state instead of creating it, so the
        next step runs the same graph. It reads the state after the first call, hence one call for
        every group. The state is zeros, as a step would make it; a tensor that the step refuses
        gets none: `_gather` calls it once every tensor passed its checks.
        """
        for group in groups:
            for p in group["params"]:
                if p.grad is not None and p.numel():
                    self._init_state(group, p, self.state[p])

    def _bucket_view(self, params, grads):
        """``(params, grads, states, shards)`` of a bucket as the kernels take it.

        For DTensor parameters: the local shards, dicts of the local shards of their state (the
        same tensors, updated in place), and the `ops.Shards` that finishes their sums across ranks.
        """
        states = [self.state[p] for p in params]
        shards = _shards(params)
        if shards is None:
            return params, grads, states, None
        local_states = [{key: _local(value) for key, value in state.items()} for state in states]
        return [_local(p) for p in params], [_local(g) for g in grads], local_states, shards

    @torch.no_grad()
    def diagnostics(self) -> dict[str, dict]:
        """Per-tensor numbers to log from a training loop, by parameter name.

        For every tensor of an anchored group: ``"distance"``, ``‖θ − θ₀‖₂`` (θ₀ = 0 for a zero
        anchor); with FTP, ``"radius"``, the learned radius ``γ``; with SPD, ``"ratio"``, the last
        step's ratio ``r = clip((‖θ̃ − θ₀‖ − ‖θ − θ₀‖) / ‖θ̃ − θ₀‖, 0, 1)``, and ``"decayed"``,
        whether its condition ``−⟨g, θ − θ₀⟩ < 0`` held (so that ``θ`` was pulled back by ``λr``).
        Unanchored tensors get an empty dict. The names are ``param_names`` when the optimizer was
        given ``named_parameters()``, else ``"<group>.<index>"``.

        Python floats and bools: reading them waits for the device, so call this to log, not
        inside a compiled step.
        """
        out = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = names[i] if names else f"{gi}.{i}"
                state = self.state.get(p, {})
                entry = {}
                mode = group.get("anchor")
                if mode == "zero" or (mode == "init" and "anchor" in state):
                    displacement = p if mode == "zero" else p - state["anchor"]
                    entry["distance"] = _item(
                        torch.linalg.vector_norm(displacement.to(_compute_dtype(p.dtype)))
                    )
                if mode is not None and "radius" in state:
                    entry["radius"] = _item(state["radius"])
                if mode is not None and "spd_ratio" in state:
                    entry["ratio"] = _item(state["spd_ratio"])
                    entry["decayed"] = bool(_item(state["spd_decayed"]))
                out[name] = entry
        return out

    def state_dict(self) -> dict:
        """The optimizer's state (anchors, moments, radii, step counts) and groups, tagged with its method.

        Every tensor that requires a gradient has its whole state, zeros where it has not stepped
        yet (the state its first step makes), and tensors of an ``"init"`` group whose anchor was
        switched on since the last step get their anchor now: the saved state is the one the next
        step would use, and a freshly built optimizer's is the template that
        ``torch.distributed.checkpoint`` loads a checkpoint into (it loads only what the template has).
        """
        for group in self.param_groups:
            self._adopt_anchors(group)
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(group, p, self.state[p])
        state_dict = super().state_dict()
        state_dict["method"] = self.method
        return state_dict

    def _init_radius(self, p, state):
        if "radius" not in state:
            zero = torch.zeros((), dtype=_compute_dtype(p.dtype), device=p.device)
            state["radius"] = zero
            state["radius_exp_avg"] = zero.clone()
            state["radius_exp_avg_sq"] = zero.clone()
            state["prev_displacement"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # the statistics are at least float32 (ALGORITHMS.md §9): 1/n overflows in float16
            state["prev_inv_norm"] = _mars_zeros(p, _compute_dtype(p.dtype))

    # -- state dict ---------------------------------------------------------------------

    def _own_state_dict(self, state_dict):
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` of the same method, checked against the parameters before anything changes.

        Raises:
            ValueError: the state dict is another method's (its ``"method"`` tag, or a group without
                this method's hyperparameters, as a ``torch.optim.Adam`` state dict is), a group's
                size or hyperparameters are wrong, or a tensor's saved state lacks a key this
                method needs, has one it does not keep, or has a tensor of the wrong shape (the
                message names the parameter and the key).
        """
        owner = type(self).__name__
        tag = state_dict.get("method")
        if tag is not None and tag != self.method:
            raise ValueError(f"{owner}: the state dict was saved by {tag}, not by {self.method}")
        own = self._own_state_dict(state_dict)
        saved_groups, saved_state = own.get("param_groups"), own.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError(f"{owner}: not an optimizer state dict (it needs 'state' and 'param_groups')")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{owner}: the state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        index = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            # (torch's own load adds "differentiable" to the defaults: a second load must not ask for it)
            missing = [key for key in self.defaults if key not in saved and key != "differentiable"]
            if missing:
                raise ValueError(
                    f"{owner}: parameter group {gi} of the state dict has no {_keys(missing)}: it was "
                    f"not saved by {self.method}"
                )
            self._check_group(saved)
            self._check_group_values(saved)
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{owner}: parameter group {gi} of the state dict has a different size")
            for i, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                index[key] = (p, self._name(group, gi, i), saved)
        for key, values in saved_state.items():
            if key in index:
                p, name, saved = index[key]
                self._check_saved_state(owner, name, p, values, saved)
        # Optimizer.load_state_dict casts floating state to the parameter's dtype (the statistics
        # stay at least float32 for 16-bit parameters) and leaves 'step' where it was saved: load
        # those apart.
        kept = {key: {k: values[k] for k in _KEPT_KEYS if k in values} for key, values in saved_state.items()}
        stripped = {
            key: {k: v for k, v in values.items() if k not in _KEPT_KEYS}
            for key, values in saved_state.items()
        }
        self._load_base(state_dict)
        super().load_state_dict({"state": stripped, "param_groups": saved_groups})
        self._after_load()
        for key, values in kept.items():
            if key in index:
                p = index[key][0]
                for k, v in values.items():
                    dtype = v.dtype if k in ("step", "spd_decayed") else _compute_dtype(p.dtype)
                    self.state[p][k] = v.to(device=p.device, dtype=dtype, copy=True)

    def _check_saved_state(self, owner, name, p, values, group):
        """The keys this method keeps for a tensor of ``group``, each of the parameter's shape."""
        if not isinstance(values, dict):
            raise ValueError(f"{owner}: the saved state of parameter {name} is not a dict")
        unknown = sorted(set(values) - self._known_keys())
        if unknown:
            raise ValueError(
                f"{owner}: the saved state of parameter {name} has {_keys(unknown)}, which "
                f"{self.method} does not keep: it is another optimizer's state"
            )
        mode = group["anchor"]
        required = {"anchor"} if mode == "init" else set()
        if "step" in values:
            required |= self._stepped_keys(group)
            if self.projects and mode is not None:
                required |= _FTP_KEYS
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(
                f"{owner}: the saved state of parameter {name} has no {_keys(missing)} "
                f"(anchor mode {mode!r}): it is another optimizer's state"
            )
        _check_state(owner, name, p, values, device=False)

    def _known_keys(self):
        """Every state key this method may keep for a tensor."""
        return {"anchor"} | (_FTP_KEYS if self.projects else set())

    def _stepped_keys(self, group):
        """The state keys of a tensor of ``group`` that has taken a step (beside FTP's and the anchor)."""
        return set()

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
                bucket_params, bucket_grads, states, shards = self._bucket_view(bucket_params, bucket_grads)
                steps = [s["step"] for s in states]
                t = ops.advance_steps_(steps, _compute_dtype(bucket_params[0].dtype))
                self._step_bucket(group, bucket_params, bucket_grads, states, t, shards)
        return loss

    def _check_group_values(self, group):
        _check_lr_value(type(self).__name__, group["lr"])

    @staticmethod
    def _anchors(group, states):
        """``None`` for an unanchored group, else each tensor's ``θ₀`` (``None`` for a zero anchor)."""
        if group["anchor"] is None:
            return None
        return _anchor_list(group, states)


class _AdamBase(_Fused):
    def _check_group(self, group):
        super()._check_group(group)
        owner = type(self).__name__
        _learning_rate(owner, group["lr"])
        _number(owner, "eps", group["eps"], 0.0)
        _number(owner, "weight_decay", group["weight_decay"], 0.0)
        _flag(owner, "amsgrad", group["amsgrad"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{owner}: betas must be a pair of floats, got {betas!r}")
        for j, beta in enumerate(betas):
            _number(owner, f"betas[{j}]", beta, 0.0, 1.0, high_open=True)

    def _known_keys(self):
        return super()._known_keys() | {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}

    def _stepped_keys(self, group):
        return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set())

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

    method = "AdamFTP"
    projects = True

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

    def _step_bucket(self, group, params, grads, states, t, shards):
        beta1, beta2 = group["betas"]
        ops.adam_ftp_step_(
            params,
            grads,
            self._moments(states),
            self._anchors(group, states),
            states,
            t,
            lr=_lr(group, params[0].device),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            k=group["k"],
            scratch=self._scratch_for(params),
            shards=shards,
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

    method = "AdamSPD"

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

    def _step_bucket(self, group, params, grads, states, t, shards):
        beta1, beta2 = group["betas"]
        ops.adam_spd_step_(
            params,
            grads,
            self._moments(states),
            self._anchors(group, states),
            t,
            lr=_lr(group, params[0].device),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            scratch=self._scratch_for(params),
            shards=shards,
            record=None if group["anchor"] is None else states,
        )

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        if group["anchor"] is not None:
            _init_spd_record(p, state)

    def _known_keys(self):
        return super()._known_keys() | _SPD_KEYS


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

    method = "SGDFTP"
    projects = True

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
        _learning_rate(owner, group["lr"])
        _number(owner, "momentum", group["momentum"], 0.0)
        _number(owner, "dampening", group["dampening"], 0.0, 1.0)
        _number(owner, "weight_decay", group["weight_decay"], 0.0)
        _number(owner, "k", group["k"], 0.0, 1.0)
        _flag(owner, "nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov needs momentum > 0 and dampening == 0")

    def _known_keys(self):
        return super()._known_keys() | {"step", "momentum_buffer"}

    def _stepped_keys(self, group):
        return {"step"} | ({"momentum_buffer"} if group["momentum"] != 0 else set())

    def _init_state(self, group, p, state):
        if "step" not in state:
            state["step"] = self._new_step(p)
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["anchor"] is not None:
            self._init_radius(p, state)

    def _step_bucket(self, group, params, grads, states, t, shards):
        ops.sgd_ftp_step_(
            params,
            grads,
            [s.get("momentum_buffer") for s in states],
            self._anchors(group, states),
            states,
            t,
            lr=_lr(group, params[0].device),
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            k=group["k"],
            scratch=self._scratch_for(params),
            shards=shards,
        )


#: A wrapper's per-tensor flag: the saved ``"base"`` state is the template of a first step, not one taken.
_UNSTEPPED = "base_unstepped"


def _is_unstepped(flag, owner, key):
    if flag is None:  # saved before the flag existed: the base state counts as stepped
        return False
    if isinstance(flag, torch.Tensor) and flag.numel() == 1:
        flag = flag.item()
    if not isinstance(flag, (bool, int)):
        raise ValueError(f"{owner}: the {_UNSTEPPED!r} state of parameter {key!r} is not a bool")
    return bool(flag)


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

    def _check_gradient(self, group, name, p, g):
        """A fused CPU base (``fused=True``) reads the parameter and the gradient in memory order
        (torch 2.13, unlike CUDA's fused kernels, does not check): their layouts must agree, or the
        wrapped step would be silently wrong."""
        if not group.get("fused") or p.device.type != "cpu":
            return
        contiguous = p.is_contiguous()
        if contiguous != g.is_contiguous() or (not contiguous and g.stride() != p.stride()):
            raise ValueError(
                f"{type(self).__name__}: the gradient of parameter {_named(name)} has strides {g.stride()}, "
                f"the parameter {p.stride()}. The wrapped {type(self.optimizer).__name__}(fused=True) reads "
                "both in memory order on the CPU, so its step would be wrong: give the gradient the "
                "parameter's layout (p.grad = p.grad.contiguous() for a contiguous parameter) or build "
                "the base without fused=True"
            )

    def add_param_group(self, param_group):
        if getattr(self, "param_groups", None) is not self.optimizer.param_groups:
            super().add_param_group(param_group)  # in __init__: the wrapped optimizer's groups
            return
        self._check_group({**self.defaults, **param_group})
        self.optimizer.add_param_group(param_group)
        try:
            self._adopt_groups()
        except (TypeError, ValueError):
            self.optimizer.param_groups.pop()  # nothing changes on bad input
            raise

    def _adopt_groups(self, anchors=True):
        """Give groups added to the wrapped optimizer directly the wrapper's defaults and anchors.

        A step passes ``anchors=False``: its `_gather` takes the anchors once every check passed.
        """
        for gi, group in enumerate(self.param_groups):
            if "anchor" not in group or any(key not in group for key in self.defaults):
                merged = {**self.defaults, **group}
                self._check_group(merged)
                self._check_params(merged, gi)
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
            if anchors:
                self._adopt_anchors(group)

    def __getstate__(self):
        # torch.optim pickles the state and groups only; the groups are the wrapped optimizer's
        # (one list, which pickle and deepcopy keep shared)
        return {**super().__getstate__(), "optimizer": self.optimizer}

    def state_dict(self) -> dict:
        """The wrapper's state, each tensor's holding the wrapped optimizer's under ``"base"``.

        One ``state`` and one ``param_groups`` (the groups are shared), which is all that
        ``torch.distributed.checkpoint`` keeps of an optimizer's state dict. A tensor that
        requires a gradient and has no state in the wrapped optimizer yet gets the state its
        first step would make (see `_Anchored.state_dict`): the wrapped optimizer takes a step
        with zero gradients and ``lr = 0`` for those tensors alone, as
        ``torch.distributed.checkpoint`` does to initialise a torch optimizer, and that state is
        then taken out of it again.
        """
        state_dict = super().state_dict()
        base, fresh = self._base_state_dict()
        for index, values in base["state"].items():
            entry = state_dict["state"].setdefault(index, {})
            entry["base"] = values
            # that first-step state is a template: loaded back, it must not count as a step taken
            entry[_UNSTEPPED] = torch.tensor(index in fresh, device="cpu")
        return state_dict

    def _base_state_dict(self):
        """The wrapped optimizer's ``state_dict()``, with the state a first step makes for the tensors
        that have none (see `state_dict`), and the state-dict indices of those tensors; the wrapped
        optimizer itself is left as it was."""
        base = self.optimizer
        params = [p for group in base.param_groups for p in group["params"]]
        fresh = {id(p) for p in params if p.requires_grad and not base.state.get(p)}
        indices = {i for i, p in enumerate(params) if id(p) in fresh}
        if not fresh:
            return base.state_dict(), indices
        grads = [p.grad for p in params]
        rates = [group.get("lr") for group in base.param_groups]
        try:
            for p in params:
                p.grad = torch.zeros_like(p) if id(p) in fresh else None
            for group, lr in zip(base.param_groups, rates, strict=True):
                if lr is not None:
                    group["lr"] = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0
            with torch.no_grad():
                base.step()
            return base.state_dict(), indices
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            for group, lr in zip(base.param_groups, rates, strict=True):
                if lr is not None:
                    group["lr"] = lr
            for p in params:
                if id(p) in fresh:
                    base.state.pop(p, None)

    def _own_state_dict(self, state_dict):
        """The wrapper's part: each tensor's state without the wrapped optimizer's (``"base"``)."""
        state = state_dict.get("state")
        if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
            return state_dict
        own = {
            key: {k: v for k, v in values.items() if k not in ("base", _UNSTEPPED)}
            for key, values in state.items()
        }
        return {**state_dict, "state": own}

    def _load_base(self, state_dict):
        owner = type(self).__name__
        if "base" in state_dict:  # saved before the wrapped optimizer's state moved into each tensor's
            self.optimizer.load_state_dict(state_dict["base"])
            return
        base = {}
        for key, values in state_dict["state"].items():
            if "base" in values:
                if not isinstance(values["base"], dict):
                    raise ValueError(f"{owner}: the 'base' state of parameter {key!r} is not a dict")
                if not _is_unstepped(values.get(_UNSTEPPED), owner, key):
                    base[key] = values["base"]  # a template's is left out: the tensor starts afresh
        self.optimizer.load_state_dict({"state": base, "param_groups": state_dict["param_groups"]})

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

    method = "FTP"
    projects = True

    def __init__(self, optimizer: Optimizer, *, k: float = 1.0) -> None:
        super().__init__(optimizer, dict(k=k, anchor="init"))

    def _check_group(self, group):
        super()._check_group(group)
        _number(type(self).__name__, "k", group["k"], 0.0, 1.0)

    def _known_keys(self):
        return super()._known_keys() | {"step"}

    def _stepped_keys(self, group):
        return {"step"}

    def _init_state(self, group, p, state):
        if group["anchor"] is not None:
            if "step" not in state:
                state["step"] = self._new_step(p)
            self._init_radius(p, state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take the wrapped optimizer's step, then project every anchored tensor that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        self._adopt_groups(anchors=False)
        pending = []
        for group, params, grads in self._gather():
            if group["anchor"] is None:
                continue
            for bucket_params, bucket_grads in self._buckets(params, grads):
                pending.append((group, *self._bucket_view(bucket_params, bucket_grads)))
        self.optimizer.step()
        # g is read after the base step, which must not change gradients in place (none of torch.optim does).
        for group, params, grads, states, shards in pending:
            steps = [s["step"] for s in states]
            t = ops.advance_steps_(steps, _compute_dtype(params[0].dtype))
            ops.ftp_after_step_(
                params, grads, _anchor_list(group, states), states, t,
                k=group["k"], scratch=self._scratch_for(params), shards=shards,
            )  # fmt: skip
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

    method = "SPD"

    def __init__(self, optimizer: Optimizer, *, weight_decay: float) -> None:
        super().__init__(optimizer, dict(spd_weight_decay=weight_decay, anchor="init"))

    def _init_state(self, group, p, state):
        if group["anchor"] is not None:
            _init_spd_record(p, state)

    def _known_keys(self):
        return super()._known_keys() | _SPD_KEYS

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
        self._adopt_groups(anchors=False)
        pending = []
        for group, params, grads in self._gather():
            if group["anchor"] is None:
                continue
            for bucket_params, bucket_grads in self._buckets(params, grads):
                for p in bucket_params:
                    _init_spd_record(p, self.state[p])
                params_, grads_, states, shards = self._bucket_view(bucket_params, bucket_grads)
                anchors = _anchor_list(group, states)
                scratch = self._scratch_for(params_)
                alignment, squared_distance = ops.spd_measure(params_, anchors, grads_, scratch)
                pending.append(
                    (group, params_, anchors, states, alignment, squared_distance, scratch, shards)
                )
        self.optimizer.step()
        for group, params, anchors, states, alignment, squared_distance, scratch, shards in pending:
            _, new_squared_distance = ops.spd_measure(params, anchors, scratch=scratch)
            statistics = ops.spd_statistics(alignment, squared_distance, new_squared_distance, shards)
            strength = 1 - ops.spd_keep(*statistics, group["spd_weight_decay"], states)
            ops.decay_toward_anchors_(params, anchors, strength)
        return loss


class L2SP(_Wrapper):
    r"""L2-SP around any torch optimizer: an L2 penalty toward the anchor, seen as a gradient term.

    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks", ICML 2018 (``ALGORITHMS.md`` §8). The loss gains ``(α/2) ‖θ − θ₀‖₂²`` over the
    anchored tensors, so the wrapped optimizer steps on

    $$
    g \leftarrow g + \alpha\,(\theta - \theta_0)
    $$

    and its momentum or Adam's moments see the penalty. ``p.grad`` is swapped for the
    penalized gradient during the wrapped step and put back afterwards. The wrapper's ``α``
    lives in each group under the key ``l2sp_alpha``; unanchored groups (``anchor=None``) take
    the plain step.

    Args:
        optimizer: the base `torch.optim.Optimizer`; its ``param_groups`` are shared.
        alpha: the penalty's strength ``α >= 0``.
    """

    method = "L2SP"

    def __init__(self, optimizer: Optimizer, *, alpha: float) -> None:
        super().__init__(optimizer, dict(l2sp_alpha=alpha, anchor="init"))

    def _check_group(self, group):
        super()._check_group(group)
        _number(type(self).__name__, "alpha", group["l2sp_alpha"], 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take the wrapped optimizer's step on the penalized gradients of the anchored tensors.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        self._adopt_groups(anchors=False)
        swapped = []
        for group, params, grads in self._gather():
            if group["anchor"] is None:
                continue
            anchors = _anchor_list(group, [self.state[p] for p in params])
            for p, g, anchor in zip(params, grads, anchors, strict=True):
                swapped.append((p, g))
                p.grad = _l2_sp_gradient(g, p, anchor, group["l2sp_alpha"])
        try:
            self.optimizer.step()
        finally:
            for p, g in swapped:
                p.grad = g
        return loss


def _l2_sp_gradient(grad, param, anchor, alpha):
    """``core.l2_sp_gradient``, ``g + α(θ − θ₀)``; 16-bit tensors in float32 (ATen's 16-bit
    arithmetic rounds differently in its vector and scalar loops, so its bits would follow how
    the threads split the tensor)."""
    wide = ops.statistics_dtype(grad.dtype)
    anchor = None if anchor is None else anchor.to(wide)
    return core.l2_sp_gradient(grad.to(wide), param.to(wide), anchor, alpha, xp=ops.xp).to(grad.dtype)


class MARSSP(_Wrapper):
    r"""MARS-SP around any torch optimizer: after each step, the projection onto a fixed MARS ball.

    Gouk, Hospedales, Pontil, "Distance-Based Regularisation of Deep Networks for Fine-Tuning",
    ICLR 2021 (``ALGORITHMS.md`` §8). After the wrapped optimizer's step ``θ̃``, each anchored
    tensor is projected, row by row (the output units), onto the ball of radius ``γ``:

    $$
    c = \tilde\theta - \theta_0, \quad n = \mathrm{MARS}(c), \quad
    \theta \leftarrow \theta_0 + \mathrm{clip}(\gamma / n, 0, 1) \odot c
    $$

    Rows inside the ball are untouched. FTP (`FTP`, `AdamFTP`) learns this radius per tensor
    instead. The wrapper's ``γ`` lives in each group under the key ``marssp_radius``.

    Args:
        optimizer: the base `torch.optim.Optimizer`; its ``param_groups`` are shared.
        radius: the fixed radius ``γ >= 0`` of every anchored tensor's rows.
    """

    method = "MARSSP"

    def __init__(self, optimizer: Optimizer, *, radius: float) -> None:
        super().__init__(optimizer, dict(marssp_radius=radius, anchor="init"))

    def _check_group(self, group):
        super()._check_group(group)
        _number(type(self).__name__, "radius", group["marssp_radius"], 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take the wrapped optimizer's step, then project every anchored tensor that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = _evaluate(closure)
        self._adopt_groups(anchors=False)
        work = [
            (group, *self._bucket_view(params, grads))
            for group, params, grads in self._gather()
            if group["anchor"] is not None
        ]
        self.optimizer.step()
        for group, params, _, states, shards in work:
            anchors = _anchor_list(group, states)
            displacements = [p if anchor is None else p - anchor for p, anchor in zip(params, anchors)]
            # summed as every step sums: thread-independent; across the ranks for shards
            norms = [ops.row_sum(torch.abs(c)) for c in displacements]
            if shards is not None:
                _, norms = shards.sums(rows=norms)
            for p, anchor, c, norm in zip(params, anchors, displacements, norms, strict=True):
                projected = core.project(c, group["marssp_radius"], norm, xp=ops.xp)
                p.copy_(projected if anchor is None else anchor + projected)
        return loss


def wise_ft(model: torch.nn.Module, anchor_state_dict: dict, alpha: float) -> dict:
    r"""WiSE-FT: the fine-tuned model's state interpolated with the pre-trained one.

    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (``ALGORITHMS.md`` §8).
    For every floating-point entry of ``model.state_dict()`` (parameters and floating buffers
    such as BatchNorm's running statistics):

    $$
    \theta = (1 - \alpha)\,\theta_0 + \alpha\,\theta_{ft}
    $$

    computed in at least float32; integer entries (BatchNorm's ``num_batches_tracked``) come from
    the fine-tuned model. The model is not changed: load the result with
    ``model.load_state_dict(wise_ft(model, anchor, alpha))``, so that several ``α`` can be tried
    from the same fine-tuned weights.

    Args:
        model: the fine-tuned model.
        anchor_state_dict: the pre-trained model's ``state_dict()`` (the same keys and shapes).
        alpha: in ``[0, 1]``; 0 is the pre-trained model, 1 the fine-tuned one.

    Returns:
        A state dict with the model's keys.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or the anchor's keys or shapes differ from the model's.
    """
    _number("wise_ft", "alpha", alpha, 0.0, 1.0)
    finetuned = model.state_dict()
    if set(anchor_state_dict) != set(finetuned):
        missing = sorted(set(finetuned) - set(anchor_state_dict))
        extra = sorted(set(anchor_state_dict) - set(finetuned))
        raise ValueError(f"wise_ft: the anchor state dict lacks {missing} and has extra {extra}")
    mixed = {}
    for key, value in finetuned.items():
        anchor = anchor_state_dict[key]
        if not isinstance(anchor, torch.Tensor) or anchor.shape != value.shape:
            shape = tuple(anchor.shape) if isinstance(anchor, torch.Tensor) else type(anchor).__name__
            raise ValueError(f"wise_ft: the anchor's {key!r} is {shape}, the model's {tuple(value.shape)}")
        if torch.is_floating_point(value):
            mixed[key] = core.wise_ft(
                anchor.to(device=value.device, dtype=value.dtype), value, alpha, xp=ops.xp
            )
        else:
            mixed[key] = value.clone()
    return mixed
