"""What the two Fisher matrices share: (1/R) Σ_r e_r e_rᵀ in output space from per-row loss gradients."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["outer_products"]


def outer_products(out: torch.Tensor, samples: list[tuple[torch.Tensor, float]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """u ↦ mean over ``samples`` of Σ_r e_r (e_r·u_r) / R, for per-row output-space gradients
    ``e`` (R rows of the flattened output) with their row count R."""
    shape = out.reshape(-1, out.shape[-1]).shape if out.dim() > 1 else out.reshape(-1, 1).shape

    def fisher(u: torch.Tensor) -> torch.Tensor:
        u2 = u.reshape(shape)
        total = torch.zeros_like(u2)
        for e, rows in samples:
            s = (e * u2).sum(-1, keepdim=True)
            total += e * s / rows
        return (total / len(samples)).reshape(u.shape)

    return fisher
