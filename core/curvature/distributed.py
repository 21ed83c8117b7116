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
(:mod:`lscape.curvature.products`) pass the operator's ``sharded`` flag to them.

**Vectors of an operator** (:class:`Vectors`, :func:`vectors_of`): how an operator's flat
vectors are laid out over ranks. Replicated (every ordinary operator): each rank holds the
whole vector, dots are averaged. Sharded (:class:`lscape.curvature.sharded.ShardedHessian`
under FSDP2): each rank holds its slices (``dim`` entries) of a vector of ``global_dim``
entries, dots are summed over ranks, and random probe vectors are drawn chunk by chunk from
seeds of the *global* position (:class:`ShardLayout`), so the global vector is the same
whatever the number of ranks and no rank ever draws or holds a full vector. The solvers
(Lanczos, Hutch++/Hutchinson, SLQ) are wrapped in :func:`on_vectors`, which makes the
operator's vectors current for the call: :func:`dot`, :func:`dots`, :func:`norm` and the
basis' float64 dots (:func:`lscape.curvature._basis.dots64`) reduce with
:func:`reduction`, and the solvers draw their random vectors with ``vectors_of(op)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Sequence

import torch

__all__ = ["is_distributed", "world_size", "all_reduce_", "dot", "dots", "norm", "row_norms", "Vectors",
           "ShardLayout", "vectors_of", "on_vectors", "using", "reduction", "current", "is_dtensor"]


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
    return all_reduce_(torch.dot(a, b).reshape(1), op=reduction())[0]


