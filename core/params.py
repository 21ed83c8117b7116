"""The one place that selects, flattens and unflattens model parameters.

Every probe and optimizer plugin that needs parameters as a flat vector goes through
these functions, so that a parameter subset means the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = [
    "select_parameters",
    "flatten",
    "unflatten",
    "flat_parameters",
    "set_flat_parameters",
    "numel",
]


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    requires_grad: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """Return ``(name, parameter)`` pairs of ``model`` in registration order.

    ``include`` and ``exclude`` are glob patterns (or lists of them) matched against the
    dotted parameter name, e.g. ``"fc1.*"`` or ``["*.weight"]``; a pattern without a
    wildcard also matches as a prefix (``"layer1"`` selects ``layer1.0.weight``).
    An ``include`` that matches nothing raises ``ValueError`` naming the patterns.
    """
    inc = _patterns(include)
    exc = _patterns(exclude)
    chosen = []
    for name, p in model.named_parameters():
        if requires_grad and not p.requires_grad:
            continue
        if inc and not any(_match(name, pat) for pat in inc):
            continue
        if exc and any(_match(name, pat) for pat in exc):
            continue
        chosen.append((name, p))
    if inc and not chosen:
        raise ValueError(f"no parameter matches {', '.join(inc)}")
    return chosen


def flatten(tensors: Iterable[torch.Tensor | None], like: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Concatenate tensors into one flat vector; ``None`` entries become zeros shaped like ``like``.
    A ``DTensor`` (a parameter or gradient sharded by ``--strategy fsdp``) is gathered whole
    (a collective: every rank calls it), so the vector is the same on every rank."""
    parts = []
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError("a None tensor needs `like` to know its shape")
            t = torch.zeros_like(like[i])
        if isinstance(t, DTensor):  # a sharded (FSDP) parameter or gradient: the whole of it, on every rank
            t = t.full_tensor()
        parts.append(t.reshape(-1))
    if not parts:
        raise ValueError("nothing to flatten")
    return torch.cat(parts)


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like the tensors in ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the tensors hold {offset}")
    return out


def numel(tensors: Iterable[torch.Tensor]) -> int:
    """Total number of entries."""
    return sum(t.numel() for t in tensors)


def flat_parameters(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A detached flat copy of ``params``."""
    return flatten([p.detach() for p in params]).clone()


@torch.no_grad()
def set_flat_parameters(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy a flat vector into ``params`` in place (optimizer references stay valid)."""
    for p, v in zip(params, unflatten(vector, params)):
        p.copy_(v)


def _patterns(p: str | Sequence[str] | None) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [s.strip() for s in p.split(",") if s.strip()]
    return list(p)


def _match(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")
