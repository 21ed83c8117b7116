"""The default experiment's pieces: the `mlp` model, the `synthetic` and `digits` data sets, the
`ce`/`mse` losses and the `sgd`/`adam`/`adamw` base optimizers (registered by `lscape.plugins.workloads`)."""

from __future__ import annotations

import gzip
import math
from importlib import resources
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lscape.errors import UsageError

__all__ = ["MLP", "LabelledTensors", "synthetic", "digits", "cross_entropy", "mse"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
               "softplus": nn.Softplus, "identity": nn.Identity}


class LabelledTensors(TensorDataset):
    """A ``TensorDataset`` that says what a model needs to know: ``num_classes``
    (``None`` for regression) and ``input_shape`` (one sample's shape)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None):
        super().__init__(x, y)
        self.num_classes = num_classes
        self.input_shape = tuple(x.shape[1:])
        self.output_dim = num_classes if num_classes is not None else (int(y.shape[1]) if y.dim() > 1 else 1)


class MLP(nn.Module):
    """A fully connected network: flatten, hidden layers of ``widths``, a linear head."""

    def __init__(self, in_features: int, widths: Sequence[int], out_features: int, activation: str = "relu",
                 bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UsageError(f"mlp: unknown activation '{activation}' (choose {', '.join(ACTIVATIONS)})")
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, w, bias=bias), ACTIVATIONS[activation]()]
            prev = w
        layers.append(nn.Linear(prev, out_features, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(widths: str | int | Sequence[int] = "64,64", activation: str = "relu", bias: bool = True,
        input_shape: Sequence[int] | None = None, num_classes: int | None = None, output_dim: int | None = None,
        in_features: int | None = None, out_features: int | None = None) -> MLP:
    """`mlp`: widths (e.g. "128,128"), activation (relu, tanh, gelu, ...), bias."""
    if in_features is None:
        if input_shape is None:
            raise UsageError("mlp: the data set does not say its input shape; pass --model-opt in_features=N")
        in_features = math.prod(input_shape)
    if out_features is None:
        out_features = num_classes or output_dim
        if out_features is None:
            raise UsageError("mlp: the data set does not say its output size; pass --model-opt out_features=N")
    return MLP(int(in_features), _widths(widths), int(out_features), activation, bias)


def synthetic(task: str = "classification", n: int = 1024, dim: int = 20, classes: int = 10, outputs: int = 1,
              noise: float = 0.1, eval_fraction: float = 0.2, seed: int = 0) -> dict[str, LabelledTensors]:
    """`synthetic`: a seeded teacher problem. Classification: labels are the argmax of a
    random linear teacher plus noise; regression: y = W x + noise·ε. x ~ N(0, I)."""
    if task not in ("classification", "regression"):
        raise UsageError(f"synthetic: task must be classification or regression, got '{task}'")
    if n < 2 or dim < 1 or classes < 2 or outputs < 1 or not 0 < eval_fraction < 1:
        raise UsageError("synthetic: need n >= 2, dim >= 1, classes >= 2, outputs >= 1, 0 < eval_fraction < 1")
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, dim, generator=g)
    if task == "classification":
        w = torch.randn(dim, classes, generator=g) / math.sqrt(dim)
        y = (x @ w + noise * torch.randn(n, classes, generator=g)).argmax(1)
        num_classes: int | None = classes
    else:
        w = torch.randn(dim, outputs, generator=g) / math.sqrt(dim)
        y = x @ w + noise * torch.randn(n, outputs, generator=g)
        num_classes = None
    return _split(x, y, num_classes, eval_fraction, g)


def digits(flat: bool = True, eval_fraction: float = 0.2, seed: int = 0, subset: int | None = None
           ) -> dict[str, LabelledTensors]:
    """`digits`: 1,797 real 8×8 handwritten digits (UCI, shipped with lscape), pixels
    standardised; ``flat`` gives 64-vectors, else 1×8×8 images; a seeded split."""
    raw = resources.files("lscape.plugins.workloads").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    # standardised with the whole set's pixel mean and std (both fixed numbers of the data)
    pixels = table[:, :64] / 16.0
    x = torch.from_numpy((pixels - pixels.mean()) / pixels.std())
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    if subset is not None:
        x, y = x[: int(subset)], y[: int(subset)]
    return _split(x, y, 10, eval_fraction, torch.Generator().manual_seed(int(seed)))


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; (B, C) or sequence outputs (B, T, C) with targets (B, T)."""
    if output.dim() > 2:
        output = output.reshape(-1, output.shape[-1])
        target = target.reshape(-1)
    return F.cross_entropy(output, target)


# the curvature operators recognise a loss that declares itself a plain mean cross-entropy over
# rows (the GGN's and Fisher's closed forms); any loss function may declare it this way
cross_entropy.ce_like = {"ignore_index": -100}


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries; integer class targets are one-hot encoded."""
    if not target.is_floating_point():
        target = F.one_hot(target, output.shape[-1]).to(output.dtype)
    return F.mse_loss(output, target.reshape(output.shape))


def sgd(params, lr, momentum, weight_decay, nesterov: bool = False, dampening: float = 0.0):
    """`sgd`: torch.optim.SGD (momentum, nesterov, weight decay)."""
    if nesterov and momentum <= 0:
        raise UsageError("nesterov needs --momentum > 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           dampening=dampening)


def adam(params, lr, momentum, weight_decay, beta2: float = 0.999, eps: float = 1e-8):
    """`adam`: torch.optim.Adam; --momentum, when non-zero, is β1 (default 0.9)."""
    return torch.optim.Adam(params, lr=lr, betas=(momentum or 0.9, beta2), eps=eps, weight_decay=weight_decay)


def adamw(params, lr, momentum, weight_decay, beta2: float = 0.999, eps: float = 1e-8):
    """`adamw`: torch.optim.AdamW; --momentum, when non-zero, is β1 (default 0.9)."""
    return torch.optim.AdamW(params, lr=lr, betas=(momentum or 0.9, beta2), eps=eps, weight_decay=weight_decay)


def _split(x: torch.Tensor, y: torch.Tensor, num_classes: int | None, eval_fraction: float,
           g: torch.Generator) -> dict[str, LabelledTensors]:
    perm = torch.randperm(len(x), generator=g)
    n_eval = max(1, int(round(eval_fraction * len(x))))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return {"train": LabelledTensors(x[tr], y[tr], num_classes), "eval": LabelledTensors(x[ev], y[ev], num_classes)}


def _widths(widths: str | int | Sequence[int]) -> list[int]:
    try:
        if isinstance(widths, int):
            out = [widths]
        elif isinstance(widths, str):
            out = [int(w) for w in widths.replace(" ", "").split(",") if w]
        else:
            out = [int(w) for w in widths]
    except ValueError:
        raise UsageError(f"mlp: widths must be integers like 128,128, got '{widths}'") from None
    if any(w < 1 for w in out):
        raise UsageError(f"mlp: widths must be positive, got '{widths}'")
    return out
