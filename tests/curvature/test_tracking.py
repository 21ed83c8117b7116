"""Issue 20 item 5: warm-started λ tracking (lscape.curvature.tracking) against dense Hessians
of a small float64 model and against cold Lanczos; a followed-the-wrong-eigenvalue case is
caught by the cold verify and recorded as a disagreement."""

from __future__ import annotations

import math

import pytest
import torch

from lscape.curvature import HessianOperator, dense_hessian, lanczos
from lscape.curvature.tracking import Tracker, cold_solve, disagree, kato_temple, relative_gap, track_eigenpair
from test_preconditioned import data as _data
from test_preconditioned import mlp, mse  # the same small float64 tanh MLP and data


def data(seed=1, n=32):
    return _data(seed, n)



class Dense:
    """A symmetric matrix as an operator that counts its products."""

    def __init__(self, A):
        self.A, self.dim, self.dtype, self.device, self.products = A, A.shape[0], A.dtype, A.device, 0

    def matvec(self, v):
        self.products += 1
        return self.A @ v


def sgd_steps(model, batch, steps, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = batch
    for _ in range(steps):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()


def test_track_from_the_previous_eigenvector_matches_the_dense_hessian():
    model, batch = mlp(), data()
    H0 = dense_hessian(model, mse, [batch])
    w0, V0 = torch.linalg.eigh(H0)
    sgd_steps(model, batch, 3)
    H1 = dense_hessian(model, mse, [batch])
    w1 = torch.linalg.eigvalsh(H1)
    op = HessianOperator(model, mse, [batch])
    out = track_eigenpair(op, torch.stack([V0[:, -1], V0[:, -2]]), tol=1e-6, max_iter=20,
                          next_value=float(w1[-2]))
    assert out.accepted
    assert abs(out.eigenvalue - float(w1[-1])) <= 1e-6 * abs(float(w1[-1]))
    assert float(out.result.residuals[0]) == pytest.approx(
        float((H1 @ out.result.eigenvectors[0] - out.eigenvalue * out.result.eigenvectors[0]).norm()), rel=1e-6, abs=1e-12)
    cold = lanczos(HessianOperator(model, mse, [batch]), k=1, tol=1e-6, seed=3)
    assert out.num_products < cold.num_products  # the point of tracking


def test_an_unmoved_eigenvector_costs_one_product():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    w = torch.linspace(-1.0, 5.0, 30, dtype=torch.float64)
    op = Dense(Q @ torch.diag(w) @ Q.T)
    out = track_eigenpair(op, Q[:, -1], tol=1e-8, next_value=float(w[-2]))
    assert out.accepted and out.num_products == op.products == 1
    assert out.eigenvalue == pytest.approx(5.0, rel=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_fallback_when_not_accepted_is_a_full_solve(which):
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    w = torch.linspace(-6.0, 4.0, 40, dtype=torch.float64)
    op = Dense(Q @ torch.diag(w) @ Q.T)
    start = torch.randn(40, generator=g, dtype=torch.float64)  # no warm information
    out = track_eigenpair(op, start, which=which, tol=1e-6, max_iter=2, next_value=math.nan)
    assert not out.accepted and out.track_products == 2 and out.fallback_products > 0
    expected = {"LA": 4.0, "SA": -6.0, "LM": -6.0}[which]
    assert out.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert op.products == out.num_products


def test_kato_temple_bound_and_disagree():
    assert kato_temple(0.1, 5.0, 4.0, "LA") == pytest.approx(0.01 / 1.0)
    assert kato_temple(0.1, -5.0, -4.0, "SA") == pytest.approx(0.01 / 1.0)
    assert kato_temple(0.1, -5.0, 4.5, "LM") == pytest.approx(0.01 / 0.5)
    assert kato_temple(0.1, 5.0, 4.0, "LA", moved=0.6) == pytest.approx(0.01 / 0.4)  # λ₂ may have come closer
    assert kato_temple(0.1, 5.0, 4.0, "LA", moved=1.2) == math.inf
    assert kato_temple(0.1, 4.0, 5.0, "LA") == math.inf  # θ is not beyond λ₂: no gap
    assert kato_temple(0.1, 5.0, math.nan) == math.inf
    assert relative_gap(2.0, 2.002) == pytest.approx(0.002 / 2.002)
    assert disagree(2.0, 2.005, tol=1e-3) == (pytest.approx(0.005 / 2.005), True)
    assert disagree(2.0, 2.0039, tol=1e-3)[1] is False  # 1.95e-3 ≤ 2·tol: the same eigenvalue
    assert disagree(2.0, 2.0039, tol=1e-4)[1] is True


def test_tracker_over_a_training_run_agrees_with_dense_and_cold():
    """Tracked every 3 SGD steps: each value within tol of the dense λ_max, fewer products
    than cold Lanczos on average, no disagreement with the cold verifies."""
    model, batch = mlp(seed=2), data(seed=4)
    tracker = Tracker(verify_every=4, max_iter=12)
    tol = 1e-4
    tracked_products, cold_products, rows = [], [], []
    for k in range(12):
        op = HessianOperator(model, mse, [batch])
        result, info = tracker.measure(op, tol=tol, fallback_iter=100, seed=k)
        exact = float(torch.linalg.eigvalsh(dense_hessian(model, mse, [batch]))[-1])
        assert abs(float(result.eigenvalues[0]) - exact) <= tol * abs(exact)
        rows.append(info)
        if info["cold_products"] == 0:
            tracked_products.append(info["track_products"])
        cold_products.append(lanczos(HessianOperator(model, mse, [batch]), k=1, tol=tol, seed=100 + k).num_products)
        sgd_steps(model, batch, 3)
    assert [r["cold_products"] > 0 for r in rows] == [k % 4 == 0 for k in range(12)]
    assert all(math.isnan(r["track_gap"]) for r in rows[1:] if r["cold_products"] == 0)
    assert all(r["track_gap"] <= 2 * tol for r in rows[4::4])
    assert tracker.disagreements == 0
    assert sum(tracked_products) / len(tracked_products) < sum(cold_products) / len(cold_products)


def test_a_tracked_pair_that_follows_an_overtaken_eigenvalue_is_a_disagreement():
    """The tracked eigenvector stays an exact eigenvector while another eigenvalue rises above
    it: the residual test cannot see that; the cold verify does, and the cold value wins."""
    n = 12
    A = torch.diag(torch.linspace(0.0, 2.0, n, dtype=torch.float64))  # λ_max 2 on e_{n-1}
    tracker = Tracker(verify_every=2, max_iter=8)
    tracker.measure(Dense(A), tol=1e-6, seed=0)  # cold: tracks e_{n-1} from here
    B = A.clone()
    B[0, 0] = 3.0  # e_0 overtakes, e_{n-1} still an eigenvector (λ = 2)
    result, info = tracker.measure(Dense(B), tol=1e-6, seed=1)  # tracked only
    assert info["tracked"] and float(result.eigenvalues[0]) == pytest.approx(2.0)  # the blind spot
    result, info = tracker.measure(Dense(B), tol=1e-6, seed=2)  # cold verify
    assert info["track_disagree"] and info["track_gap"] == pytest.approx(1 / 3, rel=1e-5)
    assert float(result.eigenvalues[0]) == pytest.approx(3.0) and tracker.disagreements == 1
    op = Dense(B)
    result, info = tracker.measure(op, tol=1e-6, seed=3)  # tracking goes on from the cold vectors
    assert info["tracked"] and float(result.eigenvalues[0]) == pytest.approx(3.0)
    assert op.products == info["track_products"] + info["cold_products"]  # every product is counted
    op = Dense(B)
    tracker.verify_every = 1
    result, info = tracker.measure(op, tol=1e-6, seed=4)  # tracked and cold
    assert info["cold_products"] > 0 and op.products == info["track_products"] + info["cold_products"]


def test_tracker_state_round_trip():
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    op = Dense(Q @ torch.diag(torch.linspace(0.0, 3.0, 20, dtype=torch.float64)) @ Q.T)
    a = Tracker(verify_every=3)
    for k in range(2):
        a.measure(op, tol=1e-6, seed=k)
    b = Tracker(verify_every=3)
    b.load_state_dict(a.state_dict())
    ra, ia = a.measure(op, tol=1e-6, seed=7)
    rb, ib = b.measure(op, tol=1e-6, seed=7)
    assert ia == ib or all((ia[k] == ib[k]) or (math.isnan(ia[k]) and math.isnan(ib[k])) for k in ia)
    assert torch.equal(ra.eigenvalues, rb.eigenvalues)


def test_cold_solve_gives_the_next_eigenvalue():
    A = torch.diag(torch.tensor([1.0, 2.0, 2.5, 4.0], dtype=torch.float64))
    res = cold_solve(Dense(A), tol=1e-8)
    assert res.eigenvalues.tolist() == pytest.approx([4.0, 2.5])
