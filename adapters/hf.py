r"""tether's PyTorch optimizers in the Hugging Face ``transformers.Trainer``.

The Trainer builds its optimizer from two parameter groups: the tensors it decays
(``Trainer.get_decay_parameter_names``: every weight but biases and LayerNorm/RMSNorm weights)
with ``"weight_decay": TrainingArguments.weight_decay``, and the others with ``0.0``. A group's
key overrides the constructor's, so ``optimizer_cls_and_kwargs=(AdamSPD, {"weight_decay": 1.0})``
runs SPD with ``λ = TrainingArguments.weight_decay`` (0 by default: no decay at all), and anchors
the biases and norms too. `trainer_optimizer` (for ``optimizers=(optimizer, scheduler)``) and
`optimizer_cls_and_kwargs` (for the Trainer's argument of that name) build the optimizer from the
same split, mapped onto tether's anchors: the tensors the Trainer decays are anchored and keep the
``weight_decay`` given here (SPD's ``λ``, FTP's decoupled decay); biases and norms are unanchored,
with no weight decay, as the Trainer's own AdamW treats them.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["optimizer_cls_and_kwargs", "parameter_groups", "trainer_optimizer"]

#: The anchors an anchored group may have (``"init"``: the pre-trained weights; ``"zero"``: an adapter).
_ANCHORS = ("init", "zero")


def _trainer_decay_names(model: torch.nn.Module) -> list[str]:
    """The installed Trainer's rule: ``Trainer.get_decay_parameter_names`` reads only the model."""
    from transformers import Trainer

    return list(Trainer.get_decay_parameter_names(None, model))


def parameter_groups(
    model: torch.nn.Module,
    *,
    anchor: str = "init",
    decay_parameter_names: Iterable[str] | None = None,
) -> list[dict]:
    """The Trainer's decay/no-decay split of ``model``'s trainable parameters, as tether groups.

    Args:
        model: the model the Trainer trains; parameters with ``requires_grad=False`` (a frozen
            base under PEFT) are left out, as the Trainer leaves them out.
        anchor: the anchor of the tensors the Trainer decays: ``"init"`` (the pre-trained weights,
            copied when the optimizer is built) or ``"zero"`` (a LoRA adapter under SPD).
        decay_parameter_names: the names the Trainer decays; by default the installed Trainer's
            ``get_decay_parameter_names(model)`` (pass ``trainer.get_decay_parameter_names(model)``
            if your Trainer subclass overrides it).

    Returns:
        Up to two groups of ``(name, parameter)`` pairs (empty ones are dropped): the decayed
        tensors with ``"anchor": anchor`` and no ``weight_decay`` key (the optimizer's own applies),
        then the others with ``"anchor": None, "weight_decay": 0.0``.

    Raises:
        ValueError: an unknown ``anchor``, a name in ``decay_parameter_names`` that is not a
            parameter of ``model``, or no trainable parameter.
    """
    if anchor not in _ANCHORS:
        raise ValueError(
            f"anchor must be 'init' or 'zero', got {anchor!r} (the tensors the Trainer does not decay "
            "are unanchored already)"
        )
    named = dict(model.named_parameters())
    decayed = set(_trainer_decay_names(model) if decay_parameter_names is None else decay_parameter_names)
    unknown = sorted(decayed - set(named))
    if unknown:
        raise ValueError(f"decay_parameter_names names no parameter of the model: {unknown}")
    trainable = [(n, p) for n, p in named.items() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    groups = [
        {"params": [(n, p) for n, p in trainable if n in decayed], "anchor": anchor},
        {"params": [(n, p) for n, p in trainable if n not in decayed], "anchor": None, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def trainer_optimizer(
    model: torch.nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer],
    *,
    anchor: str = "init",
    decay_parameter_names: Iterable[str] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls(parameter_groups(model, ...), **kwargs)``: a tether optimizer for
    ``Trainer(optimizers=(optimizer, scheduler))``, built after the pre-trained weights are loaded.

    Args:
        model: the model, with its pre-trained weights (``"init"`` anchors copy them now).
        optimizer_cls: ``AdamSPD``, ``AdamFTP``, ``SGDFTP``, or any callable that takes parameter
            groups first (``lambda groups, **kw: SPD(torch.optim.Adam(groups, **kw), weight_decay=1.0)``).
        anchor: see `parameter_groups`.
        decay_parameter_names: see `parameter_groups`.
        **kwargs: the optimizer's arguments (``lr``, ``weight_decay``, ...); ``weight_decay``
            applies to the anchored group only.
    """
    return optimizer_cls(
        parameter_groups(model, anchor=anchor, decay_parameter_names=decay_parameter_names), **kwargs
    )


class _TrainerOptimizerFactory:
    """What ``Trainer.create_optimizer`` calls for a factory: ``factory()(model, **kwargs)``."""

    def __init__(self, optimizer_cls, anchor):
        self.optimizer_cls = optimizer_cls
        self.anchor = anchor

    def __call__(self, model, **kwargs):
        return trainer_optimizer(model, self.optimizer_cls, anchor=self.anchor, **kwargs)


def optimizer_cls_and_kwargs(
    optimizer_cls: Callable[..., torch.optim.Optimizer], *, lr: float, anchor: str = "init", **kwargs: Any
) -> tuple:
    """A value for ``Trainer(optimizer_cls_and_kwargs=...)`` that builds `trainer_optimizer`.

    The Trainer calls it with the model it trains, when it builds its optimizer, so the groups
    are those of `parameter_groups` and the Trainer's ``weight_decay`` never reaches them.
    ``lr`` is required: on this path the Trainer does not read ``TrainingArguments.learning_rate``.

    Args:
        optimizer_cls: as in `trainer_optimizer`.
        lr: the learning rate (the peak of the Trainer's scheduler).
        anchor: see `parameter_groups`.
        **kwargs: the optimizer's other arguments (``weight_decay``: SPD's ``λ``).

    Raises:
        ImportError: the installed transformers is older than 5.2 (the first whose Trainer calls
            optimizer factories); pass ``optimizers=(trainer_optimizer(...), scheduler)`` there.
    """
    try:
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401
    except ImportError:
        raise ImportError(
            "optimizer_cls_and_kwargs needs transformers >= 5.2 (its Trainer calls optimizer factories); "
            "pass optimizers=(trainer_optimizer(model, ...), scheduler) to the Trainer instead"
        ) from None
    if anchor not in _ANCHORS:
        raise ValueError(f"anchor must be 'init' or 'zero', got {anchor!r}")
    return functools.partial(_TrainerOptimizerFactory, optimizer_cls, anchor), {"lr": lr, **kwargs}
