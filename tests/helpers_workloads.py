"""Factories that tests name with `module:factory` (importable because tests/ is on sys.path)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def linear_regression(n: int = 64, dim: int = 3, seed: int = 0):
    """A plain Dataset (no eval split) for y = x·w + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.arange(1.0, dim + 1).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def linear(dim: int = 3):
    return nn.Linear(dim, 1)


def l1_loss(output, target):
    return (output - target).abs().mean()


class Exploding(nn.Module):
    """A model whose output becomes inf after a few forward passes."""

    def __init__(self, after: int = 3):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.calls = 0
        self.after = after

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out * float("inf") if self.calls > self.after else out


def exploding(after: int = 3):
    return Exploding(after)


class PlainSGD(torch.optim.Optimizer):
    """A third-party optimizer class, to check `--optimizer module:Class`."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