def dots(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rows @ b`` for a (m, d) block of vectors, one reduction for all m dots."""
    return all_reduce_(rows @ b, op=reduction())


def norm(a: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of a flat vector, identical on every rank."""
    return dot(a, a).clamp_min(0).sqrt()


def row_norms(rows: torch.Tensor, sharded: bool = False) -> torch.Tensor:
    """Euclidean norms of the rows of a (c, d) block, one reduction for all rows, identical on
    every rank: local squares averaged over ranks for replicated rows, summed for ``sharded``
    ones (each rank holding a slice of every row). Computed in float64."""
    squares = (rows.detach().double() ** 2).sum(dim=1)
    return all_reduce_(squares, op="sum" if sharded else "mean").clamp_min(0).sqrt()


# -- vectors of an operator: replicated or sharded --------------------------------------------

#: entries per random chunk of a sharded draw: chunk j of parameter i has its own seed, so a
#: rank draws only the chunks its slices overlap (at most two partial chunks per parameter)
DRAW_CHUNK = 1 << 16


class ShardLayout:
    """Where a rank's local vector sits in the global flat vector.

    The global vector is the concatenation of every parameter's full tensor, flattened; the
    local vector the concatenation of this rank's slices. ``pieces`` lists, per parameter,
    ``(global_offset, full_numel, local_start, local_numel)``: the slice
    ``[local_start, local_start + local_numel)`` of the parameter's flattening (contiguous:
    FSDP2 shards dimension 0, ``Shard(0)``).
    """

    def __init__(self, pieces: Sequence[tuple[int, int, int, int]]):
        self.pieces = [tuple(int(x) for x in piece) for piece in pieces]
        self.global_dim = sum(full for _, full, _, _ in self.pieces)
        self.dim = sum(n for _, _, _, n in self.pieces)

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> "ShardLayout":
        """The layout of (possibly ``DTensor``) parameters: a plain tensor is whole on every rank."""
        pieces, offset = [], 0
        for p in params:
            full = p.numel()
            start, local = 0, full
            if is_dtensor(p):
                start, local = _local_range(p)
            pieces.append((offset, full, start, local))
            offset += full
        return cls(pieces)

    def draw(self, count: int, generator: torch.Generator, kind: str, dtype: torch.dtype,
             device: Any) -> torch.Tensor:
        """(count, dim) local rows of ``count`` global random vectors: ``kind`` "normal" or
        "rademacher". One seed per row is taken from ``generator`` (the same on every rank),
        then each parameter's entries come in chunks of :data:`DRAW_CHUNK` global positions,
        each chunk from its own generator: the global vector does not depend on the sharding."""
        out = torch.empty(count, self.dim, dtype=torch.float64)
        for r in range(count):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            at = 0
            for i, (_, full, start, n) in enumerate(self.pieces):
                if n == 0:
                    continue
                first, last = start // DRAW_CHUNK, (start + n - 1) // DRAW_CHUNK
                for j in range(first, last + 1):
                    lo, hi = j * DRAW_CHUNK, min((j + 1) * DRAW_CHUNK, full)
                    g = torch.Generator(device="cpu").manual_seed(_mix(seed, i, j))
                    if kind == "normal":
                        chunk = torch.randn(hi - lo, generator=g, dtype=torch.float64)
                    else:
                        chunk = torch.randint(0, 2, (hi - lo,), generator=g, dtype=torch.int8).double() * 2 - 1
                    a, b = max(lo, start), min(hi, start + n)
                    out[r, at + a - start : at + b - start] = chunk[a - lo : b - lo]
                at += n
        return out.to(dtype=dtype, device=device)


def _mix(seed: int, i: int, j: int) -> int:
    """A 63-bit seed for chunk j of parameter i of a draw (splitmix64-style mixing)."""
    z = (seed + 0x9E3779B97F4A7C15 * (i + 1) + 0xBF58476D1CE4E5B9 * (j + 1)) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    return isinstance(t, DTensor)


def _local_range(p: Any) -> tuple[int, int]:
    """(start, numel) of a DTensor's local shard in its flattening; only contiguous shards
    (dimension 0 split, the rest whole) have one."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(f"a sharded parameter of shape {tuple(p.shape)} is split along a dimension other than the "
                         f"first (placements {p.placements}): its local shard is not contiguous")
    inner = 1
    for s in p.shape[1:]:
        inner *= int(s)
    n = int(p.to_local().numel())
    return (int(offset[0]) * inner if n else 0), n


class Vectors:
    """How an operator's flat vectors are laid out: replicated (``layout`` None: every rank
    the whole vector of ``dim`` entries) or sharded (each rank its slices, ``layout`` says
    where). Gives the reductions, norms and random draws the solvers use."""

    def __init__(self, dim: int, layout: ShardLayout | None = None, plan_dim: int | None = None):
        self.dim = int(dim)
        self.layout = layout
        self.sharded = layout is not None
        self.global_dim = layout.global_dim if layout is not None else self.dim
        #: the vector length solvers size their memory by, the same on every rank (sharded: the
        #: largest rank's ``dim``, so that float64-or-not and thick-restart decisions agree)
        self.plan_dim = int(plan_dim) if plan_dim is not None else self.dim

    @property
    def reduction(self) -> str:
        """How local dot products combine over ranks: "sum" (sharded) or "mean" (replicated)."""
        return "sum" if self.sharded else "mean"

    def row_norms(self, rows: torch.Tensor) -> torch.Tensor:
        """Norms of the rows of a (c, dim) block, identical on every rank (in the rows' dtype).
        Replicated rows: ``rows.norm(dim=1)`` as computed locally (no reduction)."""
        if not self.sharded:
            return rows.norm(dim=1)
        return row_norms(rows, sharded=True).to(dtype=rows.dtype, device=rows.device)

    def randn(self, count: int, generator: torch.Generator, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """(count, dim) Gaussian rows (float64 draws cast to ``dtype``); replicated: drawn on the
        CPU from ``generator`` exactly as before, every rank the same."""
        if not self.sharded:
            return torch.stack([torch.randn(self.dim, generator=generator, dtype=torch.float64)
                                for _ in range(count)]).to(dtype=dtype, device=device)
        return self.layout.draw(count, generator, "normal", dtype, device)

    def rademacher(self, count: int, generator: torch.Generator, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """(count, dim) rows of ±1; replicated: drawn on the CPU, every rank the same."""
        if not self.sharded:
            z = torch.randint(0, 2, (count, self.dim), generator=generator, dtype=torch.int8)
            return (z.to(dtype) * 2 - 1).to(device)
        return self.layout.draw(count, generator, "rademacher", dtype, device)

    def orthonormal_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning ``rows`` (c, dim), in their dtype. Replicated: the QR of
        the float64 rows. Sharded: from the all-reduced float64 Gram matrix G = V Vᵀ = E D Eᵀ,
        Q = D^{-1/2} Eᵀ V over the directions with D > c·eps·max D, twice (the second pass
        restores orthogonality lost to the Gram matrix's squared condition number)."""
        if not self.sharded:
            q, _ = torch.linalg.qr(rows.double().T)
            return q.T.to(rows.dtype)
        q = rows.double()
        for _ in range(2):
            gram = all_reduce_(q @ q.T, op="sum")
            d, e = torch.linalg.eigh((gram + gram.T) / 2)
            keep = d > max(float(d.max()), 0.0) * len(d) * torch.finfo(torch.float64).eps * 16
            q = ((e[:, keep] / d[keep].sqrt()).T.to(q.device)) @ q
        return q.to(rows.dtype)


_CURRENT: contextvars.ContextVar[Vectors | None] = contextvars.ContextVar("lscape_vectors", default=None)


def vectors_of(op: Any) -> Vectors:
    """The vectors of operator ``op``: its own ``vectors`` (a sharded operator's), else
    replicated vectors of ``op.dim`` entries."""
    own = getattr(op, "vectors", None)
    if isinstance(own, Vectors):
        return own
    return Vectors(int(op.dim))


def current() -> Vectors | None:
    """The vectors made current by :func:`using` / :func:`on_vectors` (None outside)."""
    return _CURRENT.get()


def reduction() -> str:
    """How local dot products combine over ranks now: "sum" inside a sharded operator's
    solver call, else "mean"."""
    vec = _CURRENT.get()
    return vec.reduction if vec is not None else "mean"


@contextlib.contextmanager
def using(vectors: Vectors):
    """Make ``vectors`` current for the block (dots reduce with its :attr:`Vectors.reduction`)."""
    token = _CURRENT.set(vectors)
    try:
        yield vectors
    finally:
        _CURRENT.reset(token)


def on_vectors(fn: Callable) -> Callable:
    """Decorator of a solver ``fn(op, ...)``: runs it with ``vectors_of(op)`` current."""

    @functools.wraps(fn)
    def wrapper(op: Any, *args: Any, **kwargs: Any) -> Any:
        with using(vectors_of(op)):
            return fn(op, *args, **kwargs)

    return wrapper
