"""Curvature round two, defects 2, 3 and 5: clusters and multiplicities, which=LA|LM|SA on a
saddle, the documented stopping rule and honest residuals, warm-started tracking of a near-tie."""

from __future__ import annotations

import warnings

import pytest
import torch

from lscape.curvature import lanczos


class Matrix:
    """A symmetric matrix as an operator, counting products."""

    def __init__(self, a: torch.Tensor):
        self.a, self.dim, self.dtype, self.device, self.num_products = a, a.shape[0], a.dtype, a.device, 0

    def matvec(self, v):
        self.num_products += 1
        return self.a @ v


def quadratic(eigenvalues, dim=200, seed=0, dtype=torch.float64):
    """A random orthogonal basis with the given top eigenvalues and a bulk in [-1, 2]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    top = torch.tensor(eigenvalues, dtype=torch.float64)
    bulk = torch.rand(dim - len(top), generator=g, dtype=torch.float64) * 3 - 1
    ev = torch.cat([top, bulk])
    return (q @ torch.diag(ev) @ q.T).to(dtype), ev, q


# A 5-fold eigenvalue at the top and a near-tie 1e-4 apart below it.
CLUSTER = [10.0] * 5 + [7.0001, 7.0, 5.0]


@pytest.mark.parametrize("k,seed", [(6, 0), (8, 1), (7, 2)])
def test_top_k_finds_every_copy_of_a_multiple_eigenvalue_and_both_members_of_a_near_tie(k, seed):
    a, ev, _ = quadratic(CLUSTER, seed=seed)
    result = lanczos(Matrix(a), k=k, tol=1e-8, seed=seed)
    expected = torch.sort(ev, descending=True).values[:k]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-9, atol=1e-9)
    assert result.all_converged and result.verified
    # the residuals are those of the returned vectors
    true = (a @ result.eigenvectors.T - result.eigenvectors.T * result.eigenvalues).norm(dim=0)
    torch.testing.assert_close(result.residuals, true, rtol=1e-3, atol=1e-12)


def test_without_verification_residuals_alone_miss_copies_of_a_multiple_eigenvalue():
    """What defect 2 was: every Ritz pair has a tiny residual, yet eigenvalues are missing."""
    a, ev, _ = quadratic(CLUSTER, seed=0)
    blind = lanczos(Matrix(a), k=6, tol=1e-8, verify=0)
    assert (blind.residuals < 1e-7).all()
    assert float(blind.eigenvalues[-1]) < 9.0  # a copy of 10 was skipped


def test_warm_started_tracking_keeps_the_top_of_a_near_tie_that_swapped():
    """Issue 15: λ₁, λ₂ 3e-3 apart swap between measurements; the warm start (the previous v₁
    and the spare Ritz vectors, plus a fresh direction) must return the new λ₁."""
    dim = 200
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    bulk = torch.rand(dim - 2, generator=g, dtype=torch.float64) * 0.5
    before = q @ torch.diag(torch.cat([torch.tensor([0.79115, 0.78874]).double(), bulk])) @ q.T
    after = q @ torch.diag(torch.cat([torch.tensor([0.78874, 0.79115]).double(), bulk])) @ q.T
    first = lanczos(Matrix(before), k=1, tol=1e-4)
    assert float(first.eigenvalues[0]) == pytest.approx(0.79115, rel=1e-6)
    tracked = lanczos(Matrix(after), k=1, tol=1e-4, v0=first.warm_start())
    assert float(tracked.eigenvalues[0]) == pytest.approx(0.79115, rel=1e-6)
    assert tracked.all_converged
    # the previous top vector alone (no spares): the fresh direction and the check must still find it
    alone = lanczos(Matrix(after), k=1, tol=1e-4, v0=first.eigenvectors, verify=12)
    assert float(alone.eigenvalues[0]) == pytest.approx(0.79115, rel=1e-4)


def test_which_selects_the_end_of_a_saddle_spectrum_and_the_stopping_rule_is_per_eigenvalue():
    a, ev, _ = quadratic([3.0, 2.5], dim=150, seed=3)
    # large negative curvature on two more directions: a saddle
    g = torch.Generator().manual_seed(9)
    u = torch.linalg.qr(torch.randn(150, 2, generator=g, dtype=torch.float64))[0]
    a = a - u @ torch.diag(torch.tensor([9.0, 6.0]).double()) @ u.T
    exact = torch.linalg.eigvalsh(a)
    for which, expected in (("LA", exact[-1]), ("SA", exact[0]), ("LM", exact[exact.abs().argmax()])):
        for tol in (1e-3, 1e-6):
            r = lanczos(Matrix(a), k=1, which=which, tol=tol)
            value, res = float(r.eigenvalues[0]), float(r.residuals[0])
            assert r.all_converged
            assert res <= tol * abs(value)  # the documented rule: residual ≤ tol·|λ|
            assert abs(value - float(expected)) <= tol * abs(float(expected))
    assert float(exact[0]) < -abs(float(exact[-1]))  # a saddle where LM ≠ LA
    assert float(lanczos(Matrix(a), k=1, which="LM", tol=1e-6).eigenvalues[0]) < 0


def test_a_tolerance_below_the_dtype_is_refused_honestly():
    """Defect 5: in float32 a residual below ~eps·‖H‖ is rounding, so such pairs are unconverged."""
    a, ev, _ = quadratic([4.0, 3.0, 2.5], dim=120, seed=5, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = lanczos(Matrix(a), k=2, tol=1e-8, max_iter=120)
    assert any("below what float32" in str(w.message) for w in caught)
    assert not r.converged.any()
    true = (a.double() @ r.eigenvectors.double().T - r.eigenvectors.double().T * r.eigenvalues).norm(dim=0)
    # the reported residuals are the true residuals of the returned float32 pairs, not a recurrence's
    torch.testing.assert_close(r.residuals, true, rtol=0.5, atol=1e-6)
    ok = lanczos(Matrix(a), k=2, tol=1e-4)
    assert ok.all_converged and (ok.eigenvalues - torch.tensor([4.0, 3.0]).double()).abs().max() < 1e-4 * 4
