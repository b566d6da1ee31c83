"""Every method of tether.adapters.torch on one small model: fine-tune, then measure the drift."""

import torch

from tether.adapters.torch import FTP, L2SP, MARSSP, SGDFTP, SPD, TPGM, AdamFTP, AdamSPD, wise_ft

torch.manual_seed(0)
x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
x_val, y_val = torch.randn(64, 8), torch.randint(0, 3, (64,))


def pretrained():
    """Stands for a pre-trained backbone and a new head."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def groups(model):
    """The backbone anchored at its pre-trained weights, the new head free."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "anchor": None}]


METHODS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "AdamFTP": lambda m: AdamFTP(groups(m), lr=1e-2),  # k=1: the paper's default
    "SGDFTP": lambda m: SGDFTP(groups(m), lr=1e-1, momentum=0.9),
    "AdamSPD": lambda m: AdamSPD(groups(m), lr=1e-2, weight_decay=1.0),  # λ, not scaled by lr
    "FTP(AdamW)": lambda m: FTP(torch.optim.AdamW(groups(m), lr=1e-2)),
    "SPD(Adam)": lambda m: SPD(torch.optim.Adam(groups(m), lr=1e-2), weight_decay=1.0),
    "L2SP(Adam)": lambda m: L2SP(torch.optim.Adam(groups(m), lr=1e-2), alpha=0.1),
    "MARSSP(Adam)": lambda m: MARSSP(torch.optim.Adam(groups(m), lr=1e-2), radius=2.0),
}


def finetune(model, optimizer, steps=40, tpgm=None, every=10):
    loss_fn = lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn((x, y)).backward()
        optimizer.step()
        if tpgm is not None and (step + 1) % every == 0:  # TPGM every `every` steps: the ResNet recipe
            tpgm.step(loss_fn, [(x_val, y_val)], iters=5)
    return loss_fn((x, y)).item()


def drift(model, anchor):
    return (
        sum((p - anchor[n]).norm() ** 2 for n, p in model.state_dict().items() if n.startswith("0.")) ** 0.5
    )


results = {}
for name, make in METHODS.items():
    model = pretrained()
    anchor = {n: p.clone() for n, p in model.state_dict().items()}
    loss = finetune(model, make(model))
    results[name] = (loss, float(drift(model, anchor)))

model = pretrained()
anchor = {n: p.clone() for n, p in model.state_dict().items()}
tpgm = TPGM(model, norm="mars", lr=1e-2, exclude=["2.*"])  # the head has no constraint
loss = finetune(model, torch.optim.AdamW(model.parameters(), lr=1e-2), tpgm=tpgm)
results["AdamW + TPGM"] = (loss, float(drift(model, anchor)))

model = pretrained()
anchor = {n: p.clone() for n, p in model.state_dict().items()}
finetune(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
model.load_state_dict(wise_ft(model, anchor, alpha=0.5))  # halfway between pre-trained and fine-tuned
results["WiSE-FT (α=0.5)"] = (
    torch.nn.functional.cross_entropy(model(x), y).item(),
    float(drift(model, anchor)),
)

for name, (loss, distance) in results.items():
    print(f"{name:16s} train loss {loss:.3f}   ‖θ − θ₀‖ of the backbone {distance:.3f}")
