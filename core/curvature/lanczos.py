"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation, and power iteration.

Lanczos stops on the residual norms ‖H y − θ y‖ of the wanted Ritz pairs, which bound the
eigenvalue error (some eigenvalue lies within the residual of every Ritz value), never on
the change between iterations. Power iteration with deflation is kept as the reference the
seed codebases used (PyHessian, Cockpit, sgd.stability): it stops on the relative change
of the Rayleigh quotient, and reports its honest residual next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lscape.curvature import distributed
from lscape.errors import UsageError

__all__ = ["EigenResult", "lanczos", "power_iteration", "LinearOperator", "WHICH"]

WHICH = ("LA", "LM", "SA")


class LinearOperator(Protocol):
    """What the solvers need: a symmetric ``matvec`` on flat vectors and their length."""

    dim: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EigenResult:
    """Eigenpairs found by :func:`lanczos` or :func:`power_iteration`.

    ``eigenvalues`` (k,) float64 in the order asked for (descending for "LA" and "LM",
    ascending for "SA"); ``eigenvectors`` (k, dim) unit rows in the operator's dtype;
    ``residuals`` (k,) ‖H v − λ v‖ of each pair; ``converged`` (k,) bool, residual within
    tolerance; ``num_products`` operator products spent; ``iterations`` Krylov steps taken.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_products: int
    iterations: int

    @property
    def all_converged(self) -> bool:
        """True when every requested pair met the tolerance."""
        return bool(self.converged.all())


def lanczos(
    op: Any,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: torch.Tensor | None = None,
    min_iter: int = 1,
    seed: int = 0,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``op`` by Lanczos.

    ``which`` "LA" largest algebraic, "LM" largest magnitude, "SA" smallest algebraic.
    Stops as soon as every wanted Ritz pair has residual ‖H y − θ y‖ ≤ ``tol`` · max|θ|
    (so each eigenvalue is within that of a true eigenvalue, and typically within its
    square over the spectral gap), or after ``max_iter`` products (default min(dim, 300)).
    ``v0`` warm-starts: a flat vector, or a (j, dim) block of previous eigenvectors whose sum
    starts the recurrence, so a probe tracking eigenpairs during training pays a few products
    per measurement. Full reorthogonalisation (two Gram–Schmidt passes) keeps the basis
    orthonormal to rounding; if the Krylov space becomes invariant before ``k`` pairs are
    found, the recurrence restarts from a random vector orthogonal to the basis.
    """
    which = which.upper()
    if which not in WHICH:
        raise UsageError(f"unknown eigenvalue selection {which!r}; choose LA, LM or SA")
    dim = int(op.dim)
    if k < 1 or k > dim:
        raise UsageError(f"k must be between 1 and the operator size {dim}, not {k}")
    max_iter = min(dim, max_iter if max_iter is not None else 300)
    max_iter = max(max_iter, k)
    dtype, device = _dtype_device(op, v0)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    basis = torch.zeros(max_iter + 1, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j+1]; 0 at a restart
    q = _start_vector(v0, dim, dtype, device, generator)
    num_products = 0
    ritz_values = ritz_vectors_small = residuals = None
    wanted = None
    for j in range(max_iter):
        basis[j] = q
        w = op.matvec(q)
        num_products += 1
        alpha = float(distributed.dot(q, w))
        w = w - alpha * q
        if j > 0 and betas[j - 1] != 0.0:
            w = w - betas[j - 1] * basis[j - 1]
        # Two passes of classical Gram–Schmidt against the whole basis ("twice is enough").
        for _ in range(2):
            w = w - basis[: j + 1].T @ distributed.dots(basis[: j + 1], w)
        beta = float(distributed.norm(w))
        alphas.append(alpha)

        ritz_values, ritz_vectors_small = _tridiagonal_eigh(alphas, betas)
        residuals = beta * ritz_vectors_small[-1].abs()
        scale = float(ritz_values.abs().max()) or 1.0
        m = j + 1
        if m >= k:
            wanted = _select(ritz_values, k, which)
            done = bool((residuals[wanted] <= tol * scale).all())
            if done and m >= min_iter:
                break
        if m == max_iter:
            break
        if beta <= 1e3 * torch.finfo(dtype).eps * scale:
            # Invariant subspace: every Ritz pair so far is exact; continue in a fresh direction.
            q = _orthogonal_random(basis[:m], dim, dtype, device, generator)
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)

    m = len(alphas)
    if wanted is None:
        wanted = _select(ritz_values, k, which)
    scale = float(ritz_values.abs().max()) or 1.0
    values = ritz_values[wanted]
    vectors = (ritz_vectors_small[:, wanted].T.to(dtype) @ basis[:m])
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    res = residuals[wanted]
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=res,
        converged=res <= tol * scale,
        num_products=num_products,
        iterations=m,
    )


