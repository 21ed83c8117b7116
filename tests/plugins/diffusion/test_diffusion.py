"""MSD, anomalous exponents, roughness and excursions on simulated processes with known exponents."""

import numpy as np
import pytest
import torch

from lscape.plugins.diffusion import (
    RandomProjection,
    contour_length,
    fit_broken_power_law,
    fit_power_law,
    local_exponent,
    log_lags,
    msd,
    roughness,
    transverse_excursion,
    windowed_msd,
)


def fbm(n, dims, hurst, rng):
    """Exact fractional Brownian motion (Davies–Harte circulant embedding), shape (n + 1, dims)."""
    k = np.arange(n + 1, dtype=float)
    gamma = 0.5 * (np.abs(k + 1) ** (2 * hurst) - 2 * k ** (2 * hurst) + np.abs(k - 1) ** (2 * hurst))
    circ = np.concatenate([gamma, gamma[-2:0:-1]])  # length 2n
    lam = np.fft.fft(circ).real
    assert lam.min() > -1e-9  # the embedding is valid for every H in (0, 1)
    lam = np.maximum(lam, 0)
    w = rng.standard_normal((2 * n, dims)) + 1j * rng.standard_normal((2 * n, dims))
    fgn = np.fft.fft(np.sqrt(lam / (2 * n))[:, None] * w, axis=0).real[:n]
    return np.vstack([np.zeros((1, dims)), np.cumsum(fgn, axis=0)])


def exponent(x, max_lag):
    lags = log_lags(max_lag, 30)
    return fit_power_law(lags, msd(x, max_lag)[lags])[0]


def test_msd_matches_brute_force_over_all_pairs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300)).cumsum(0)  # more columns than one FFT block
    m = msd(x)
    for tau in (1, 7, 150, 299):
        ref = np.mean(np.sum((x[tau:] - x[:-tau]) ** 2, axis=1))
        assert m[tau] == pytest.approx(ref, rel=1e-9)
    assert m[0] == 0


def test_brownian_motion_has_exponent_one():
    x = np.random.default_rng(1).standard_normal((4000, 20)).cumsum(0)
    assert exponent(x, 200) == pytest.approx(1.0, abs=0.05)


def test_ballistic_motion_has_exponent_two():
    rng = np.random.default_rng(2)
    t = np.arange(2000)[:, None]
    x = t * rng.standard_normal((1, 10)) + 1e-3 * rng.standard_normal((2000, 10))
    assert exponent(x, 200) == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_fractional_brownian_motion_has_exponent_two_h(hurst):
    x = fbm(4096, 16, hurst, np.random.default_rng(3))
    assert exponent(x, 100) == pytest.approx(2 * hurst, abs=0.05)


def test_windowed_msd_uses_each_window_alone():
    rng = np.random.default_rng(4)
    x = np.vstack([rng.standard_normal((500, 5)).cumsum(0), 10 * rng.standard_normal((500, 5)).cumsum(0)])
    tw, m = windowed_msd(x, window=500, max_lag=50)
    assert list(tw) == [0, 500]
    np.testing.assert_allclose(m[1], msd(x[500:], 50))
    assert m[1, 10] / m[0, 10] == pytest.approx(100, rel=0.3)


def test_local_exponent_is_the_sliding_log_log_slope():
    tau = np.arange(200.0)
    m = np.where(tau < 50, tau**1.4, 50**1.4 * (np.maximum(tau, 1) / 50) ** 0.7)
    centres, beta = local_exponent(m, span=20)
    assert beta[0] == pytest.approx(1.4, abs=1e-9)
    assert beta[-1] == pytest.approx(0.7, abs=1e-9)
    assert centres[0] == pytest.approx(np.exp(np.mean(np.log(np.arange(1, 21)))))


def test_broken_power_law_finds_the_crossover():
    lags = log_lags(2000, 50).astype(float)
    truth = np.where(lags < 120, 3 * lags**1.3, 3 * 120**1.3 * (lags / 120) ** 0.6)
    fit = fit_broken_power_law(lags, truth * np.exp(np.random.default_rng(5).normal(0, 0.01, len(lags))))
    assert fit.beta_short == pytest.approx(1.3, abs=0.03)
    assert fit.beta_long == pytest.approx(0.6, abs=0.03)
    assert fit.tau0 == pytest.approx(120, rel=0.15)
    assert fit(lags) == pytest.approx(truth, rel=0.05)


def test_ornstein_uhlenbeck_saturates_at_long_lags():
    rng = np.random.default_rng(6)
    x = np.zeros((20000, 4))
    for t in range(1, len(x)):
        x[t] = 0.9 * x[t - 1] + rng.standard_normal(4)
    m = msd(x, 1000)
    _, beta = local_exponent(m, span=20)
    assert beta[0] > 0.5 and abs(beta[-1]) < 0.05


