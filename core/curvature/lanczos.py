"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation, and power iteration.

Lanczos stops on the residual norms ‖H y − θ y‖ of the wanted Ritz pairs, which bound the
eigenvalue error (some eigenvalue lies within the residual of every Ritz value), never on
the change between iterations. Power iteration with deflation is kept as the reference the
seed codebases used (PyHessian, Cockpit, sgd.stability): it stops on the relative change
of the Rayleigh quotient, and reports its honest residual next to it.
"""

from __future__ import annotations

import warnings
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

    ``eigenvalues`` (k,) float64 in the order asked for (descending for "LA", descending
    magnitude for "LM", ascending for "SA"); ``eigenvectors`` (k, dim) unit rows in the
    operator's dtype; ``residuals`` (k,) ‖H v − λ v‖ of each returned pair, computed from the
    operator's products by linearity (H y = Σ s_j H q_j), not from the recurrence;
    ``converged`` (k,) bool: residual ≤ tol·|λ| *and* the search for missed eigenvalues
    passed (see :func:`lanczos`), false where tol is below what the dtype can deliver;
    ``num_products`` operator products spent; ``iterations`` basis vectors built;
    ``verified`` whether the fresh-direction check ran and passed (None when not asked);
    ``spare_vectors`` the next Ritz vectors beyond the k wanted ones (``spare``: 1 for k = 1, else 2) (warm starts keep them,
    so a swap between λ_k and λ_{k+1} is seen at once); ``tol_floor`` the smallest relative
    tolerance the operator's dtype can certify for each pair.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_products: int
    iterations: int
    verified: bool | None = None
    spare_vectors: torch.Tensor | None = None
    tol_floor: torch.Tensor | None = None

    @property
    def all_converged(self) -> bool:
        """True when every requested pair met the tolerance."""
        return bool(self.converged.all())

    def warm_start(self) -> torch.Tensor:
        """The rows to start the next measurement from: the eigenvectors and the spare Ritz vectors."""
        if self.spare_vectors is None or not len(self.spare_vectors):
            return self.eigenvectors
        return torch.cat([self.eigenvectors, self.spare_vectors.to(self.eigenvectors.dtype)])


# Basis and products are kept in float64 while they fit in this many bytes (both together).
_FLOAT64_BYTES = 4 * 2**30


def lanczos(
    op: Any,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: torch.Tensor | None = None,
    min_iter: int = 1,
    seed: int = 0,
    fresh: int | None = None,
    verify: int | None = None,
    spare: int | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``op`` by block Lanczos with
    Rayleigh–Ritz on the whole basis.

    ``which`` "LA" largest algebraic, "LM" largest magnitude, "SA" smallest algebraic.

    Start block: the rows of ``v0`` (a flat vector, or a (j, dim) block such as the previous
    measurement's :meth:`EigenResult.warm_start`) plus ``fresh`` random directions (default:
    one with a warm start, so a warm start never hides an eigenvalue the previous vectors
    miss; a cold start is one random vector). The basis grows by the orthogonalised residual
    of the worst unconverged wanted Ritz pair (for one start vector this is exactly Lanczos
    with full reorthogonalisation, two Gram–Schmidt passes). Ritz pairs come from the
    projected matrix Qᵀ(HQ) built from the stored products, so any basis, of any number of
    start vectors, gives exact Rayleigh–Ritz.

    Stopping rule: every wanted pair has ‖H y − θ y‖ ≤ ``tol``·|θ| (some eigenvalue lies
    within the residual of every Ritz value, typically within its square over the gap).
    Residuals cannot see an eigenvalue the basis missed (a member of a tight cluster, a
    second copy of a multiple eigenvalue, the top of a near-tied pair after a warm start), so
    when ``k > 1`` or the start was warm, convergence is then *verified*: a fresh random
    direction orthogonal to the basis is added and its Krylov sequence grown ``verify``
    products (default 4, or 1 for a warm-started k = 1; 0 switches the check off); if the wanted Ritz values move by more
    than the tolerance or a pair becomes unconverged, the search resumes and is verified
    again. ``converged`` is true only for pairs that met the residual rule after a passed
    check. A tolerance below what the dtype can certify (about 10·eps·max|θ|) stops at that
    floor, reports those pairs unconverged and warns. At most ``max_iter`` products
    (default min(dim, 300)).
    """
    which = which.upper()
    if which not in WHICH:
        raise UsageError(f"unknown eigenvalue selection {which!r}; choose LA, LM or SA")
    dim = int(op.dim)
    if k < 1 or k > dim:
        raise UsageError(f"k must be between 1 and the operator size {dim}, not {k}")
    if tol < 0:
        raise UsageError(f"tol must be non-negative, not {tol}")
    max_iter = min(dim, max_iter if max_iter is not None else 300)
    max_iter = max(max_iter, min(k, dim))
    dtype, device = _dtype_device(op, v0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = _start_rows(v0, dim)
    warm = starts is not None
    if fresh is None:
        fresh = 1 if warm else 0
    if verify is None:
        verify = 4 if k > 1 else (1 if warm else 0)
    store = torch.float64 if (dtype == torch.float64 or 16 * dim * (max_iter + 1) <= _FLOAT64_BYTES) else dtype
    eps = float(torch.finfo(dtype).eps)
    if spare is None:
        spare = 1 if k == 1 else 2
    gram_floor = 4 * float(torch.finfo(store).eps) ** 0.5

    basis = _Rows(dim, store, device)
    products = _Rows(dim, store, device)
    T = torch.zeros(0, 0, dtype=torch.float64)
    G = torch.zeros(0, 0, dtype=torch.float64)
    num_products = 0

    def randn() -> torch.Tensor:
        return torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=store, device=device)

    def add(direction: torch.Tensor) -> bool:
        """Orthonormalise ``direction`` against the basis, multiply it, extend T and G."""
        nonlocal T, G, num_products
        q = direction.to(dtype=store, device=device)
        n0 = float(distributed.norm(q))
        if n0 == 0.0 or not torch.isfinite(torch.tensor(n0)):
            return False
        q = q / n0
        for _ in range(2):
            if len(basis):
                q = q - basis.view().T @ distributed.dots(basis.view(), q)
        n = float(distributed.norm(q))
        if n <= 1e-8:  # dependent on the basis (in the working precision)
            return False
        q = q / n
        w = op.matvec(q.to(dtype)).to(store)
        num_products += 1
        m = len(basis)
        basis.append(q)
        products.append(w)
        tq = distributed.dots(basis.view(), w).double().cpu()  # q_i · H q_m, i ≤ m
        # q_m · H q_i, i < m: products in a low precision are not exactly symmetric, and the
        # residual identity ‖HQs − θQs‖² = sᵀGs − θ² needs the symmetric part of the exact
        # projection Qᵀ(HQ), both triangles (else it is off by √eps of the operator).
        tr = distributed.dots(products.view()[:m], q).double().cpu() if m else tq[:0]
        gq = distributed.dots(products.view(), w).double().cpu()
        T2 = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        G2 = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        T2[:m, :m], G2[:m, :m] = T, G
        T2[:, m] = tq
        T2[m, :m] = tr
        G2[m, :], G2[:, m] = gq, gq
        T, G = T2, G2
        return True

    def add_random() -> bool:
        for _ in range(3):
            if len(basis) >= dim:
                return False
            if add(randn()):
                return True
        return False

    # The start block.
    if starts is not None:
        for row in starts:
            if num_products < max_iter:
                add(row)
    fresh_seq: list[int] = []  # product rows of the start block's fresh directions (grown first when verifying)
    for _ in range(fresh if warm else 1):
        if num_products < max_iter and add_random():
            fresh_seq.append(len(products) - 1)
    if not len(basis):
        add_random()

    verifying = 0  # products left in the current verification round
    snapshot = None  # wanted Ritz values when the round started
    verified: bool | None = None if verify == 0 else False
    while True:
        theta, s = torch.linalg.eigh((T + T.T) / 2)
        m = len(basis)
        wanted = _select(theta, min(k, m), which)
        scale = float(theta.abs().max()) or 1.0
        floor = 10 * eps * scale
        res = _gram_residuals(theta, s, G)
        bound = torch.maximum(tol * theta.abs(), torch.full_like(theta, floor))
        ok = res <= bound
        # The Gram estimate loses digits below √eps·max|θ|: there, residuals are computed
        # from the vectors (only near convergence, only for the wanted pairs).
        unsure = [int(i) for i in wanted
                  if float(res[int(i)]) <= gram_floor * scale and float(bound[int(i)]) < gram_floor * scale]
        if unsure and all(bool(ok[int(i)]) or int(i) in unsure for i in wanted):
            idx = torch.tensor(unsure)
            coef = s[:, idx].T.to(store).to(device)
            r = coef @ products.view() - theta[idx].to(store).to(device)[:, None] * (coef @ basis.view())
            res = res.clone()
            res[idx] = r.norm(dim=1).double().cpu()
            ok = res <= bound
        done = m >= k and bool(ok[wanted].all()) and m >= min_iter
        if verifying:
            changed = snapshot is not None and (
                len(snapshot) != len(wanted)
                or bool(((theta[wanted] - snapshot).abs() > bound[wanted]).any())
            )
            if not done or changed:
                verifying, snapshot = 0, None  # something new entered: search on
            else:
                verifying -= 1
                if verifying == 0:
                    verified = True
                    break
        elif done:
            if verify == 0 or verified:
                break
            verifying, snapshot = verify, theta[wanted].clone()
        if m >= dim:  # the basis spans the space: Rayleigh–Ritz is exact, nothing can be missed
            verified = True if verify else None
            break
        if num_products >= max_iter:
            break
        if verifying:
            # Grow the fresh direction's Krylov sequence: a random start, then its last product.
            if verifying == verify and warm and fresh_seq:
                # The start block's fresh direction has been multiplied once: grow its sequence.
                grown = add(products.view()[fresh_seq.pop(0)])
            elif verifying == verify:
                grown = add_random()
            else:
                grown = add(products.view()[-1])
            if not grown and not add_random():
                break
            continue
        # The residual of the worst unconverged wanted pair (exactly Lanczos for one start).
        pending = [int(i) for i in wanted if not bool(ok[int(i)])] or [int(i) for i in wanted]
        worst = max(pending, key=lambda i: float(res[i] / bound[i]))
        coef = s[:, worst].to(store).to(device)
        direction = coef @ products.view() - float(theta[worst]) * (coef @ basis.view())
        if not add(direction) and not add_random():
            break

    # Final pairs from the stored products, by linearity; honest residuals.
    theta, s = torch.linalg.eigh((T + T.T) / 2)
    m = len(basis)
    order = _select(theta, m, which)
    wanted, spare_idx = order[: min(k, m)], order[min(k, m) : min(k, m) + spare]
    coef = s[:, wanted].T.to(store).to(device)
    y = coef @ basis.view()
    hy = coef @ products.view()
    norms = y.norm(dim=1, keepdim=True).clamp_min(1e-300)
    y, hy = y / norms, hy / norms
    values = (y * hy).sum(dim=1).double().cpu()
    residuals = (hy - values.to(store).to(device)[:, None] * y).norm(dim=1).double().cpu()
    scale = float(theta.abs().max()) or 1.0
    floor = 10 * eps * scale
    attainable = tol * values.abs() >= floor
    if not bool(attainable.all()):
        warnings.warn(f"lanczos: tol={tol:g} is below what {str(dtype).replace('torch.', '')} products can certify "
                      f"for {int((~attainable).sum())} of {len(values)} eigenvalues (residual floor ≈ {floor:.1e}); "
                      f"they are reported unconverged", RuntimeWarning, stacklevel=2)
    converged = (residuals <= tol * values.abs()) & attainable
    if verify and not verified:
        converged = torch.zeros_like(converged)
    spares = None
    if len(spare_idx):
        sc = s[:, spare_idx].T.to(store).to(device)
        spares = sc @ basis.view()
        spares = (spares / spares.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(dtype)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=y.to(dtype),
        residuals=residuals,
        converged=converged,
        num_products=num_products,
        iterations=m,
        verified=verified,
        spare_vectors=spares,
        tol_floor=torch.full_like(values, floor) / values.abs().clamp_min(1e-300),
    )


