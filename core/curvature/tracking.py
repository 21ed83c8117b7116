"""λ_max for the price of a step: warm-started tracking of one extreme eigenpair during training.

Between two measurements a few SGD steps move θ a little, and the top eigenvector with it.
:func:`track_eigenpair` starts a small Krylov search from the previous measurement's
eigenvector (with its second vector while the next eigenvalue is not known), grows it by the
residual direction of the wanted Ritz pair (Lanczos on the basis of
:func:`lscape.curvature.lanczos`) and accepts as soon as the eigenvalue's error bound
min(r, r²/δ) ≤ tol·|θ|, r = ‖Hy − θy‖ its residual (exact by linearity from the kept
coefficients of the products: accepting costs no extra product, so an eigenvector that did
not move is re-measured for **one** product) and δ the gap to the next eigenvalue known from
the last cold solve, less how far the wanted one moved since (Kato–Temple, :func:`kato_temple`). A search that is not accepted
within ``max_iter`` products falls back to a full, verified Lanczos solve started from what it
found (``TrackResult.accepted`` says which).

A residual test says that θ is near *an* eigenvalue, not that it is the largest: a tracked
pair can follow an eigenvalue that another one overtook. So :class:`Tracker` also solves from
a random start every ``verify_every``-th measurement (:func:`cold_solve`, the top two pairs,
verified) and compares: :func:`disagree` says whether the two are the same eigenvalue
(relative gap beyond 2·tol, what two values each within tol·|θ| of one eigenvalue can differ
by). The cold solve then wins and tracking goes on from its vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lscape.curvature._basis import BLOCK, Basis, norm64
from lscape.curvature._ritz import ritz, select
from lscape.curvature.lanczos import EigenResult, lanczos

__all__ = ["TrackResult", "Tracker", "track_eigenpair", "cold_solve", "disagree", "relative_gap", "kato_temple"]

# The search basis is kept in float64 while it fits in this many bytes.
_FLOAT64_BYTES = 256 * 2**20
#: the share of the gap δ = (θ − λ₂) − |θ − λ₁| (λ₁, λ₂ from the last cold solve) the Kato–Temple
#: bound r²/δ counts (1: the allowance for λ₂'s drift is how far λ₁ moved)
KATO_SAFETY = 1.0


@dataclass
class TrackResult:
    """One tracked measurement.

    ``result`` the :class:`EigenResult` returned (the accepted tracked pair, or the fallback
    solve's); ``accepted`` whether the warm search met the residual test within its
    products; ``track_products`` products of the warm search; ``fallback_products`` products
    of the full solve after a search that was not accepted (0 when accepted); ``bound`` the
    bound on |θ − λ| the acceptance used (min(r, r²/δ); the residual after a fallback)."""

    result: EigenResult
    accepted: bool
    track_products: int
    fallback_products: int = 0
    bound: float = math.nan

    @property
    def num_products(self) -> int:
        return self.track_products + self.fallback_products

    @property
    def eigenvalue(self) -> float:
        return float(self.result.eigenvalues[0])


def relative_gap(a: float, b: float) -> float:
    """|a − b| / max(|a|, |b|) (0 for two zeros; NaN if either is NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def disagree(tracked: float, cold: float, tol: float) -> tuple[float, bool]:
    """``(relative gap, disagreement)`` between a tracked and a cold eigenvalue each measured
    to a residual ≤ tol·|θ|: both lie within tol·|θ| of an eigenvalue, so two values of the
    *same* eigenvalue differ by at most about 2·tol relative; more means the tracked pair
    followed another eigenvalue (or a near-tie swapped), a disagreement."""
    gap = relative_gap(float(tracked), float(cold))
    return gap, bool(math.isnan(gap) or gap > 2.0 * tol * (1.0 + 1e-9) + 1e-12)


def kato_temple(residual: float, value: float, next_value: float | None, which: str = "LA",
                moved: float = 0.0) -> float:
    """The Kato–Temple bound r²/δ on |θ − λ| for a Ritz pair (θ, residual r), with δ a lower
    bound on the distance from θ to every eigenvalue but λ: :data:`KATO_SAFETY` times the
    distance from θ to ``next_value`` (the next eigenvalue on the wanted side, from the last
    cold solve: LA θ − λ₂, SA λ₂ − θ, LM |θ| − |λ₂|) less ``moved`` (how far the wanted
    eigenvalue moved since that solve: λ₂ may have moved as far towards θ); inf when that is
    unknown or θ is not beyond it."""
    if next_value is None or math.isnan(next_value):
        return math.inf
    if which == "LA":
        delta = value - next_value
    elif which == "SA":
        delta = next_value - value
    else:
        delta = abs(value) - abs(next_value)
    delta = KATO_SAFETY * (delta - abs(moved))
    return residual**2 / delta if delta > 0 else math.inf


def track_eigenpair(op: Any, start: torch.Tensor, which: str = "LA", tol: float = 1e-3, max_iter: int = 12,
                    fallback_iter: int | None = 100, seed: int = 0, spare: bool | None = None,
                    next_value: float | None = None, cold_value: float | None = None,
                    **lanczos_kw: Any) -> TrackResult:
    """The extreme eigenpair of ``op`` (``which``: LA, SA, LM) tracked from ``start``: the
    previous eigenvector, or a (j, dim) block whose first row is the previous eigenvector and
    whose second row the previous next eigenvector or Ritz vector (:meth:`EigenResult.warm_start`).

    The search basis begins with the first row (and the second when ``spare`` is true; with
    ``spare=None`` when ``next_value`` is unknown) and grows by the residual direction of the
    wanted Ritz pair: Lanczos with full reorthogonalisation from a warm start, on the basis
    :func:`lscape.curvature.lanczos` uses. Each product is kept as float64 coefficients on
    the basis and a small remainder block, so each pass's residual ‖H y − θ y‖ of the wanted
    Ritz pair is exact by linearity (to the products' rounding) and accepting costs no product. Accepted when the eigenvalue
    error bound min(r, r²/δ) ≤ ``tol``·|θ|: r always bounds it; r²/δ (Kato–Temple,
    :func:`kato_temple`) when ``next_value`` — the next eigenvalue, from the last cold solve —
    gives the gap δ (less how far θ moved from ``cold_value``, the wanted eigenvalue then). After ``max_iter`` products without that, a full
    :func:`lscape.curvature.lanczos` (``fallback_iter`` products at most, verified with a
    fresh direction) starts from the search's two best Ritz vectors. Memory: the Lanczos basis
    of :func:`lscape.curvature.lanczos` (``lscape.curvature._basis``: at most ``max_iter``
    basis vectors and a few remainder directions, never the products), float64 while it fits
    in 256 MB.
    """
    which = which.upper()
    dim = int(op.dim)
    dtype = getattr(op, "dtype", None) or start.dtype
    device = getattr(op, "device", None) or start.device
    rows = start.reshape(1, -1) if start.ndim == 1 else start
    if rows.shape[-1] != dim:
        raise ValueError(f"start vector has {rows.shape[-1]} entries, the operator acts on {dim}")
    rows = rows[torch.isfinite(rows).all(dim=1)]
    cap = min(dim, max_iter)
    store = torch.float64 if (dtype == torch.float64 or 8 * dim * (cap + 2) <= _FLOAT64_BYTES) else dtype
    basis = Basis(dim, store, torch.device(device), block=min(BLOCK, cap + 2))
    if spare is None:
        spare = next_value is None or math.isnan(next_value)

    def add(direction: torch.Tensor | None) -> bool:
        if direction is None or len(basis) >= cap:
            return False
        q = basis.new_direction(direction)
        if q is None:
            return False
        basis.append(q, op.matvec(q.to(dtype=dtype, device=device)))
        return True

    for row in rows[: 2 if spare else 1]:
        add(row)
    if not len(basis):  # nothing usable to start from: a full solve
        return _fallback(op, None, which, tol, fallback_iter, seed, 0, lanczos_kw)
    while True:
        theta, S, res = ritz(basis.T, basis.B)  # residuals exact by linearity: H Q s = Q T s + U B s
        order = select(theta, len(theta), which)
        i = int(order[0])
        value, residual = float(theta[i]), float(res[i])
        moved = abs(value - cold_value) if cold_value is not None and math.isfinite(cold_value) else 0.0
        bound = min(residual, kato_temple(residual, value, next_value, which, moved))
        if bound <= tol * abs(value) and abs(value) > 0:
            y = basis.Q.combine(S[:, i])
            spare_vectors = None
            if len(basis) > 1:
                spare_vectors = basis.Q.combine(S[:, int(order[1])])[None].to(dtype=dtype, device=device)
            elif len(rows) > 1:
                spare_vectors = rows[1:2].to(dtype=dtype, device=device)  # the previous one stays useful
            result = EigenResult(
                eigenvalues=torch.tensor([value], dtype=torch.float64),
                eigenvectors=(y / norm64(y))[None].to(dtype=dtype, device=device),
                residuals=torch.tensor([residual], dtype=torch.float64),
                converged=torch.tensor([True]),
                num_products=len(basis), iterations=len(basis), verified=None, spare_vectors=spare_vectors)
            return TrackResult(result, True, len(basis), 0, bound)
        if len(basis) >= cap or not add(basis.remainder(S[:, i])):
            best = basis.Q.combine(S[:, order[:2]]).to(dtype=dtype, device=device)
            return _fallback(op, best, which, tol, fallback_iter, seed, len(basis), lanczos_kw)


def _fallback(op: Any, v0: torch.Tensor | None, which: str, tol: float, max_iter: int | None, seed: int,
              spent: int, lanczos_kw: dict[str, Any]) -> TrackResult:
    """A full verified Lanczos solve after a search that was not accepted."""
    result = lanczos(op, k=1, which=which, tol=tol, max_iter=max_iter, v0=v0, seed=seed, **lanczos_kw)
    return TrackResult(result, False, spent, int(result.num_products), float(result.residuals[0]))


def cold_solve(op: Any, which: str = "LA", tol: float = 1e-3, max_iter: int | None = 100, seed: int = 0,
               **lanczos_kw: Any) -> EigenResult:
    """The cold, verified solve that keeps tracking honest: Lanczos from a random start for the
    top two eigenpairs (k = 2, verified with a fresh direction, so the second eigenvalue is
    certified too: it gives the gap of the Kato–Temple test)."""
    k = 2 if int(op.dim) >= 2 else 1
    return lanczos(op, k=k, which=which, tol=tol, max_iter=max_iter, seed=seed, **lanczos_kw)


@dataclass
class Tracker:
    """Tracking state across measurements: the previous eigenvector and next vector
    (``vectors``), the next eigenvalue from the last cold solve (``next_value``), and how many
    measurements were taken (``count``: every ``verify_every``-th, counting from the first,
    is a cold solve, :func:`cold_solve`; ``verify_every=0``: only the first).

    :meth:`measure` returns the stored :class:`EigenResult` (its first pair is the
    measurement) and a dict of what it did: ``tracked`` (the value is the accepted warm
    search's), ``track_products`` (products of the warm search and its fallback),
    ``cold_products`` (of the cold solve, 0 when none), ``track_gap`` (relative gap tracked
    vs cold; NaN without both), ``track_disagree`` (:func:`disagree`). The cold value wins
    where both exist. :meth:`state_dict` / :meth:`load_state_dict` carry everything across a
    checkpoint.
    """

    verify_every: int = 10
    max_iter: int = 12
    count: int = 0
    vectors: torch.Tensor | None = None
    next_value: float = math.nan
    cold_value: float = math.nan
    disagreements: int = 0

    def measure(self, op: Any, which: str = "LA", tol: float = 1e-3, fallback_iter: int | None = 100,
                seed: int = 0, **lanczos_kw: Any) -> tuple[EigenResult, dict[str, Any]]:
        cold_due = self.count == 0 or (self.verify_every > 0 and self.count % self.verify_every == 0)
        vectors = self.vectors if self.vectors is not None and self.vectors.shape[-1] == int(op.dim) else None
        info: dict[str, Any] = {"tracked": False, "track_products": 0, "cold_products": 0,
                                "track_gap": math.nan, "track_disagree": False}
        tracked: TrackResult | None = None
        if vectors is not None:
            tracked = track_eigenpair(op, vectors, which=which, tol=tol, max_iter=self.max_iter,
                                      fallback_iter=fallback_iter, seed=seed, next_value=self.next_value,
                                      cold_value=self.cold_value,
                                      **lanczos_kw)
            info["track_products"] = tracked.num_products
            info["tracked"] = tracked.accepted
            result = tracked.result
        if cold_due or tracked is None:
            cold = cold_solve(op, which=which, tol=tol, max_iter=fallback_iter, seed=seed, **lanczos_kw)
            info["cold_products"] = int(cold.num_products)
            if tracked is not None:
                gap, bad = disagree(tracked.eigenvalue, float(cold.eigenvalues[0]), tol)
                info["track_gap"], info["track_disagree"] = gap, bad
                self.disagreements += int(bad)
            self.cold_value = float(cold.eigenvalues[0])
            self.next_value = float(cold.eigenvalues[1]) if len(cold.eigenvalues) > 1 and bool(
                cold.converged[1]) else math.nan
            result = cold
            info["tracked"] = False
        self.count += 1
        self.vectors = result.warm_start()[:2].detach().clone()
        return result, info

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "vectors": self.vectors, "next_value": self.next_value,
                "cold_value": self.cold_value,
                "disagreements": self.disagreements}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.count = int(state.get("count", 0))
        self.vectors = state.get("vectors")
        self.next_value = float(state.get("next_value", math.nan))
        self.cold_value = float(state.get("cold_value", math.nan))
        self.disagreements = int(state.get("disagreements", 0))