def test_contour_length_of_ballistic_path_is_the_displacement():
    x = np.arange(100.0)[:, None] * np.array([[3.0, 4.0]])
    s = contour_length(x)
    np.testing.assert_allclose(s, 5 * np.arange(100))
    np.testing.assert_allclose(np.sqrt(msd(x)), s, rtol=1e-9, atol=1e-6)


def test_contour_length_matches_brute_force():
    x = np.random.default_rng(7).standard_normal((60, 3)).cumsum(0)
    step = np.linalg.norm(np.diff(x, axis=0), axis=1)
    for tau in (1, 5, 59):
        ref = np.mean([step[t : t + tau].sum() for t in range(60 - tau)])
        assert contour_length(x)[tau] == pytest.approx(ref)


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_roughness_exponent_of_fbm_loss_along_a_straight_path(hurst):
    # a straight path makes Δr ∝ |Δt|, so ⟨ΔL²⟩ ∝ Δr^{2H} for an fBm loss
    # (unit steps); the fit keeps Δr ≤ 20, where many pairs fill each bin, and averages
    # eight realisations because one fBm path has long-memory fluctuations of ±0.1
    n = 1000
    x = np.arange(n + 1.0)[:, None] * np.array([[0.6, 0.8]])
    rng = np.random.default_rng(3)
    fits = [roughness(x, fbm(n, 1, hurst, rng)[:, 0], bins=50, fit_range=(0, 20)) for _ in range(8)]
    assert fits[0].counts.sum() == (n + 1) * n // 2
    assert np.mean([r.exponent for r in fits]) == pytest.approx(2 * hurst, abs=0.05)
    assert np.mean([r.hurst for r in fits]) == pytest.approx(hurst, abs=0.025)


def test_roughness_bins_match_brute_force():
    rng = np.random.default_rng(9)
    x, loss = rng.standard_normal((80, 3)).cumsum(0), rng.standard_normal(80)
    r = roughness(x, loss, bins=10, min_count=1, block=7)
    i, j = np.triu_indices(80, 1)
    dr = np.linalg.norm(x[j] - x[i], axis=1)
    k = np.clip(np.searchsorted(r.edges, dr, side="right") - 1, 0, 9)
    for b in range(10):
        sel = k == b
        assert r.counts[b] == sel.sum()
        if sel.any():
            assert r.msl[b] == pytest.approx(np.mean((loss[j] - loss[i])[sel] ** 2))


def test_transverse_excursion_of_a_straight_path_is_zero_and_of_a_bent_one_known():
    line = np.arange(101.0)[:, None] * np.array([[1.0, 2.0, 2.0]])
    ex = transverse_excursion(line, fragment=50)
    np.testing.assert_allclose(ex["max"], 0, atol=1e-6)
    np.testing.assert_allclose(ex["chord"], 150)
    # an L-shaped fragment: 0→(10,0)→(10,10); chord along (1,1), corner at distance 10/√2
    bent = np.vstack([np.c_[np.arange(11.0), np.zeros(11)], np.c_[np.full(10, 10.0), np.arange(1, 11.0)]])
    ex = transverse_excursion(bent, fragment=20)
    assert ex["max"][0] == pytest.approx(10 / np.sqrt(2))


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_random_projection_preserves_msd_within_five_percent(kind):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((400, 20000)).astype(np.float32).cumsum(0)
    proj = RandomProjection(20000, 1024, seed=3, kind=kind, block=4096)
    y = np.concatenate([proj(torch.from_numpy(x[i : i + 100])).numpy() for i in range(0, 400, 100)])
    ref, got = msd(x, 100)[1:], msd(y, 100)[1:]
    assert np.max(np.abs(got / ref - 1)) < 0.05


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_random_projection_is_seeded_blockwise_and_linear(kind):
    n = 1000
    p = RandomProjection(n, 64, seed=7, kind=kind, block=300)
    q = RandomProjection(n, 64, seed=7, kind=kind, block=300, cache_bytes=0)  # regenerates blocks
    dense = torch.cat([p.matrix_block(b) for b in range(p.num_blocks)], dim=1)
    assert dense.shape == (64, n)
    v = torch.randn(3, n)
    torch.testing.assert_close(p(v), v @ dense.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q(v), p(v))
    torch.testing.assert_close(p(v[0]), p(v)[0])
    assert not torch.equal(RandomProjection(n, 64, seed=8, kind=kind, block=300)(v), p(v))
    # E‖Px‖² = ‖x‖²: columns have unit norm in expectation
    assert (dense**2).sum(0).mean().item() == pytest.approx(1.0, rel=0.1)