class _Rows:
    """A growable (m, dim) block of rows, preallocated in chunks."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.data = torch.zeros(0, dim, dtype=dtype, device=device)
        self.m = 0

    def append(self, row: torch.Tensor) -> None:
        if self.m == self.data.shape[0]:
            grow = max(16, self.data.shape[0])
            self.data = torch.cat([self.data, torch.zeros(grow, self.data.shape[1], dtype=self.data.dtype,
                                                          device=self.data.device)])
        self.data[self.m] = row
        self.m += 1

    def view(self) -> torch.Tensor:
        return self.data[: self.m]

    def __len__(self) -> int:
        return self.m


def _gram_residuals(theta: torch.Tensor, s: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """‖(HQ)ᵀs − θ Qᵀs‖ for every Ritz pair from the Gram matrix G = (HQ)(HQ)ᵀ (Q orthonormal)."""
    sq = (s * (G @ s)).sum(dim=0) - theta**2
    return sq.clamp_min(0).sqrt()


def _start_rows(v0: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if v0 is None:
        return None
    rows = v0.reshape(1, -1) if v0.ndim == 1 else v0
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise UsageError(f"start vector has {rows.shape[-1]} entries, the operator acts on {dim}")
    rows = rows[torch.isfinite(rows).all(dim=1)]
    return rows if len(rows) else None


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
