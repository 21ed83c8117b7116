"""Directions in parameter space for landscape slices: filter-normalised random, given vectors."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["random_direction", "filter_normalize", "filter_normalized_direction", "normalize_to", "normalize_layerwise",
           "LAYERWISE", "random_state_direction", "state_tensors"]

#: loss-landscape's ``--xnorm``/``--ynorm`` choices (net_plotter.normalize_direction), applied per tensor
LAYERWISE = ("filter", "layer", "weight", "dfilter", "dlayer")


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
def normalize_layerwise(direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor], how: str = "filter",
                        ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """loss-landscape's per-tensor normalisations (``net_plotter.normalize_direction``).

    For a tensor d with more than one dimension and its weights w (rows j along dim 0):
    ``filter`` d_j·‖w_j‖/(‖d_j‖ + 1e-10); ``layer`` d·‖w‖/‖d‖; ``weight`` d ⊙ w;
    ``dfilter`` d_j/(‖d_j‖ + 1e-10); ``dlayer`` d/‖d‖. Tensors with dim ≤ 1 are zeroed
    (``ignore="biasbn"``) or copied from w (``"none"``) whatever ``how`` is, as there.
    Returns new tensors.
    """
    if how not in LAYERWISE:
        raise ValueError(f"unknown normalisation '{how}' (use {', '.join(LAYERWISE)})")
    if ignore not in (None, "biasbn", "none"):
        raise ValueError(f"ignore must be 'biasbn' or 'none', got {ignore!r}")
    out = []
    for d, w in zip(direction, params):
        d = d.detach().clone()
        w = w.detach()
        if d.dim() <= 1:
            if ignore == "biasbn":
                d.zero_()
            else:
                d.copy_(w)
        elif how in ("filter", "dfilter"):
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            target = w.reshape(w.shape[0], -1).norm(dim=1) if how == "filter" else torch.ones_like(dn)
            d.mul_((target / (dn + 1e-10)).reshape((-1,) + (1,) * (d.dim() - 1)))
        elif how == "layer":
            d.mul_(w.norm() / d.norm())
        elif how == "weight":
            d.mul_(w)
        else:  # dlayer
            d.div_(d.norm())
        out.append(d)
    return out


def state_tensors(model) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the model's floating-point state entries (parameters and buffers
    such as BatchNorm running statistics), in ``state_dict`` order; integer buffers
    (``num_batches_tracked``) are left out: they cannot be displaced."""
    names, tensors = [], []
    for name, t in model.state_dict(keep_vars=True).items():
        if torch.is_floating_point(t):
            names.append(name)
            tensors.append(t)
    return names, tensors


def random_state_direction(model, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """loss-landscape's ``dir_type=states``: a Gaussian direction over the floating-point state
    entries (BatchNorm running statistics included), drawn as the seed draws it — one
    ``randn`` per ``state_dict`` entry in order, integer counters (``num_batches_tracked``)
    included, whose draws are then dropped — so the same seed gives the seed's direction."""
    out = []
    for t in model.state_dict(keep_vars=True).values():
        d = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        if torch.is_floating_point(t):
            out.append(d.to(device=t.device, dtype=t.dtype))
    return out


@torch.no_grad()
def normalize_to(direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor], how: str = "filter", ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """Scale a direction: per tensor as loss-landscape does (``filter``, ``layer``, ``weight``,
    ``dfilter``, ``dlayer``: :func:`normalize_layerwise`), to the ``model`` norm, to ``unit``
    norm, or ``none``."""
    if how == "filter":
        return filter_normalize(direction, params, ignore)
    if how in LAYERWISE:
        return normalize_layerwise(direction, params, how, ignore)
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
