"""Lightning: configure_optimizers with a tether optimizer and a per-step scheduler; ckpt_path resumes."""

import pytest

pytest.importorskip("lightning")

import torch
from integration_docs import snippet

from tether.adapters.torch import AdamFTP

# Lightning's own chatter on a CPU-only run with a small loader
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used:UserWarning"),
]
STEPS_PER_EPOCH, EPOCHS = 4, 3


def pretrained():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def train_loader():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16 * STEPS_PER_EPOCH, 8, generator=generator)
    labels = torch.argmax(inputs[:, :3], dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=16)


def run(tag, namespace):
    exec(snippet(tag), namespace)
    return namespace


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fit_then_resume_from_a_checkpoint_continues_exactly(tmp_path):
    ns = run("lightning-module", {})
    model = pretrained()
    start = weights(model)
    fit = run("lightning-fit", {**ns, "model": model, "train_loader": train_loader(), "workdir": tmp_path})
    optimizer = fit["trainer"].optimizers[0]
    assert isinstance(optimizer, AdamFTP)
    assert fit["trainer"].global_step == STEPS_PER_EPOCH * EPOCHS
    scheduler = fit["trainer"].lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == STEPS_PER_EPOCH * EPOCHS  # stepped per step, not per epoch
    assert optimizer.param_groups[0]["lr"] == 1e-2 * 0.5 ** (STEPS_PER_EPOCH * EPOCHS // 5)
    for p in model.parameters():  # anchored at the pre-trained weights, taken in configure_optimizers
        assert any(torch.equal(optimizer.state[p]["anchor"], w) for w in start.values())
    uninterrupted = weights(model)
    assert any(not torch.equal(uninterrupted[n], start[n]) for n in start)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [f"epoch={e}-step={STEPS_PER_EPOCH * (e + 1)}.ckpt" for e in range(EPOCHS)]

    model = pretrained()
    resumed = run(
        "lightning-resume", {**ns, "model": model, "train_loader": train_loader(), "workdir": tmp_path}
    )
    assert resumed["trainer"].global_step == STEPS_PER_EPOCH * EPOCHS
    optimizer = resumed["trainer"].optimizers[0]
    for p in model.parameters():  # the anchors came from the checkpoint: the pre-trained weights
        assert any(torch.equal(optimizer.state[p]["anchor"], w) for w in start.values())
    got = weights(model)
    for n in got:
        assert torch.equal(got[n], uninterrupted[n]), n
