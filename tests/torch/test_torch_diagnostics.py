"""`optimizer.diagnostics()` and `TPGM.diagnostics()`: per-tensor numbers a user logs."""

import copy
import json

import numpy as np
import pytest
import torch
from torch_helpers import BUILDERS

from tether import core
from tether.adapters.torch import SPD, TPGM, AdamSPD

KINDS = sorted(BUILDERS)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _step(opt, net, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_every_optimizer_reports_the_distance_and_its_own_numbers(kind):
    net = _net()
    anchors = {n: p.detach().clone() for n, p in net.named_parameters()}
    groups = [
        {"params": list(net[0].named_parameters(prefix="body"))},
        {"params": [("head.weight", net[2].weight)], "anchor": "zero"},
        {"params": [("head.bias", net[2].bias)], "anchor": None},
    ]
    opt = BUILDERS[kind](groups)
    for seed in range(3):
        _step(opt, net, seed)
    report = opt.diagnostics()
    json.dumps(report)  # plain numbers
    assert set(report) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert report["head.bias"] == {}  # unanchored
    expected = {
        "body.weight": net[0].weight - anchors["0.weight"],
        "body.bias": net[0].bias - anchors["0.bias"],
        "head.weight": net[2].weight,  # a zero anchor
    }
    for name, displacement in expected.items():
        entry = report[name]
        assert entry["distance"] == pytest.approx(float(displacement.detach().norm()), rel=1e-6)
        state = opt.state[
            dict(net.named_parameters())[
                {"body.weight": "0.weight", "body.bias": "0.bias"}.get(name, "2.weight")
            ]
        ]
        if kind in ("AdamFTP", "SGDFTP", "FTP"):
            assert entry["radius"] == float(state["radius"])
        else:
            assert "radius" not in entry
        if kind in ("AdamSPD", "SPD"):
            assert isinstance(entry["decayed"], bool) and 0.0 <= entry["ratio"] <= 1.0
        else:
            assert "ratio" not in entry and "decayed" not in entry


@pytest.mark.parametrize("wrapper", [False, True])
def test_spd_records_the_ratio_and_the_condition_of_its_last_step(wrapper):
    """SPD's condition −⟨g, θ − θ₀⟩ < 0 holds for one tensor (the decay fires) and not the other."""
    away = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    back = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    named = [("away", away), ("back", back)]
    opt = (
        SPD(torch.optim.Adam(named, lr=0.1), weight_decay=0.5)
        if wrapper
        else AdamSPD(named, lr=0.1, weight_decay=0.5)
    )
    with torch.no_grad():  # move off the anchors first, with no gradient pushing either way
        away.add_(torch.tensor([0.5, 0.5]))
        back.add_(torch.tensor([0.5, 0.5]))
    before = {n: p.detach().clone() for n, p in named}
    anchors = {"away": torch.tensor([1.0, 2.0]), "back": torch.tensor([3.0, -1.0])}
    away.grad = torch.ones(2)  # ⟨g, θ − θ₀⟩ = 1 > 0: the condition holds
    back.grad = -torch.ones(2)  # ⟨g, θ − θ₀⟩ = −1: it does not
    first_adam = {
        "away": before["away"] - 0.1,
        "back": before["back"] + 0.1,
    }  # Adam's first step: −lr·sign(g)
    opt.step()
    report = opt.diagnostics()
    for name in ("away", "back"):
        ratio = core.decay_ratio(
            np.linalg.norm((first_adam[name] - anchors[name]).numpy()),
            np.linalg.norm((before[name] - anchors[name]).numpy()),
        )
        assert report[name]["ratio"] == pytest.approx(float(ratio), rel=1e-5)
    assert report["away"]["decayed"] is True and report["back"]["decayed"] is False


def test_the_spd_record_survives_a_state_dict_and_an_old_state_dict_still_loads():
    net = _net()
    opt = AdamSPD(net.named_parameters(), lr=0.1, weight_decay=1.0)
    _step(opt, net, 0)
    state_dict = copy.deepcopy(opt.state_dict())
    twin = _net()
    twin.load_state_dict(net.state_dict())
    other = AdamSPD(twin.named_parameters(), lr=0.1, weight_decay=1.0)
    other.load_state_dict(copy.deepcopy(state_dict))
    assert other.diagnostics() == opt.diagnostics()
    assert other.state[twin[0].weight]["spd_decayed"].dtype == torch.bool
    for values in state_dict["state"].values():  # saved before the record existed
        values.pop("spd_ratio"), values.pop("spd_decayed")
    third = AdamSPD(_net().named_parameters(), lr=0.1, weight_decay=1.0)
    third.load_state_dict(state_dict)
    _step(third, _net(), 1)


def test_tpgm_reports_distances_and_constraints():
    net = _net()
    tpgm = TPGM(net, lr=0.01)
    assert set(tpgm.diagnostics()["0.weight"]) == {"distance"}  # no constraint before the first call
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    tpgm.step(lambda batch: torch.nn.functional.mse_loss(net(x), y), [None], iters=1)
    report = tpgm.diagnostics()
    for i, name in enumerate(tpgm.names):
        assert report[name]["constraint"] == float(tpgm.constraints[i])
        assert report[name]["distance"] == pytest.approx(
            float((dict(net.named_parameters())[name].detach() - tpgm.anchors[name]).norm()), rel=1e-6
        )
