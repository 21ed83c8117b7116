"""Anomalous diffusion, the seed's quantities: ĝ_epoch and ‖g_B − ĝ_epoch‖, MSD without time
averaging, MSL against contour length, linear roughness bins, the two-point local exponent."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lscape.plugins.diffusion import (
    ensemble_msd,
    epoch_gradient_noise,
    local_exponent,
    msd_from,
    roughness,
    two_point_exponent,
)
from lscape.store import RunReader

DIM = 5
N = 32


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM))

    def forward(self, x):
        return x @ self.w


def linear_model(**_):
    return Linear()


def small_data(**_):
    x = torch.randn(N, DIM, generator=torch.Generator().manual_seed(0))
    return {"train": TensorDataset(x, torch.zeros(N)), "eval": TensorDataset(x[:8], torch.zeros(8))}


def mean_output(output, target):
    return output.mean()  # the minibatch gradient is the batch mean of x, whatever w is


def test_msd_without_time_averaging_and_its_ensemble_over_waiting_times():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.standard_normal((4000, 3)), axis=0)
    d = msd_from(x[100:200], 20)
    np.testing.assert_allclose(d, ((x[100:121] - x[100]) ** 2).sum(axis=1), rtol=1e-12)
    starts = np.arange(0, 3900, 50)
    ens = ensemble_msd(x, starts, 40)
    ref = np.mean([((x[t:t + 41] - x[t]) ** 2).sum(axis=1) for t in starts], axis=0)
    np.testing.assert_allclose(ens, ref, rtol=1e-12)
    # Brownian motion in 3-D: E‖x(t_w + τ) − x(t_w)‖² = 3τ
    assert np.polyfit(np.arange(1, 41), ens[1:], 1)[0] == pytest.approx(3.0, rel=0.15)


def test_two_point_exponent_is_the_slope_between_lags_span_apart():
    """plot_fig2.m's slope between τ_i and τ_{i+span} (span=20: lags 20 apart, not 19)."""
    tau = np.arange(0, 200, dtype=float)
    m = 2.0 * tau**1.37
    centres, beta = two_point_exponent(m, span=20)
    assert len(beta) == 199 - 20  # lags 1..199 (τ=0 has no logarithm), pairs 20 apart
    np.testing.assert_allclose(beta, 1.37, rtol=1e-12)
    np.testing.assert_allclose(centres, np.sqrt(tau[1:len(beta) + 1] * tau[21:21 + len(beta)]), rtol=1e-12)
    # on a curved MSD it differs from the least-squares slope of the same span
    curved = tau + tau**2 / 50
    b_fit = local_exponent(curved, 20)[1]
    b_two = two_point_exponent(curved, 20)[1]
    i = 5
    ln_t, ln_m = np.log(tau[[i + 1, i + 21]]), np.log(curved[[i + 1, i + 21]])
    assert b_two[i] == pytest.approx((ln_m[-1] - ln_m[0]) / (ln_t[-1] - ln_t[0]), rel=1e-12)
    assert abs(b_two[i] - b_fit[i]) > 1e-4


def _brute(dist, dl2, edges):
    k = np.searchsorted(edges, dist, side="right") - 1
    ok = (k >= 0) & (k < len(edges) - 1)
    counts = np.bincount(k[ok], minlength=len(edges) - 1)
    sums = np.bincount(k[ok], weights=dl2[ok], minlength=len(edges) - 1)
    return counts, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def test_linear_bins_and_the_contour_length_distance_match_brute_force():
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.standard_normal((60, 2)), axis=0)
    loss = rng.standard_normal(60)
    i, j = np.triu_indices(60, 1)
    chord = np.linalg.norm(x[j] - x[i], axis=1)
    walked = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(x, axis=0), axis=1))])
    contour = walked[j] - walked[i]
    dl2 = (loss[j] - loss[i]) ** 2
    r = roughness(x, loss, bins=12, min_count=1, spacing="linear")
    # the seed's linear bins run from the smallest distance to the largest, not from 0
    edges = np.linspace(chord.min(), chord.max() * (1 + 1e-12), 13)
    np.testing.assert_allclose(r.edges, edges)
    counts, msl = _brute(chord, dl2, edges)
    np.testing.assert_array_equal(r.counts, counts)
    np.testing.assert_allclose(r.msl, msl, rtol=1e-10)
    np.testing.assert_allclose(r.centers, 0.5 * (edges[:-1] + edges[1:]))
    c = roughness(x, loss, bins=12, min_count=1, distance="contour")
    edges = np.geomspace(contour.min(), contour.max() * (1 + 1e-12), 13)
    counts, msl = _brute(contour, dl2, edges)
    np.testing.assert_array_equal(c.counts, counts)
    np.testing.assert_allclose(c.msl, msl, rtol=1e-10)
    # a loss linear along a straight path: ⟨ΔL²⟩ = a²Δr², exponent 2 with either binning or distance
    t = np.arange(200.0)
    line = np.stack([t, 0.5 * t], axis=1)
    for kw in ({}, {"spacing": "linear"}, {"distance": "contour"}):
        assert roughness(line, 0.3 * t, bins=20, **kw).exponent == pytest.approx(2.0, abs=0.05)  # bin averaging


