"""Through the real CLI: SGD driven by pure zero-mean gradient noise diffuses normally (MSD ∝ τ¹)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lscape.store import RunReader

DIM = 64


class NoiseModel(nn.Module):
    """Output w·x: with L = mean output, the minibatch gradient is the batch mean of x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM))

    def forward(self, x):
        return x @ self.w


def noise_model(**_):
    return NoiseModel()


def noise_data(**_):
    """Standard normal inputs: a zero-mean noise gradient whose data mean is O(1/√n) small."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, DIM, generator=g)
    return {"train": TensorDataset(x, torch.zeros(len(x))), "eval": TensorDataset(x[:64], torch.zeros(64))}


def mean_output(output, target):
    return output.mean()


def test_sgd_on_pure_noise_gradient_has_msd_exponent_one(cli, tmp_path):
    out = tmp_path / "noise.zarr"
    code, stdout, stderr = cli(
        "run", "--model", "test_diffusion_cli:noise_model", "--data", "test_diffusion_cli:noise_data",
        "--loss", "test_diffusion_cli:mean_output", "--batch-size", "4", "--lr", "0.1", "--steps", "1000",
        "--eval-schedule", "at:0", "--checkpoint-schedule", "at:999", "--no-progress", "--disable", "progress",
        "--plugin", "trajectory", "--plugin", "diffusion", "-o", "diffusion.window=500", "-o", "diffusion.max_lag=50",
        "--out", str(out),
    )
    assert code == 0, stderr
    run = RunReader(out)
    traj = run.read("trajectory")
    assert traj["theta"].shape == (1000, DIM)
    np.testing.assert_allclose(np.nancumsum(traj["step_length"])[1:], traj["path_length"][1:], rtol=1e-4)
    online = run.read("diffusion")
    assert list(online["step"]) == [0, 500]
    assert np.mean(online["msd_exponent"]) == pytest.approx(1.0, abs=0.05)
    assert np.all(np.abs(online["beta"] - 1) < 0.25)

    # offline, through the command the plugin registers: the same numbers
    code, stdout, stderr = cli("diffusion", str(out), "--window", "500", "--max-lag", "50", "--overwrite")
    assert code == 0, stderr
    assert "2 window(s)" in stdout
    offline = RunReader(out).read("diffusion")
    np.testing.assert_allclose(offline["msd_exponent"], online["msd_exponent"])


def test_diffusion_without_trajectory_is_a_clear_error(cli, tmp_path):
    code, stdout, stderr = cli("diffusion", str(tmp_path / "missing.zarr"))
    assert code == 2 and "no run store" in stderr
