"""Directions in parameter space for landscape slices: filter-normalised random, given vectors."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["random_direction", "filter_normalize", "filter_normalized_direction", "normalize_to"]


def random_direction(params: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A Gaussian direction d ~ N(0, I) shaped like ``params`` (drawn on CPU for reproducibility)."""
    return [
        torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        for p in params
    ]


@torch.no_grad()
def filter_normalize(direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor], ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """Rescale ``direction`` filter by filter to the norms of ``params`` (Li et al. 2018).

    For every tensor with more than one dimension and every index j along dim 0 (a
    convolution filter or a row of a linear layer), d_j ← d_j · ‖θ_j‖ / (‖d_j‖ + 1e-10).
    Tensors with dim ≤ 1 (biases, norm-layer scales and shifts) are zeroed when
    ``ignore="biasbn"`` and copied from θ otherwise, as in the loss-landscape code.
    Returns new tensors; the inputs are not modified.
    """
    if ignore not in (None, "biasbn", "none"):
        raise ValueError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    out = []
    for d, p in zip(direction, params):
        d = d.detach().clone()
        if d.dim() <= 1:
            if ignore == "biasbn":
                d.zero_()
            else:
                d.copy_(p)
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            pn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            d.mul_((pn / (dn + 1e-10)).reshape((-1,) + (1,) * (d.dim() - 1)))
        out.append(d)
    return out


def filter_normalized_direction(
    params: Sequence[torch.Tensor], generator: torch.Generator | None = None, ignore: str | None = "biasbn"
) -> list[torch.Tensor]:
    """A random filter-normalised direction for ``params`` (``random_direction`` + ``filter_normalize``)."""
    return filter_normalize(random_direction(params, generator), params, ignore)


@torch.no_grad()
def normalize_to(direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor], how: str = "filter", ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """Scale a given direction (an eigenvector, the gradient): ``filter``-wise, to the ``model`` norm, to ``unit`` norm, or ``none``."""
    if how == "filter":
        return filter_normalize(direction, params, ignore)
    d = [t.detach().clone() for t in direction]
    if how == "none":
        return d
    dn = torch.sqrt(sum((t.double() ** 2).sum() for t in d))
    if how == "unit":
        target = 1.0
    elif how == "model":
        target = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
    else:
        raise ValueError(f"unknown normalisation '{how}' (use filter, model, unit or none)")
    scale = float(target / (dn + 1e-30))
    return [t.mul_(scale) for t in d]
