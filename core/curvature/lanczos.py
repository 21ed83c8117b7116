"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation, and power iteration.

Lanczos stops on the residual norms ‖H y − θ y‖ of the wanted Ritz pairs, which bound the
eigenvalue error (some eigenvalue lies within the residual of every Ritz value), never on
the change between iterations. Power iteration with deflation is kept as the reference the
seed codebases used (PyHessian, Cockpit, sgd.stability): it stops on the relative change
of the Rayleigh quotient, and reports its honest residual next to it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lscape.curvature import distributed
from lscape.curvature._basis import BLOCK, Basis, dots64, norm64
from lscape.curvature._ritz import gap_scale as _gap_scale
from lscape.curvature._ritz import ritz, select
from lscape.curvature.errors import CurvatureArgumentError

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
    tolerance the operator's dtype can certify for each pair; ``memory`` (Lanczos only) what the basis
    held: ``basis_vectors`` (allocated basis rows, in blocks of at most 16, never past the
    capacity), ``remainder_vectors``, ``final_vectors``, ``bytes_per_vector``, ``basis_bytes`` and ``peak_bytes`` (the solver's
    share of the peak: add the model and one product's autograd graph), ``basis_dtype``,
    ``basis_device``, ``budget_bytes``, ``capacity`` (basis rows the budget allows), ``reorth``
    ("full" or "thick-restart"), ``restarts`` and ``formula`` (the peak-memory formula, in words).
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
    memory: dict[str, Any] | None = None

    @property
    def all_converged(self) -> bool:
        """True when every requested pair met the tolerance."""
        return bool(self.converged.all())

    def warm_start(self) -> torch.Tensor:
        """The rows to start the next measurement from: the eigenvectors and the spare Ritz vectors."""
        if self.spare_vectors is None or not len(self.spare_vectors):
            return self.eigenvectors
        return torch.cat([self.eigenvectors, self.spare_vectors.to(self.eigenvectors.dtype)])


# The basis is kept in float64 while it fits in this many bytes.
_FLOAT64_BYTES = 256 * 2**20


@distributed.on_vectors
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
    basis_device: str | torch.device | None = None,
    memory_budget: int | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of the symmetric operator ``op`` by Lanczos with full
    reorthogonalisation and Rayleigh–Ritz on the whole basis.

    ``which`` "LA" largest algebraic, "LM" largest magnitude, "SA" smallest algebraic.

    Start block: the rows of ``v0`` (a flat vector, or a (j, dim) block such as the previous
    measurement's :meth:`EigenResult.warm_start`) plus ``fresh`` random directions (default:
    one with a warm start, so a warm start never hides an eigenvalue the previous vectors
    miss; a cold start is one random vector). The basis grows by the residual direction of
    the worst unconverged wanted Ritz pair (for one start vector this is exactly Lanczos with
    full reorthogonalisation: the coefficients known by symmetry removed locally, then one
    block Gram–Schmidt pass ``c = Q w``, ``w -= cᵀQ``, a second only when the first removed
    much; see ``lscape.curvature._basis``).

    Memory: only the basis is stored, never the products: each product is kept as float64
    coefficients on the basis and on a small block of remainder directions (see
    ``lscape.curvature._basis``), so the Ritz residuals are exact sums of squares of small
    vectors. Peak memory = model + one product (its autograd graph and about 2 vectors) +
    (m + u + k + spare + 1) vectors of ``dim`` entries (m ≤ ``capacity`` basis rows, u
    remainder directions: 1 for a cold start, ≤ start rows + fresh + 1 otherwise, one more
    while verifying; at the end the k Ritz vectors, the spare vectors and one product), held
    on ``basis_device`` (default: the operator's device; ``"cpu"`` keeps the basis in host
    memory while products run on the GPU). The basis is float64 for float64 operators or
    when the whole of it (max_iter + 1 rows) fits in min(256 MiB, budget), else the
    operator's dtype, with dot products accumulated in float64. ``memory_budget`` (bytes for
    all those vectors; default :data:`DEFAULT_BUDGET` = 256 MiB, or a quarter of the basis
    device's memory if less) sets ``capacity = max(budget // bytes_per_vector − e, k + spare
    + 1 + g)`` with e = u_max + k + spare + 1 the other vectors and g = verify + 2 (3 without
    verification) the room a restart needs (a budget below that floor is exceeded by it):
    when the basis reaches the capacity, Lanczos is *thick-restarted* in place — the wanted,
    spare and guard Ritz vectors are kept, the rest dropped, and the search goes on from
    their exact residual directions. This costs no
    accuracy in the returned pairs (residuals are still exact and the stopping rule the
    same) but convergence is slower — more products, typically 1.5–3× for a capacity of a
    few times k — and a missed near-tie is found later. The choice is recorded in
    :attr:`EigenResult.memory`.

    Stopping rule: every wanted pair has ‖H y − θ y‖ ≤ ``tol``·|θ| (some eigenvalue lies
    within the residual of every Ritz value) and, for k > 1, while searching, also ‖H y − θ y‖²/gap ≤
    ``tol``²·|θ| with gap the distance to the nearest other Ritz value (Kato–Temple: the Ritz
    value is then within tol²·|θ| of an eigenvalue). The second term matters only for near
    ties: a Ritz vector mixing two eigenvalues closer than the residual passes the first test
    alone and one member of the tie is then never resolved (returned as the next eigenvalue,
    converged and verified); it costs a few more products only where gaps are tight. For
    k = 1 the first test alone bounds the error of the value by tol·|θ| (a vector mixing a
    tie has its Rayleigh quotient between the tied eigenvalues), so the term is not applied.
    Before stopping, the residuals are *recomputed* with one fresh product per wanted Ritz
    vector (k products), and those true residuals decide ``converged``; if they sit above the
    in-loop ones because of the products' own rounding, the search tightens and, when it
    cannot go lower, stops with one warning naming that floor.
    Residuals cannot see an eigenvalue the basis missed (a member of a tight cluster, a
    second copy of a multiple eigenvalue, the top of a near-tied pair after a warm start), so
    when ``k > 1`` or the start was warm, convergence is then *verified*: a fresh random
    direction orthogonal to the basis is added and its Krylov sequence grown at least
    ``verify`` products (default 4, or 1 for a warm-started k = 1; 0 switches the check off),
    and for as long as the best Ritz pair beyond the k-th (the guard) is neither converged
    nor clearly separated from the k-th (its interval θ ± residual on the far side): an
    eigenvalue the basis misses shows up there as a rising, unconverged Ritz value. If the
    wanted Ritz values move by more than the tolerance or a pair becomes unconverged, the
    search resumes and is verified again. ``converged`` is true only for pairs that met the
    residual rule after a passed check. A tolerance below what the dtype can certify (about
    10·eps·max|θ|) stops at that floor, reports those pairs unconverged and warns. At most
    ``max_iter`` products in the search (default min(dim, 300)), plus the k final ones; a
    search that ends there unconverged warns.
    """
    which, global_dim, max_iter = _checked(op, k, which, tol, max_iter)
    vectors = distributed.vectors_of(op)  # sharded operators: local slices, dots summed over ranks
    dim = int(op.dim)  # the local vector length (global_dim on one rank or replicated)
    dtype, device = _dtype_device(op, v0)
    bdev = torch.device(basis_device) if basis_device is not None else torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = _start_rows(v0, dim)
    warm = starts is not None
    if fresh is None:
        fresh = 1 if warm else 0
    if verify is None:
        verify = 4 if k > 1 else (1 if warm else 0)
    if spare is None:
        spare = 1 if k == 1 else 2
    plan = vectors.plan_dim  # sizes decided alike on every rank (sharded: the largest rank's slice)
    budget = int(memory_budget) if memory_budget is not None else _default_budget(bdev)
    store = dtype if dtype == torch.float64 or 8 * plan * (max_iter + 1) > min(_FLOAT64_BYTES, budget) else torch.float64
    eps = float(torch.finfo(dtype).eps)
    bytes_per_vector = plan * torch.empty(0, dtype=store).element_size()
    extra = _extra_vectors(k, spare, len(starts) if starts is not None else 0, fresh, verify)
    keep_on_restart = k + spare + 1
    # a restart must leave room to grow (and to verify): measured at 5M parameters, λ_max at
    # tol 1e-3 took 34 products with 9 rows, 43 with 5 and 64 with 4 (32 with a full basis)
    least = keep_on_restart + (verify + 2 if verify else 3)
    capacity = min(max(budget // bytes_per_vector - extra, least), max_iter + k + spare + 2)
    basis = Basis(dim, store, bdev, block=min(BLOCK, capacity), limit=capacity)  # never more rows than the capacity
    reorth = "full" if capacity >= max_iter else "thick-restart"
    num_products = 0
    restarts = 0

    def randn() -> torch.Tensor:
        if vectors.sharded:  # drawn by global position: the same vector on any number of ranks
            return vectors.randn(1, generator, store, bdev)[0]
        return torch.randn(dim, generator=generator, dtype=store).to(device=bdev)  # no float64 copy of a vector

    def add(direction: torch.Tensor | None, residual: torch.Tensor | None = None) -> bool:
        """Grow the basis by ``direction`` (orthogonalised), or by the residual direction of the
        Ritz combination ``residual`` (already orthogonal: written into the next row, no pass)."""
        nonlocal num_products
        if len(basis) >= global_dim or (direction is None and residual is None):
            return False
        q = basis.residual_direction(residual) if residual is not None else basis.new_direction(direction)
        if q is None:
            return False
        w = op.matvec(q.to(dtype=dtype, device=device))
        num_products += 1
        basis.append(q, w)
        return True

    def add_random() -> bool:
        return any(add(randn()) for _ in range(3))

    # The start block.
    if starts is not None:
        for row in starts:
            if num_products < max_iter:
                add(row)
    fresh_seq: list[int] = []  # basis rows of the start block's fresh directions (grown first when verifying)
    for _ in range(fresh if warm else 1):
        if num_products < max_iter and add_random():
            fresh_seq.append(len(basis) - 1)
    if not len(basis):
        add_random()

    verifying = 0  # products left in the current verification round
    round_steps = 0  # products added in the current round
    snapshot = None  # wanted Ritz values when the round started
    verified: bool | None = None if verify == 0 else False
    tighten = 1.0  # internal tolerance factor, lowered when the true residuals disagree
    floor_hit: list[tuple[float, float]] = []  # (value, true residual) of pairs stuck at the products' floor
    history: list[tuple[float, torch.Tensor]] = []  # (worst relative residual, wanted Ritz values) per pass
    while True:
        theta, S, res = ritz(basis.T, basis.B)
        m = len(basis)
        wanted = select(theta, min(k, m), which)
        scale = float(theta.abs().max()) or 1.0
        floor = 10 * eps * scale
        # the Kato–Temple term sorts out near ties among k > 1 wanted pairs; for k = 1 the
        # residual rule alone bounds λ's error by tol·|θ| (a Ritz vector mixing a tie has its
        # value between the tied eigenvalues), so it would only buy tol² accuracy at the price
        # of products (measured at 5M parameters: 30 products instead of 23 at tol 1e-3)
        bound = torch.maximum(tol * tighten * (_gap_scale(theta) if k > 1 else theta.abs()),
                              torch.full_like(theta, floor))
        ok = res <= bound
        done = m >= k and bool(ok[wanted].all()) and m >= min_iter
        worst_rel = float((res[wanted] / theta[wanted].abs().clamp_min(1e-300)).max())
        history.append((worst_rel, theta[wanted].clone()))
        stall = max(30, 6 * k)
        if not done and not verifying and len(history) > stall and _stalled(history, stall):
            # No progress in `stall` passes and the Ritz values stand still: the products' own
            # rounding is the floor.
            final = _final_pairs(op, basis, theta, S, wanted, dtype, device)
            num_products += len(wanted)
            floor_hit = [(float(v), float(r)) for v, r in zip(final[1], final[2])
                         if float(r) > tol * abs(float(v))]
            break
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
        elif done and verify and not verified:
            verifying, round_steps, snapshot = verify, 0, theta[wanted].clone()
        finished = done and (verify == 0 or bool(verified))
        if m >= global_dim:  # the basis spans the space: Rayleigh–Ritz is exact, nothing can be missed
            verified = True if verify else None
            finished = True
        if finished:
            final = _final_pairs(op, basis, theta, S, wanted, dtype, device)
            num_products += len(wanted)
            values, residuals = final[1], final[2]
            bad = residuals > torch.maximum(tol * values.abs(), torch.full_like(values, floor))
            if not bool(bad.any()) or m >= global_dim or num_products >= max_iter or tighten < 0.1:
                if bool(bad.any()):
                    floor_hit = [(float(values[i]), float(residuals[i])) for i in range(len(values)) if bad[i]]
                break
            tighten *= 0.25  # the in-loop residuals were optimistic: search on below them
            continue
        if num_products >= max_iter:
            final = _final_pairs(op, basis, theta, S, wanted, dtype, device)
            num_products += len(wanted)
            break
        if m >= capacity:  # the budget is full: thick restart on the wanted and spare Ritz vectors
            basis.restart(S[:, select(theta, min(keep_on_restart, m), which)])
            restarts += 1
            fresh_seq.clear()  # a verification round goes on from the kept vectors' residuals
            continue
        if verifying:
            # Grow the fresh direction's Krylov sequence: a random start, then its last product.
            if round_steps == 0 and warm and fresh_seq:
                grown = add(None, residual=_unit(m, fresh_seq.pop(0)))
            elif round_steps == 0:
                grown = add_random()
            else:
                grown = add(None, residual=_unit(m, m - 1))
            round_steps += 1
            if not grown and not add_random():
                final = _final_pairs(op, basis, theta, S, wanted, dtype, device)
                num_products += len(wanted)
                break
            continue
        # The residual direction of the worst unconverged wanted pair (exactly Lanczos for one start).
        pending = [int(i) for i in wanted if not bool(ok[int(i)])] or [int(i) for i in wanted]
        worst = max(pending, key=lambda i: float(res[i] / bound[i]))
        if not add(None, residual=S[:, worst]) and not add_random():
            final = _final_pairs(op, basis, theta, S, wanted, dtype, device)
            num_products += len(wanted)
            break

    y, values, residuals = final
    m = len(basis)
    order = select(theta, m, which)
    spare_idx = order[len(wanted) : len(wanted) + spare]
    attainable = tol * values.abs() >= floor
    converged = (residuals <= tol * values.abs()) & attainable
    if verify and not verified:
        converged = torch.zeros_like(converged)
    _warn_unconverged(values, residuals, converged, attainable, floor_hit, tol, floor, dtype, num_products, max_iter)
    spares = None
    if len(spare_idx):
        spares = basis.Q.combine(S[:, spare_idx])
        spares = spares.div_(vectors.row_norms(spares)[:, None].clamp_min(1e-300)).to(dtype=dtype, device=device)
    memory = _memory_report(basis, len(values) + len(spare_idx) + 1, store, bdev, budget, capacity, reorth, restarts)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=y.to(dtype=dtype, device=device),
        residuals=residuals,
        converged=converged,
        num_products=num_products,
        iterations=m,
        verified=verified,
        spare_vectors=spares,
        tol_floor=torch.full_like(values, floor) / values.abs().clamp_min(1e-300),
        memory=memory,
    )



def _checked(op: Any, k: int, which: str, tol: float, max_iter: int | None) -> tuple[str, int, int]:
    """The validated ``which``, the operator size and the product cap (ValueError in the
    library's own words)."""
    which = which.upper()
    if which not in WHICH:
        raise CurvatureArgumentError(f"unknown eigenvalue selection {which!r}; choose LA, LM or SA", "which")
    dim = int(getattr(op, "global_dim", op.dim))  # a sharded operator's vectors are slices of global_dim
    if k < 1 or k > dim:
        raise CurvatureArgumentError(f"k must be between 1 and the operator size {dim}, not {k}", "k")
    if tol < 0:
        raise CurvatureArgumentError(f"tol must be non-negative, not {tol}", "tol")
    max_iter = min(dim, max_iter if max_iter is not None else 300)
    return which, dim, max(max_iter, min(k, dim))


def _warn_unconverged(values, residuals, converged, attainable, floor_hit, tol, floor, dtype, num_products,
                      max_iter) -> None:
    """One warning when pairs come back unconverged, naming why: a tol below what the dtype can
    certify, the products' rounding floor, or the product cap."""
    if not bool(attainable.all()):
        warnings.warn(f"lanczos: tol={tol:g} is below what {str(dtype).replace('torch.', '')} products can certify "
                      f"for {int((~attainable).sum())} of {len(values)} eigenvalues (residual floor ≈ {floor:.1e}); "
                      f"they are reported unconverged", RuntimeWarning, stacklevel=4)
    elif floor_hit:
        worst_rel = max(r / max(abs(v), 1e-300) for v, r in floor_hit)
        warnings.warn(f"lanczos: tol={tol:g} cannot be reached for {len(floor_hit)} of {len(values)} eigenvalues: "
                      f"the products' rounding floor is ≈ {worst_rel:.1e} relative (true residual after "
                      f"{num_products} products); they are reported unconverged", RuntimeWarning, stacklevel=4)
    elif not bool(converged.all()):
        worst_rel = float((residuals / values.abs().clamp_min(1e-300)).max())
        why = "verification did not finish" if bool((residuals <= tol * values.abs()).all()) else \
            f"worst relative residual {worst_rel:.1e}"
        warnings.warn(f"lanczos: stopped after {num_products} products (max_iter={max_iter}) with "
                      f"{int((~converged).sum())} of {len(values)} pairs unconverged ({why})",
                      RuntimeWarning, stacklevel=4)


def _memory_report(basis: Basis, final_vectors: int, store: torch.dtype, bdev: torch.device, budget: int,
                   capacity: int, reorth: str, restarts: int) -> dict[str, Any]:
    """What :attr:`EigenResult.memory` records: the vectors held at the peak and their bytes."""
    bpv = basis.bytes_per_vector
    return {
        "basis_vectors": basis.Q.peak_rows,
        "remainder_vectors": basis.peak_u,
        "final_vectors": final_vectors,
        "bytes_per_vector": bpv,
        "basis_bytes": basis.peak_vectors() * bpv,
        "peak_bytes": (basis.peak_vectors() + final_vectors) * bpv,
        "basis_dtype": str(store).replace("torch.", ""),
        "basis_device": str(bdev),
        "budget_bytes": budget,
        "capacity": int(capacity),
        "reorth": reorth,
        "restarts": restarts,
        "formula": "peak ≈ model + one product (autograd graph + ~2 vectors) + (basis_vectors + remainder_vectors + "
                   "final_vectors) × bytes_per_vector; capacity = max(budget_bytes // bytes_per_vector − e, k + spare "
                   "+ 1 + g), e = remainders + k + spare + 1, g = verify + 2 (3 without verification)",
    }

def _final_pairs(op, basis: Basis, theta, S, wanted, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The wanted Ritz vectors, their Rayleigh quotients and *true* residuals from fresh products."""
    y = basis.Q.combine(S[:, wanted])
    y.div_(distributed.vectors_of(op).row_norms(y)[:, None].clamp_min(1e-300))
    values = torch.zeros(len(y), dtype=torch.float64)
    residuals = torch.zeros(len(y), dtype=torch.float64)
    for i in range(len(y)):
        hy = op.matvec(y[i].to(dtype=dtype, device=device)).to(dtype=y.dtype, device=y.device)
        values[i] = float(dots64(y[i][None], hy)[0]) / max(float(dots64(y[i][None], y[i])[0]), 1e-300)
        residuals[i] = norm64(hy.add_(y[i], alpha=-float(values[i])))  # in place: no temporary
        del hy
    return y, values, residuals


def _stalled(history: list[tuple[float, torch.Tensor]], stall: int) -> bool:
    """The residuals did not halve over the last ``stall`` passes while the wanted Ritz values
    moved less than those residuals: what a floor of product rounding looks like (a slow but
    real convergence moves the Ritz values)."""
    recent, before = history[-stall:], history[:-stall]
    best_recent, best_before = min(r for r, _ in recent), min(r for r, _ in before)
    if best_recent <= 0.5 * best_before:
        return False
    first, last = recent[0][1], recent[-1][1]
    if first.shape != last.shape:
        return False
    moved = float(((last - first).abs() / last.abs().clamp_min(1e-300)).max())
    return moved < best_recent


def _unit(m: int, i: int) -> torch.Tensor:
    e = torch.zeros(m, dtype=torch.float64)
    e[i] = 1.0
    return e


#: the default memory budget of the basis: 256 MiB, or a quarter of the basis device's memory if less
DEFAULT_BUDGET = 256 * 2**20


def _extra_vectors(k: int, spare: int, starts: int, fresh: int, verify: int) -> int:
    """Vectors of ``dim`` entries the solver holds besides the basis rows, counted in the
    budget: the remainder block (≤ starts + fresh + 1 rows, one more while verifying) plus, at
    the end, the k Ritz vectors, the spare ones and one product (while building: the new row
    and its product, fewer)."""
    return (starts + fresh + 1 + (1 if verify else 0)) + k + spare + 1


def _default_budget(device: torch.device) -> int:
    """:data:`DEFAULT_BUDGET`, or a quarter of the device's memory (host RAM for the CPU) if less."""
    try:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, total // 4)


def _start_rows(v0: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    if v0 is None:
        return None
    rows = v0.reshape(1, -1) if v0.ndim == 1 else v0
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise CurvatureArgumentError(f"start vector has {rows.shape[-1]} entries, the operator acts on {dim}", "v0")
    rows = rows[torch.isfinite(rows).all(dim=1)]
    return rows if len(rows) else None


@distributed.on_vectors
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
    dim = int(getattr(op, "global_dim", op.dim))
    if k < 1 or k > dim:
        raise CurvatureArgumentError(f"k must be between 1 and the operator size {dim}, not {k}", "k")
    vectors = distributed.vectors_of(op)
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
            v = vectors.randn(1, generator, dtype, device)[0]
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


def _deflate(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        v = v - distributed.dot(u, v) * u
    return v
