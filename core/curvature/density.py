"""Spectral density of the Hessian by stochastic Lanczos quadrature (Ghorbani et al. 2019; Papyan 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lscape.curvature import distributed
from lscape.curvature._basis import dots64, norm64

__all__ = ["SpectralDensity", "slq_density", "gaussian_density"]


@dataclass
class SpectralDensity:
    """A smoothed eigenvalue density on a grid, and the quadrature it came from.

    ``grid`` (g,) and ``density`` (g,) float64, the density normalised so that its
    trapezoidal integral over the grid is 1; ``nodes`` and ``weights`` (runs, steps) the
    Gauss quadrature of each run (weights of a run sum to 1; unused slots after an early
    invariant subspace have weight 0); ``sigma`` the Gaussian width; ``num_products``.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_products: int


@distributed.on_vectors
def slq_density(
    op: Any,
    num_runs: int = 8,
    num_steps: int = 80,
    grid: torch.Tensor | None = None,
    num_points: int = 1024,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    seed: int = 0,
) -> SpectralDensity:
    """Estimate the eigenvalue density (1/d) Σ_i δ(t − λ_i), smoothed by a Gaussian.

    Each of ``num_runs`` runs draws a Rademacher vector v, runs ``num_steps`` Lanczos steps
    with full reorthogonalisation and turns the tridiagonal matrix T = S diag(θ) Sᵀ into the
    Gauss quadrature vᵀ f(H) v ≈ Σ_j S_{0j}² f(θ_j); the density is the average over runs of
    Σ_j S_{0j}² N(t; θ_j, σ²). ``sigma`` defaults to ``relative_sigma`` × the width of the
    spectrum seen; ``grid`` defaults to ``num_points`` points spanning it with 5σ margins.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(op, "dtype", torch.float32)
    device = getattr(op, "device", torch.device("cpu"))
    steps = min(num_steps, int(getattr(op, "global_dim", op.dim)))  # sharded: vectors are slices
    vectors = distributed.vectors_of(op)
    nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, steps, dtype=torch.float64)
    products = 0
    for r in range(num_runs):
        v = vectors.rademacher(1, generator, dtype, device)[0]
        theta, w, used = lanczos_quadrature(op, v, steps)
        products += used
        nodes[r, : len(theta)] = theta
        weights[r, : len(w)] = w
    live = weights > 0
    lo, hi = float(nodes[live].min()), float(nodes[live].max())
    if sigma is None:
        sigma = relative_sigma * max(hi - lo, abs(hi), abs(lo), 1e-12)
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    density = gaussian_density(nodes.reshape(-1), weights.reshape(-1) / num_runs, grid, sigma)
    return SpectralDensity(grid, density, nodes, weights, float(sigma), products)


def gaussian_density(
    values: torch.Tensor, weights: torch.Tensor | None, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Σ_j w_j N(t; values_j, σ²) on ``grid``, normalised to integrate to 1 there.

    With ``weights`` None every value weighs 1/len(values): the exact density of a known
    spectrum (used to compare with :func:`slq_density`).
    """
    values = values.to(torch.float64)
    if weights is None:
        weights = torch.full_like(values, 1.0 / len(values))
    grid = grid.to(torch.float64)
    density = torch.zeros_like(grid)
    # Chunked so that a dense spectrum of 20k eigenvalues does not build a (20k, grid) matrix.
    for i in range(0, len(values), 2048):
        diff = grid[None, :] - values[i : i + 2048, None]
        kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        density += (weights[i : i + 2048, None].to(torch.float64) * kern).sum(dim=0)
    mass = torch.trapezoid(density, grid)
    return density / mass if float(mass) > 0 else density


def lanczos_quadrature(op: Any, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gauss quadrature nodes and weights of vᵀ f(H) v from ``steps`` Lanczos steps.

    Stops early (with an exact quadrature) when the Krylov space becomes invariant.
    Returns (nodes, weights, products used).
    """
    q = v / norm64(v)
    basis = torch.zeros(steps, op.dim, dtype=q.dtype, device=q.device)
    alphas, betas = [], []
    used = 0
    for j in range(steps):
        basis[j] = q
        w = op.matvec(q)
        used += 1
        alpha = float(dots64(q[None], w)[0])  # float64 accumulation over the long vectors
        alphas.append(alpha)
        w = w - alpha * q - (betas[-1] * basis[j - 1] if j > 0 else 0)
        for _ in range(2):
            w = w - basis[: j + 1].T @ dots64(basis[: j + 1], w).to(dtype=w.dtype, device=w.device)
        beta = norm64(w)
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if j == steps - 1 or beta <= 1e3 * torch.finfo(q.dtype).eps * max(scale, 1e-30):
            break
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s[0] ** 2, used