def test_epoch_gradient_noise_by_brute_force():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((10, 4))
    e = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    ids, g_epoch, noise = epoch_gradient_noise(g, e)
    assert list(ids) == [0, 1, 2]
    for k in range(3):
        np.testing.assert_allclose(g_epoch[k], g[e == k].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(noise, np.linalg.norm(g - g_epoch[e], axis=1), rtol=1e-12)


def test_epoch_gradient_online_and_offline_is_the_data_mean(cli, tmp_path):
    # batches drawn without replacement cover the data once per epoch, so the epoch-mean of the
    # batch gradients (batch means of x) is exactly the mean of x
    out = tmp_path / "g.zarr"
    code, _, err = cli("run", "--model", "test_seeds_diffusion:linear_model", "--data", "test_seeds_diffusion:small_data",
                       "--loss", "test_seeds_diffusion:mean_output", "--batch-size", "4", "--lr", "0.01",
                       "--epochs", "3", "--eval-schedule", "at:0", "--no-progress", "--disable", "progress",
                       "--plugin", "trajectory", "-o", "trajectory.gradient=true", "--plugin", "diffusion",
                       "-o", "diffusion.window=8", "--workers", "0", "--out", str(out))
    assert code == 0, err
    x = small_data()["train"].tensors[0].double().numpy()
    run = RunReader(out)
    ep = run.read("diffusion/epoch")
    assert list(ep["epoch"]) == [0, 1, 2] and list(ep["steps_used"]) == [8, 8, 8]
    for row in ep["grad_epoch"]:
        np.testing.assert_allclose(row, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    traj = run.read("trajectory")
    noise = run.read("diffusion/grad_noise")
    assert list(noise["step"]) == list(traj["step"])
    np.testing.assert_allclose(noise["noise_norm"], np.linalg.norm(traj["grad"] - x.mean(axis=0), axis=1),
                               rtol=1e-4, atol=1e-6)
    assert np.isfinite(run.read("diffusion")["msd_tw"]).all()
    # offline: the same numbers from the stored trajectory and the train group's epochs
    code, _, err = cli("diffusion", str(out), "--window", "8", "--overwrite", "--roughness-bins", "linear",
                       "--beta-method", "two_point")
    assert code == 0, err
    again = RunReader(out).read("diffusion/epoch")
    np.testing.assert_allclose(again["grad_epoch"], ep["grad_epoch"], rtol=1e-12)
    assert list(again["step"]) == list(ep["step"])


def test_online_diffusion_rows_are_exact_after_a_resume_from_an_earlier_checkpoint(cli, tmp_path):
    import zarr

    args = ["--model", "test_seeds_diffusion:linear_model", "--data", "test_seeds_diffusion:small_data",
            "--loss", "test_seeds_diffusion:mean_output", "--batch-size", "4", "--lr", "0.01", "--eval-schedule", "at:0",
            "--no-progress", "--disable", "progress", "--plugin", "trajectory", "-o", "trajectory.gradient=true",
            "--plugin", "diffusion", "-o", "diffusion.window=6", "--workers", "0", "--checkpoint-schedule", "every:7"]
    whole, cut = tmp_path / "whole.zarr", tmp_path / "cut.zarr"
    assert cli("run", *args, "--steps", "24", "--out", str(whole))[0] == 0
    assert cli("run", *args, "--steps", "24", "--out", str(cut))[0] == 0
    # forget the checkpoints after step 14: the rows written after it (windows keyed by their
    # start, epochs by their last step, all earlier than 14) must not survive the resume twice
    root = zarr.open_group(str(cut), mode="r+")
    names = sorted(root["checkpoints"].array_keys())
    keep = [n for n in names if int(n.rsplit("_", 1)[1]) <= 14]
    for n in names:
        if n not in keep:
            del root["checkpoints"][n]
    root["checkpoints"].attrs["latest"] = keep[-1]
    code, _, err = cli("run", "--resume", str(cut), "--no-progress", "--trust-store")
    assert code == 0, err
    a, b = RunReader(whole), RunReader(cut)
    for group in ("diffusion", "diffusion/epoch", "diffusion/grad_noise"):
        da, db = a.read(group), b.read(group)
        assert sorted(da) == sorted(db), group
        for key in da:
            np.testing.assert_array_equal(da[key], db[key], err_msg=f"{group}/{key}")
    assert len(a.read("diffusion/epoch")["step"]) == 3
