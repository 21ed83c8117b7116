"""Linear interpolation between two models over every state entry, BatchNorm buffers included."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ._slices import evaluate, parse_range

__all__ = ["interpolate_state", "interpolation_curve"]


@torch.no_grad()
def interpolate_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = α·θ_B + (1 − α)·θ_A for every floating-point entry of two state dicts.

    As in SmoothOut's visualize, running means and variances are interpolated with the
    weights. Integer entries (``num_batches_tracked``) are not interpolable and are taken
    from A. The two dicts must have the same keys and shapes.
    """
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"the two states differ in their entries: {', '.join(missing[:5])}")
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise ValueError(f"state entry '{k}' has shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
        if torch.is_floating_point(ta):
            out[k] = torch.lerp(ta, tb.to(ta.device, ta.dtype), float(alpha))
        else:
            out[k] = ta.clone()
    return out


def interpolation_curve(
    model: nn.Module,
    loss_fn,
    data: Mapping[str, list],
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alphas="-1:2:0.1",
) -> dict[str, np.ndarray]:
    """Loss and accuracy of ``model`` loaded with θ(α) for every α, on each split in ``data``.

    ``data`` maps a split name (``train``, ``eval``) to its batches. The model is used in
    eval mode and its own state and mode are put back afterwards; no copy of the model is
    made. Returns ``{"alpha", "<split>_loss", "<split>_accuracy", ...}``.
    """
    alphas = parse_range(alphas)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    out: dict[str, np.ndarray] = {"alpha": alphas}
    for split in data:
        out[f"{split}_loss"] = np.empty(len(alphas))
        out[f"{split}_accuracy"] = np.empty(len(alphas))
    model.eval()
    try:
        for i, a in enumerate(alphas):
            model.load_state_dict(interpolate_state(state_a, state_b, a))
            for split, batches in data.items():
                out[f"{split}_loss"][i], out[f"{split}_accuracy"][i] = evaluate(model, loss_fn, batches)
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    return out
