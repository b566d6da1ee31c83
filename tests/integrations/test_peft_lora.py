"""PEFT LoRA with each method's recipe (docs/integrations.md, docs/torch.md), on a tiny LLaMA."""

import warnings

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch
from integration_docs import snippet
from test_hf_trainer import TOKENS, pretrained

STEPS, BATCH = 20, 4
# peft 0.21.2 calls a transformers 5.24 method that transformers deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def lora_model():
    """The PEFT model of the docs' snippet, on the pre-trained tiny LLaMA."""
    ns = {"model": pretrained()}
    exec(snippet("peft-model"), ns)
    return ns["model"], ns["lora"]


def loss_on_all(model):
    with torch.no_grad():
        return model(input_ids=TOKENS, labels=TOKENS).loss.item()


def fine_tune(method, **overrides):
    """``STEPS`` steps of the docs' recipe for ``method``, over the batches in turn."""
    model, lora = lora_model()
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    initial = [p.detach().clone() for p in lora]
    ns = {"lora": lora}
    code = snippet(method)
    for old, new in overrides.items():
        assert old in code
        code = code.replace(old, new)
    exec(code, ns)
    optimizer = ns["optimizer"]
    before = loss_on_all(model)
    for t in range(STEPS):
        batch = TOKENS[(t % 8) * BATCH : (t % 8 + 1) * BATCH]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if n in base:  # the base model is frozen: bit for bit the pre-trained weights
            assert torch.equal(p, base[n]), n
    assert len(lora) == 4 and {n.split(".")[-3] for n in names} == {"lora_A", "lora_B"}
    return model, optimizer, dict(zip(names, initial)), dict(zip(names, lora)), before


def merged_update(adapters):
    """``‖BA‖`` over the adapted layers (what LoRA adds to the pre-trained weights)."""
    a = {n: p for n, p in adapters.items() if ".lora_A." in n}
    return sum(
        torch.linalg.matrix_norm(adapters[n.replace(".lora_A.", ".lora_B.")] @ p) ** 2 for n, p in a.items()
    ).sqrt()


def test_spd_anchors_lora_at_zero_and_decays_it():
    model, optimizer, initial, adapters, before = fine_tune("peft-spd")
    assert [g["anchor"] for g in optimizer.param_groups] == ["zero"]
    assert all("anchor" not in s for s in optimizer.state.values())  # nothing stored for a zero anchor
    for n, p in adapters.items():
        assert not torch.equal(p, initial[n]), n  # A and B both trained
    assert loss_on_all(model) < before
    # λ acts: the adapters' update BA is pulled toward zero, i.e. the merged weights toward the base
    _, _, _, plain, _ = fine_tune("peft-spd", **{"weight_decay=1.0": "weight_decay=0.0"})
    assert merged_update(adapters) < 0.9 * merged_update(plain)


def test_ftp_anchors_lora_at_its_initialisation():
    model, optimizer, initial, adapters, before = fine_tune("peft-ftp")
    assert [g["anchor"] for g in optimizer.param_groups] == ["init"]
    for n, p in adapters.items():
        state = optimizer.state[p]
        assert torch.equal(state["anchor"], initial[n]), n  # the anchor is PEFT's initialisation
        assert not torch.equal(p, initial[n]), n
        # tethered: every row of θ − θ₀ is within the learned radius (FTP's MARS ball)
        rows = (p - initial[n]).abs().sum(dim=1)
        assert rows.max() <= state["radius"] * (1 + 1e-5), n
        if ".lora_A." in n:  # not wiped: A is still its random initialisation, moved a little
            assert torch.linalg.norm(p - initial[n]) < 0.2 * torch.linalg.norm(initial[n]), n
    assert loss_on_all(model) < before


def test_ftp_with_a_zero_anchor_wipes_lora_a_and_warns():
    # the documented mistake the recipe avoids: a zero anchor projects the random A to zero
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, initial, adapters, _ = fine_tune(
            "peft-ftp", **{'"params": lora}': '"params": lora, "anchor": "zero"}'}
        )
    assert any("anchor='zero'" in str(w.message) and "not zero" in str(w.message) for w in caught)
    for n, p in adapters.items():
        if ".lora_A." in n:
            assert torch.linalg.norm(p) < 0.1 * torch.linalg.norm(initial[n]), n


@pytest.mark.parametrize("tag", ["peft-trainer-spd", "peft-trainer-ftp"])
def test_the_trainer_helper_groups_the_adapters(tag):
    model, lora = lora_model()
    ns = {"model": model}
    exec(snippet(tag), ns)
    (group,) = ns["optimizer"].param_groups  # the frozen base is left out, the adapters all anchored
    assert {id(p) for p in group["params"]} == {id(p) for p in lora}
    if tag == "peft-trainer-spd":
        assert group["anchor"] == "zero" and group["weight_decay"] == 1.0
    else:
        assert group["anchor"] == "init"
