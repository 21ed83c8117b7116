"""The `eos` probe through the engine: GD sits at 2/η, SAM at the SAM-edge (Long & Bartlett 2023)."""

import numpy as np
import pytest

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

# A tiny full-batch regression problem on which progressive sharpening and the edge of
# stability appear within a few dozen steps (a few seconds on one CPU core).
WORKLOAD = dict(
    model="mlp",
    model_opts={"widths": "32,32", "activation": "tanh"},
    data="synthetic",
    data_opts={"task": "regression", "n": 128, "dim": 8, "outputs": 2, "noise": 0.0},
    loss="mse",
    batch_size="full",
    progress=False,
    eval_schedule="never",
    checkpoint_schedule="never",
)


def _run(tmp_path, name, **kw):
    result = lscape.run(out=str(tmp_path / f"{name}.zarr"), **WORKLOAD, **kw)
    assert result.status == "completed"
    return RunReader(result.path)


def test_gradient_descent_rises_to_and_stays_at_two_over_lr(tmp_path):
    d = _run(tmp_path, "gd", lr=0.5, steps=160, plugins=["eos"], plugin_options={"eos": {"every": 10}}).read("eos")
    lam, threshold = d["lambda_max"], d["threshold_gd"]
    assert np.all(threshold == 4.0) and np.all(d["sam_edge"] == 4.0)  # no SAM: SAM-edge is 2/η
    assert lam[0] < 0.7 * 4.0  # starts well below the edge
    late = d["step"] >= 60
    assert late.sum() >= 8
    assert np.all(np.abs(lam[late] / 4.0 - 1) < 0.1), lam[late]
    assert abs(lam[late].mean() / 4.0 - 1) < 0.05


def test_sam_tracks_the_sam_edge_well_below_two_over_lr(tmp_path):
    d = _run(tmp_path, "sam", lr=0.25, steps=200, plugins=["sam", "eos"],
             plugin_options={"eos": {"every": 10}, "sam": {"rho": 0.05}}).read("eos")
    lam, edge = d["lambda_max"], d["sam_edge"]
    late = d["step"] >= 60
    assert np.all(np.abs(lam[late] / edge[late] - 1) < 0.1), (lam[late], edge[late])
    assert np.all(lam[late] < 0.6 * d["threshold_gd"][late])
    # the SAM gradient is computed at θ + ρg/‖g‖, so it differs from the gradient
    assert not np.allclose(d["grad_alignment"], d["sam_grad_alignment"])
    assert np.all((d["grad_alignment"] >= 0) & (d["grad_alignment"] <= 1 + 1e-9))


def test_eos_records_top_k_time_and_makes_the_four_figures(tmp_path):
    from lscape.plugins.curvature.eos import plot_eos

    reader = _run(tmp_path, "k", lr=0.1, steps=6, plugins=["eos"], plugin_options={"eos": {"every": 2, "k": 3, "rho": 0.1}})
    d = reader.read("eos")
    assert list(d["step"]) == [0, 2, 4]
    assert d["top_eigenvalues"].shape == (3, 3)
    assert np.all(np.diff(d["top_eigenvalues"], axis=1) <= 1e-9)
    np.testing.assert_allclose(d["lambda_max"], d["top_eigenvalues"][:, 0])
    assert np.all(np.diff(d["time"]) > 0)
    # an explicit rho gives the SAM-edge below 2/η even without the sam plugin
    assert np.all(d["sam_edge"] < d["threshold_gd"])
    paths = plot_eos([reader], tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["eos_alignment.png", "eos_eigenvalues.png",
                                             "eos_eigenvalues_sam_edge.png", "eos_eigenvalues_time.png",
                                             "eos_loss.png", "eos_loss_time.png"]
    # ‖H‖ beside λ_max: the largest |λ| is never below the largest algebraic λ
    assert np.all(d["hessian_norm"] >= d["lambda_max"] * (1 - 1e-3))
    assert all(p.stat().st_size > 0 for p in paths)


def test_eos_rejects_a_bad_k(tmp_path):
    with pytest.raises(UsageError, match="eos.k"):
        lscape.run(out=str(tmp_path / "bad.zarr"), **WORKLOAD, lr=0.1, steps=2, plugins=["eos"],
                   plugin_options={"eos": {"k": 0}})
