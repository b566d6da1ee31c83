"""tether's optimizers in the Hugging Face Trainer, on a tiny LLaMA built from a config.

The snippets of docs/integrations.md run as written; a Trainer run is compared with a plain
PyTorch loop on the same batches (sequential sampling, no gradient clipping, the same
linear schedule), which it equals bit for bit.
"""

import shutil
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from integration_docs import snippet
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from tether.adapters.hf import optimizer_cls_and_kwargs, parameter_groups, trainer_optimizer
from tether.adapters.torch import SPD, AdamFTP, AdamSPD

# biases on (attention_bias, mlp_bias) so that the split has biases as well as RMSNorm weights
CONFIG = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=16,
    attention_bias=True,
    mlp_bias=True,
)
STEPS, BATCH, LR = 6, 4, 1e-2
TOKENS = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(1))
DATASET = [{"input_ids": x, "labels": x} for x in TOKENS]
NO_DECAY = {  # biases and the RMSNorm weights: what the Trainer does not decay
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    *(f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkvo"),
    *(f"model.layers.0.mlp.{p}_proj.bias" for p in ("gate", "up", "down")),
}


def pretrained():
    """Stands for a pre-trained model: the same weights at every call."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def training_args(output_dir, **kwargs):
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
        logging_strategy="no",
        disable_tqdm=True,
        **({"save_strategy": "no"} | kwargs),
    )


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def plain_loop(optimizer_cls, groups=parameter_groups, **kwargs):
    """The Trainer's run without the Trainer: the helper's groups, the same batches and schedule."""
    model = pretrained()
    optimizer = optimizer_cls(groups(model), lr=LR, **kwargs)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    for t in range(STEPS):
        batch = TOKENS[t * BATCH : (t + 1) * BATCH]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
    return weights(model)


def run(code, **namespace):
    exec(code, namespace)
    return namespace


def assert_equal(got, expected):
    assert got.keys() == expected.keys()
    for n in got:
        assert torch.equal(got[n], expected[n]), n


def assert_differs(got, expected):
    assert any(not torch.allclose(got[n], expected[n], rtol=0, atol=1e-4) for n in got)


def test_the_trainer_overwrites_the_weight_decay_of_optimizer_cls_and_kwargs(tmp_path):
    # the trap the helper exists for: λ = 1.0 given, λ = 0.0 (TrainingArguments' default) used
    model = pretrained()
    ns = run(snippet("hf-trap"), model=model, args=training_args(tmp_path), train_dataset=DATASET)
    groups = ns["trainer"].create_optimizer().param_groups
    assert [(g["anchor"], g["weight_decay"]) for g in groups] == [("init", 0.0), ("init", 0.0)]
    ns["trainer"].train()
    # every tensor anchored, λ = 0
    assert_equal(weights(model), plain_loop(AdamSPD, groups=torch.nn.Module.parameters, weight_decay=0.0))
    # TrainingArguments(weight_decay=1.0) fixes λ for the decayed tensors, the norms stay anchored
    trainer = Trainer(
        model=pretrained(),
        args=training_args(tmp_path, weight_decay=1.0),
        optimizer_cls_and_kwargs=(AdamSPD, {"lr": LR, "weight_decay": 1.0}),
    )
    groups = trainer.create_optimizer().param_groups
    assert [(g["anchor"], g["weight_decay"]) for g in groups] == [("init", 1.0), ("init", 0.0)]


def test_parameter_groups_are_the_trainers_split():
    model = pretrained()
    trainer_names = Trainer(model=model, args=training_args("unused")).get_decay_parameter_names(model)
    anchored, unanchored = parameter_groups(model)
    assert anchored["anchor"] == "init" and "weight_decay" not in anchored
    assert [n for n, _ in anchored["params"]] == trainer_names
    assert unanchored["anchor"] is None and unanchored["weight_decay"] == 0.0
    assert {n for n, _ in unanchored["params"]} == NO_DECAY
    assert parameter_groups(model, anchor="zero")[0]["anchor"] == "zero"
    # a Trainer subclass's own names (get_decay_parameter_names overridden) are taken as given
    head, rest = parameter_groups(model, decay_parameter_names=["lm_head.weight"])
    assert [n for n, _ in head["params"]] == ["lm_head.weight"] and head["anchor"] == "init"
    assert len(rest["params"]) == len(list(model.parameters())) - 1 and rest["anchor"] is None
    # frozen tensors are left out, as the Trainer leaves them out; an empty group is dropped
    for name, p in model.named_parameters():
        p.requires_grad_(name in NO_DECAY)
    (only,) = parameter_groups(model)
    assert only["anchor"] is None and {n for n, _ in only["params"]} == NO_DECAY


def test_parameter_groups_refuse_what_would_anchor_nothing_silently():
    model = pretrained()
    with pytest.raises(ValueError, match="anchor must be 'init' or 'zero'"):
        parameter_groups(model, anchor=None)
    with pytest.raises(ValueError, match=r"names no parameter of the model: \['lm_head'\]"):
        parameter_groups(model, decay_parameter_names=["lm_head"])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        parameter_groups(model)
    with pytest.raises(ValueError, match="anchor must be 'init' or 'zero'"):
        optimizer_cls_and_kwargs(AdamSPD, lr=LR, anchor="none")


def test_optimizer_cls_and_kwargs_names_the_alternative_on_a_trainer_without_factories(monkeypatch):
    # transformers < 5.2 has no transformers.trainer_optimizer: its Trainer would call the factory
    # with the parameter groups
    monkeypatch.setitem(sys.modules, "transformers.trainer_optimizer", None)
    with pytest.raises(ImportError, match=r"transformers >= 5\.2.*optimizers=\(trainer_optimizer"):
        optimizer_cls_and_kwargs(AdamSPD, lr=LR, weight_decay=1.0)


@pytest.mark.parametrize("path", ["hf-optimizers", "hf-cls-and-kwargs"])
def test_the_helpers_keep_spds_lambda(path, tmp_path):
    model = pretrained()
    ns = run(snippet(path), model=model, args=training_args(tmp_path), train_dataset=DATASET)
    if path == "hf-optimizers":
        run(snippet("hf-train"), **ns)
    groups = ns["trainer"].optimizer.param_groups
    assert [(g["anchor"], g["weight_decay"]) for g in groups] == [("init", 1.0), (None, 0.0)]
    got = weights(model)
    assert_equal(got, plain_loop(AdamSPD, weight_decay=1.0))
    assert_differs(got, plain_loop(AdamSPD, weight_decay=0.0))  # λ acts
    # the unanchored biases and norms took plain Adam steps: they moved
    assert all(not torch.equal(got[n], w) for n, w in weights(pretrained()).items() if n in NO_DECAY)


def spd_around_adam(groups, **kwargs):
    return SPD(torch.optim.Adam(groups, **kwargs), weight_decay=1.0)


def test_a_wrapper_through_the_helper(tmp_path):
    model = pretrained()
    optimizer = trainer_optimizer(model, spd_around_adam, lr=LR)
    assert [(g["anchor"], g["weight_decay"]) for g in optimizer.param_groups] == [("init", 0), (None, 0.0)]
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    Trainer(
        model=model, args=training_args(tmp_path), train_dataset=DATASET, optimizers=(optimizer, scheduler)
    ).train()
    got = weights(model)
    assert_equal(got, plain_loop(spd_around_adam))
    assert_differs(got, plain_loop(AdamSPD, weight_decay=0.0))


@pytest.mark.parametrize("optimizer_cls", [AdamSPD, AdamFTP])
def test_resume_from_checkpoint_continues_exactly(optimizer_cls, tmp_path):
    code = snippet("hf-optimizers")
    if optimizer_cls is AdamFTP:  # the same snippet, with FTP's hyperparameters
        code = code.replace("AdamSPD", "AdamFTP").replace("weight_decay=1.0", "weight_decay=0.05")
        assert "AdamFTP, lr=1e-2, weight_decay=0.05" in code
    args = training_args(tmp_path, save_strategy="steps", save_steps=STEPS // 2)
    model = pretrained()
    ns = run(code, model=model, args=args, train_dataset=DATASET)
    run(snippet("hf-train"), **ns)
    uninterrupted = weights(model)
    shutil.rmtree(tmp_path / f"checkpoint-{STEPS}")  # as if the run had stopped after STEPS // 2

    model = pretrained()
    ns = run(code, model=model, args=args, train_dataset=DATASET)
    run(snippet("hf-resume"), **ns)
    assert ns["trainer"].state.global_step == STEPS
    assert type(ns["optimizer"]) is optimizer_cls and ns["trainer"].optimizer.optimizer is ns["optimizer"]
    assert_equal(weights(model), uninterrupted)
