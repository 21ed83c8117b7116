"""Stochastic trace estimators with Rademacher probes: Hutchinson and Hutch++, with standard errors."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from lscape.curvature import distributed
from lscape.curvature._basis import dots64
from lscape.errors import UsageError

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "rademacher", "apply_block"]


class TraceEstimate(NamedTuple):
    """A trace estimate and its standard error (unpacks as ``estimate, stderr``)."""

    estimate: float
    stderr: float


@distributed.on_vectors
def hutchinson(op: Any, n: int = 100, seed: int = 0, block: int = 16) -> TraceEstimate:
    """tr(H) ≈ mean of zᵀHz over ``n`` Rademacher probes z (Hutchinson 1989).

    The standard error is the sample standard deviation over √n. Costs ``n`` products,
    applied ``block`` at a time where the operator has a ``matmat``.
    """
    if n < 2:
        raise UsageError(f"the Hutchinson estimator needs at least 2 probes for an error bar, not {n}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for start in range(0, n, block):
        z = distributed.vectors_of(op).rademacher(min(block, n - start), generator, _dtype(op), _device(op))
        hz = apply_block(op, z)
        samples.append(row_dots(z, hz))
    values = torch.cat(samples)
    return TraceEstimate(float(values.mean()), float(values.std(unbiased=True)) / math.sqrt(n))


@distributed.on_vectors
def hutchpp(op: Any, n: int = 99, seed: int = 0, block: int = 16) -> TraceEstimate:
    """tr(H) by Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with ``n`` products in all.

    A third of the budget sketches the top of the spectrum (Q = orth(H S)), a third computes
    tr(QᵀHQ) exactly, and the last third runs Hutchinson on the deflated operator
    (I − QQᵀ)H(I − QQᵀ). The standard error is that of the Hutchinson part (the first part is
    exact given Q), so it shrinks as the sketch captures the large eigenvalues.
    """
    if n < 6:
        raise UsageError(f"Hutch++ needs at least 6 products, not {n}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dtype, device = _dtype(op), _device(op)
    m = n // 3
    g_count = n - 2 * m
    vectors = distributed.vectors_of(op)  # sharded operators: local slices of global probes
    s = vectors.rademacher(m, generator, dtype, device)
    hs = apply_block(op, s, block)
    # Orthonormal rows spanning H S (QR in float64 for a well-conditioned basis).
    q = vectors.orthonormal_rows(hs)
    hq = apply_block(op, q, block)
    top = float(row_dots(q, hq).sum())
    g = vectors.rademacher(g_count, generator, dtype, device)
    g = project_out(g, q)
    hg = apply_block(op, g, block)
    hg = project_out(hg, q)
    values = row_dots(g, hg)
    rest = float(values.mean())
    stderr = float(values.std(unbiased=True)) / math.sqrt(g_count) if g_count > 1 else float("nan")
    return TraceEstimate(top + rest, stderr)


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a_i · b_i) for the rows of two (c, dim) blocks, float64-accumulated (identical on every rank)."""
    return torch.cat([dots64(a[i : i + 1], b[i]) for i in range(a.shape[0])]) if a.shape[0] else \
        torch.zeros(0, dtype=torch.float64)


def project_out(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``rows`` minus their projection on the orthonormal rows ``q`` (coefficients float64-accumulated)."""
    coef = torch.stack([dots64(q, r) for r in rows]) if rows.shape[0] else torch.zeros(0, q.shape[0])
    return rows - coef.to(dtype=rows.dtype, device=rows.device) @ q


def rademacher(count: int, dim: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """A (count, dim) block of ±1 entries, drawn on the CPU so every rank draws the same."""
    z = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int8)
    return (z.to(dtype) * 2 - 1).to(device)


def apply_block(op: Any, rows: torch.Tensor, block: int = 16) -> torch.Tensor:
    """H applied to each row of ``rows`` (c, dim), through ``op.matmat`` in blocks when it has one."""
    if hasattr(op, "matmat"):
        return torch.cat([op.matmat(rows[i : i + block]) for i in range(0, rows.shape[0], block)])
    return torch.stack([op.matvec(r) for r in rows])


def _dtype(op: Any) -> torch.dtype:
    return getattr(op, "dtype", torch.float32)


def _device(op: Any) -> torch.device:
    return getattr(op, "device", torch.device("cpu"))
