"""The grad-noise and grad-stats probes through the real command line."""

import numpy as np
import pytest

from lscape.store import RunReader

REGRESSION = ("--data", "synthetic", "--data-opt", "task=regression", "--data-opt", "n=100", "--data-opt", "dim=5",
              "--data-opt", "noise=0.5", "--model", "mlp", "--model-opt", "widths=", "--loss", "mse",
              "--batch-size", "8", "--no-progress")


def test_linear_regression_minibatch_noise_matches_closed_form(cli, tmp_path):
    """E‖g_B − g‖² = (tr Σ/B)·(n − B)/(n − 1) for batches drawn without replacement.

    A linear model (mlp without hidden layers) on synthetic regression, a learning rate so
    small that θ does not move, ĝ over the full training set (so ĝ = g), 30 measurements of
    10 fresh batches each. tr Σ is the population covariance; grad-stats on the full set
    gives the unbiased one, tr Σ·n/(n − 1), whence E = trace_cov·(n − B)/(n·B).
    """
    out = tmp_path / "lr.zarr"
    code, _, err = cli("run", *REGRESSION, "--steps", "30", "--lr", "1e-12",
                       "--plugin", "grad-noise", "-o", "grad-noise.every=1", "-o", "grad-noise.full_grad=true",
                       "-o", "grad-noise.noise_size=10", "-o", "grad-noise.dir_pairs=0",
                       "-o", "grad-noise.sharpness_batches=1",
                       "--plugin", "grad-stats", "-o", "grad-stats.data=full", "-o", "grad-stats.schedule=at:0",
                       "--out", out)
    assert code == 0, err
    run = RunReader(out)
    noise, stats = run.read("grad-noise"), run.read("grad-stats")
    n, B = int(stats["num_samples"][0]), 8
    assert n == 80 and len(noise["step"]) == 30
    expected = float(stats["trace_cov"][0]) * (n - B) / (n * B)
    mean = noise["noise_sq"].mean()
    stderr = noise["noise_sq"].std(ddof=1) / np.sqrt(len(noise["noise_sq"]))
    assert abs(mean - expected) < 4 * stderr, (mean, expected, stderr)
    assert stderr < 0.1 * expected  # the check has teeth
    # ĝ over the full set is g itself, the same vector grad-stats averaged
    assert noise["grad_sq"][0] == pytest.approx(float(stats["grad_sq"][0]), rel=1e-5)
    # linear model, squared loss: the Hessian is constant, so θ barely moving shows up exactly
    assert np.all(noise["change_in_grad_sq"] < 1e-12)
    assert np.all(noise["sharpness"] > 0)

    pytest.importorskip("matplotlib")
    code, stdout, _ = cli("plot", out, "--out", tmp_path / "figs")
    assert code == 0 and (tmp_path / "figs" / "grad_noise.png").is_file()
    assert (tmp_path / "figs" / "grad_stats.png").is_file()


def test_probes_leave_training_unchanged(cli, tmp_path):
    """Training with both probes (compat=original included) gives the same losses as without."""
    small = ("--data", "digits", "--model", "mlp", "--model-opt", "widths=16", "--batch-size", "32",
             "--steps", "4", "--no-progress")
    assert cli("run", *small, "--out", tmp_path / "a.zarr")[0] == 0
    code, _, err = cli("run", *small, "--plugin", "grad-noise", "-o", "grad-noise.every=2",
                       "-o", "grad-noise.compat=original", "-o", "grad-noise.noise_size=2",
                       "-o", "grad-noise.sharpness_batches=2", "-o", "grad-noise.smooth=3",
                       "--plugin", "grad-stats", "-o", "grad-stats.every=3", "-o", "grad-stats.nonuniformity=true",
                       "-o", "grad-stats.nu_iters=5", "--out", tmp_path / "b.zarr")
    assert code == 0, err
    a, b = RunReader(tmp_path / "a.zarr").read("train"), RunReader(tmp_path / "b.zarr").read("train")
    np.testing.assert_array_equal(a["loss"], b["loss"])
    run = RunReader(tmp_path / "b.zarr")
    noise, stats = run.read("grad-noise"), run.read("grad-stats")
    assert list(noise["step"]) == [0, 2] and list(stats["step"]) == [0, 3]
    assert np.isfinite(noise["change_in_grad_sq"]).all() and np.isfinite(noise["sharpness"]).all()
    assert stats["gsnr_param"].shape == (2, 4)
    assert run.group_attrs("grad-stats")["param_names"] == ["net.1.weight", "net.1.bias", "net.3.weight",
                                                            "net.3.bias"]
    assert np.isfinite(stats["nonuniformity_margin"]).all()


def test_bad_option_is_one_line(cli, tmp_path):
    code, _, err = cli("run", "--steps", "1", "--plugin", "grad-noise", "-o", "grad-noise.compat=maybe",
                       "--out", tmp_path / "x.zarr")
    assert code == 2 and "grad-noise.compat" in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()