def power_iteration(
    op: Any,
    k: int = 1,
    iters: int = 100,
    tol: float = 1e-3,
    v0: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    """Top-``k`` eigenpairs (largest magnitude) by power iteration with deflation.

    The reference the seed codebases used (PyHessian's ``eigenvalues()``): for each pair,
    start from ``v0`` (or a random Gaussian vector), orthogonalise against the pairs already
    found, multiply, and stop when the Rayleigh quotient changes by less than ``tol``
    relative, or after ``iters`` products. ``converged`` reports that relative-change rule;
    ``residuals`` are the honest ‖H v − λ v‖ of the returned vectors.
    """
    dim = int(op.dim)
    if k < 1 or k > dim:
        raise UsageError(f"k must be between 1 and the operator size {dim}, not {k}")
    dtype, device = _dtype_device(op, v0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    found: list[torch.Tensor] = []
    values, residuals, converged = [], [], []
    num_products = 0
    total_iters = 0
    for i in range(k):
        if v0 is not None and v0.ndim == 2 and i < v0.shape[0]:
            v = v0[i].to(dtype=dtype, device=device).clone()
        elif v0 is not None and v0.ndim == 1 and i == 0:
            v = v0.to(dtype=dtype, device=device).clone()
        else:
            v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        v = _deflate(v, found)
        v = v / distributed.norm(v)
        value, ok, hv = None, False, None
        for _ in range(iters):
            hv = op.matvec(v)
            num_products += 1
            total_iters += 1
            new_value = float(distributed.dot(v, hv))
            if value is not None and abs(new_value - value) / (abs(value) + 1e-6) < tol:
                value, ok = new_value, True
                break
            value = new_value
            nxt = _deflate(hv, found)
            n = distributed.norm(nxt)
            if float(n) == 0.0:
                ok = True
                break
            v = nxt / n
        # hv is H v for the v being returned when we broke out; otherwise v moved one step.
        if not ok:
            hv = op.matvec(v)
            num_products += 1
            value = float(distributed.dot(v, hv))
        residuals.append(float(distributed.norm(hv - value * v)))
        values.append(value)
        converged.append(ok)
        found.append(v)
    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=torch.stack(found),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(converged),
        num_products=num_products,
        iterations=total_iters,
    )


# -- helpers ------------------------------------------------------------------------------


def _dtype_device(op: Any, v0: torch.Tensor | None) -> tuple[torch.dtype, torch.device]:
    dtype = getattr(op, "dtype", None) or (v0.dtype if v0 is not None else torch.float32)
    device = getattr(op, "device", None) or (v0.device if v0 is not None else torch.device("cpu"))
    return dtype, device


def _start_vector(v0, dim, dtype, device, generator) -> torch.Tensor:
    if v0 is None:
        # Random start drawn on the CPU from a seeded generator: identical on every rank.
        q = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    else:
        v0 = v0.to(dtype=dtype, device=device)
        if v0.ndim == 2:
            v0 = v0.sum(dim=0)
        if v0.shape != (dim,):
            raise UsageError(f"start vector has {v0.numel()} entries, the operator acts on {dim}")
        q = v0.clone()
    n = distributed.norm(q)
    if float(n) == 0.0:
        q = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        n = distributed.norm(q)
    return q / n


def _orthogonal_random(basis, dim, dtype, device, generator) -> torch.Tensor:
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    for _ in range(2):
        q = q - basis.T @ distributed.dots(basis, q)
    return q / distributed.norm(q)


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the Lanczos tridiagonal matrix, in float64 on the CPU."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _select(values: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values, in the order they are reported."""
    if which == "LA":
        return torch.argsort(values, descending=True)[:k]
    if which == "SA":
        return torch.argsort(values)[:k]
    return torch.argsort(values.abs(), descending=True)[:k]


def _deflate(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        v = v - distributed.dot(u, v) * u
    return v
