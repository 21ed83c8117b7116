"""The single reduction point of the curvature toolkit: every product and dot goes through here.

Under DistributedDataParallel each rank holds its own batches and a full (replicated) copy
of the parameters. Hessian-vector products are per-rank *sums* weighted by batch size, so
they are summed across ranks and divided by the global number of samples. Dot products of
replicated vectors are already equal on every rank up to rounding; they are averaged so
that every rank takes bitwise-identical decisions (convergence tests, Ritz values).
Everything here is a no-op unless ``torch.distributed`` is initialised.

Sharded vectors (each rank holding its own slice of the parameters and of every vector,
as under FSDP) need a *sum* of the local partial dots instead of their mean: the
functions taking ``sharded`` do that, and the finite-difference products and the ladder
(:mod:`lscape.curvature.products`) pass the operator's ``sharded`` flag to them. A
sharded operator, and the Lanczos/trace code passing ``sharded`` through, are future work
(issue 22, item 2); with ``sharded=False`` nothing changes.
"""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "world_size", "all_reduce_", "dot", "dots", "norm", "row_norms"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks taking part (1 without ``torch.distributed``)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``op`` is ``"sum"`` or ``"mean"``) and return it."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', not {op!r}")
    if not is_distributed():
        return tensor
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    if op == "mean":
        tensor.div_(world_size())
    return tensor


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · b`` of two flat vectors, identical on every rank (a 0-d tensor)."""
    return all_reduce_(torch.dot(a, b).reshape(1), op="mean")[0]


def dots(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rows @ b`` for a (m, d) block of vectors, one reduction for all m dots."""
    return all_reduce_(rows @ b, op="mean")


def norm(a: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of a flat vector, identical on every rank."""
    return dot(a, a).clamp_min(0).sqrt()


def row_norms(rows: torch.Tensor, sharded: bool = False) -> torch.Tensor:
    """Euclidean norms of the rows of a (c, d) block, one reduction for all rows, identical on
    every rank: local squares averaged over ranks for replicated rows, summed for ``sharded``
    ones (each rank holding a slice of every row). Computed in float64."""
    squares = (rows.detach().double() ** 2).sum(dim=1)
    return all_reduce_(squares, op="sum" if sharded else "mean").clamp_min(0).sqrt()
