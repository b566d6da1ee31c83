"""`tether robustness` on PyTorch: LeNet-5 from `torch.nn`, `tether.adapters.torch`'s methods."""

import numpy as np
import torch

from tether.adapters.torch import L2SP, MARSSP, TPGM, AdamFTP, AdamSPD


class LeNet5(torch.nn.Module):
    """advertorch's LeNet-5 (`advertorch.test_utils.LeNet5`), its parameters named as in its weights file."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.linear1 = torch.nn.Linear(7 * 7 * 64, 200)
        self.linear2 = torch.nn.Linear(200, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.linear2(torch.relu(self.linear1(x.flatten(1))))


ARCHITECTURES = {"lenet5": LeNet5}


class TorchBackend:
    """Builds the task's network with its pre-trained weights and runs each method's training loop."""

    name = "torch"

    def __init__(self, task):
        self.task = task
        self.x, self.y = torch.as_tensor(task.train[0]), torch.as_tensor(task.train[1])
        self.val_x, self.val_y = torch.as_tensor(task.val[0]), torch.as_tensor(task.val[1])

    def model(self, weights):
        net = ARCHITECTURES[self.task.architecture]()
        net.load_state_dict({n: torch.as_tensor(np.asarray(w)) for n, w in weights.items()})
        return net

    @staticmethod
    def weights(net):
        return {n: p.detach().cpu().numpy().copy() for n, p in net.state_dict().items()}

    def optimizer(self, method, net, lr, hparams):
        params = list(net.parameters())
        if method == "adamw":
            return torch.optim.AdamW(params, lr=lr)
        if method == "l2sp":
            return L2SP(torch.optim.Adam(params, lr=lr), alpha=hparams["alpha"])
        if method == "marssp":
            return MARSSP(torch.optim.Adam(params, lr=lr), radius=hparams["radius"])
        if method == "ftp":
            return AdamFTP(params, lr=lr)
        if method == "spd":
            return AdamSPD(params, lr=lr, weight_decay=hparams["weight_decay"])
        raise ValueError(f"no optimizer for {method!r}")

    def finetune(self, method, lr, hparams, order, seed, on_step=None):
        """Fine-tune a fresh pre-trained network on the ID train split, batch by batch as `order` says."""
        torch.manual_seed(seed)
        net = self.model(self.task.weights)
        net.train()
        if method == "lpft":  # a linear probe for half the budget, then everything from there
            head = [p for n, p in net.named_parameters() if n in self.task.head]
            stages = [(torch.optim.Adam(head, lr=lr), order[: len(order) // 2])]
            stages.append((torch.optim.AdamW(net.parameters(), lr=lr), order[len(order) // 2 :]))
        else:
            stages = [(self.optimizer(method, net, lr, hparams), order)]
        for optimizer, batches in stages:
            for idx in batches:
                idx = torch.as_tensor(idx)
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(self.x[idx]), self.y[idx]).backward()
                optimizer.step()
                if on_step is not None:
                    on_step()
        return self.weights(net)

    def tpgm(self, weights, lr, order):
        """One TPGM call at the end of fine-tuning (the ViT recipe) on the ID validation split."""
        net = self.model(self.task.weights)
        tpgm = TPGM(net, norm="mars", lr=lr)  # anchors: the pre-trained weights
        net.load_state_dict({n: torch.as_tensor(w) for n, w in weights.items()})
        batches = [(self.val_x[torch.as_tensor(i)], self.val_y[torch.as_tensor(i)]) for i in order]
        tpgm.step(lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1]), batches, iters=len(batches))
        return self.weights(net)

    def predict(self, weights, x):
        net = self.model(weights)
        net.eval()
        with torch.no_grad():
            return np.concatenate(
                [net(torch.as_tensor(x[i : i + 1000])).argmax(1).numpy() for i in range(0, len(x), 1000)]
            )
