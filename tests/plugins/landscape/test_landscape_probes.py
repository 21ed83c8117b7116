"""The landscape, interpolate, eps-sharpness and trajectory probes through the real CLI and store."""

import numpy as np
import pytest
import zarr

from lscape.store import RunReader

SMALL = ["--data", "synthetic", "--data-opt", "n=128", "--data-opt", "dim=8", "--data-opt", "classes=3",
         "--model-opt", "widths=16", "--batch-size", "32", "--no-progress"]


def test_fill_surface_resumes_after_an_interruption_and_is_readable_while_filling(tmp_path):
    import torch
    from torch import nn

    from lscape.plugins.landscape import fill_surface, filter_normalized_direction, parse_range

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    dirs = [filter_normalized_direction(params, g) for _ in range(2)]
    data = {"train": [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]}
    alphas, betas = parse_range("-1:1:#6"), parse_range("-1:1:#5")
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w")
    fill_surface(ref, model, nn.functional.cross_entropy, data, params, dirs, alphas, betas)

    calls = {"n": 0}

    def flaky_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 13:  # dies in the third row
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, y)

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    before = [p.detach().clone() for p in params]
    with pytest.raises(KeyboardInterrupt):
        fill_surface(group, model, flaky_loss, data, params, dirs, alphas, betas)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # θ restored even so
    reader = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # what a reader sees meanwhile
    assert reader.attrs["rows_done"] == 2
    assert np.isfinite(reader["train_loss"][:2]).all() and np.isnan(reader["train_loss"][2:]).all()
    assert group["train_loss"].chunks == (1, 5)
    calls["n"] = -1000
    assert fill_surface(group, model, flaky_loss, data, params, dirs, alphas, betas) == 6
    assert calls["n"] == -1000 + 4 * 5  # only the four missing rows were evaluated
    np.testing.assert_allclose(group["train_loss"][:], ref["train_loss"][:], rtol=1e-12)


def test_landscape_surface_through_the_engine_resumes(cli, tmp_path):
    out = tmp_path / "run.zarr"
    args = ["run", *SMALL, "--steps", "6", "--checkpoint-schedule", "at:2", "--plugin", "landscape",
            "-o", "landscape.dims=2", "-o", "landscape.alpha=-1:1:#5", "-o", "landscape.beta=-1:1:#4",
            "-o", "landscape.schedule=at:4", "--out", str(out)]
    code, _, err = cli(*args)
    assert code == 0, err
    group = zarr.open_group(str(out), mode="r+")["landscape/surface_step000000004"]
    full = group["train_loss"][:]
    assert full.shape == (5, 4) and np.isfinite(full).all()
    assert set(group.array_keys()) >= {"alpha", "beta", "eval_loss", "train_accuracy"}
    # simulate an interruption after two rows, then resume the run from its checkpoint: a run
    # killed there has no final checkpoint yet, so the latest is the one at step 2
    group["train_loss"][2:] = np.nan
    group.attrs["rows_done"] = 2
    ckpts = zarr.open_group(str(out), mode="r+")["checkpoints"]
    first = sorted(ckpts.array_keys())[0]
    for name in sorted(ckpts.array_keys())[1:]:
        del ckpts[name]
    ckpts.attrs["latest"] = first
    code, _, err = cli("run", "--resume", str(out), "--no-progress")
    assert code == 0, err
    again = zarr.open_group(str(out), mode="r")["landscape/surface_step000000004"]
    assert again.attrs["rows_done"] == 5
    np.testing.assert_allclose(again["train_loss"][:], full, rtol=1e-6)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(out), group="landscape/surface_step000000004", consolidated=False)
    assert ds["train_loss"].dims == ("alpha", "beta") and list(ds["beta"].values) == pytest.approx([-1, -1 / 3, 1 / 3, 1])


def test_landscape_hessian_and_gradient_directions(cli, tmp_path):
    code, _, err = cli("run", *SMALL, "--steps", "3", "--plugin", "landscape", "-o", "landscape.direction=hessian",
                       "-o", "landscape.alpha=-0.5:0.5:#5", "-o", "landscape.schedule=at:2",
                       "--out", str(tmp_path / "h.zarr"))
    assert code == 0, err
    d = RunReader(tmp_path / "h.zarr").read("landscape")
    lam = d["eigenvalues"][0, 0]
    loss = d["train_loss"][0]
    # a unit eigenvector direction: the second difference at α = 0 approximates λ
    h = 0.25
    assert (loss[1] - 2 * loss[2] + loss[3]) / h**2 == pytest.approx(lam, rel=0.3)
    code, _, err = cli("run", *SMALL, "--steps", "3", "--plugin", "landscape", "-o", "landscape.direction=gradient",
                       "-o", "landscape.alpha=-0.2:0.2:#5", "-o", "landscape.schedule=at:2",
                       "--out", str(tmp_path / "g.zarr"))
    assert code == 0, err
    g = RunReader(tmp_path / "g.zarr").read("landscape")["train_loss"][0]
    assert g[4] > g[2] > g[0]  # the loss rises along the gradient


def test_interpolate_between_two_runs_and_eps_sharpness(cli, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for path, seed in ((a, "0"), (b, "1")):
        code, _, err = cli("run", *SMALL, "--steps", "4", "--seed", seed, "--out", str(path))
        assert code == 0, err
    code, out, err = cli("measure", str(a), "--plugin", "interpolate", "--plugin", "eps-sharpness",
                         "-o", f"interpolate.other={b}", "-o", "interpolate.alpha=-1:2:0.5",
                         "-o", "eps-sharpness.repeats=3", "-o", "eps-sharpness.subspace=5",
                         "--out", str(tmp_path / "m.zarr"))
    assert code == 0, err
    run = RunReader(tmp_path / "m.zarr")
    d = run.read("interpolate")
    assert list(d["alpha"][0]) == [-1, -0.5, 0, 0.5, 1, 1.5, 2]
    assert np.isfinite(d["train_loss"]).all() and np.isfinite(d["eval_accuracy"]).all()
    s = run.read("eps-sharpness")
    assert s["values"].shape == (1, 3) and np.all(s["values"] >= 0)
    assert s["eps_sharpness"][0] == pytest.approx(s["values"][0].mean())
    code, _, err = cli("measure", str(a), "--plugin", "interpolate", "--out", str(tmp_path / "x.zarr"))
    assert code == 2 and "interpolate.other" in err


def test_trajectory_projection_is_seeded_chunked_and_plots(cli, tmp_path):
    out = tmp_path / "t.zarr"
    code, _, err = cli("run", *SMALL, "--steps", "12", "--plugin", "trajectory", "-o", "trajectory.dim=32",
                       "-o", "trajectory.every=2", "-o", "trajectory.projection_seed=5", "-o", "trajectory.gradient=true",
                       "--plugin", "landscape", "-o", "landscape.alpha=-1:1:#5", "--out", str(out))
    assert code == 0, err
    run = RunReader(out)
    d = run.read("trajectory")
    assert d["theta"].shape == (6, 32) and d["grad"].shape == (6, 32)
    assert list(d["step"]) == [0, 2, 4, 6, 8, 10]
    assert run.group_attrs("trajectory")["projection_seed"] == 5
    assert run.arrays("trajectory")["theta"].compressors  # stored compressed
    # the path length counts every step, recorded or not
    assert d["path_length"][-1] > np.nansum(d["step_length"])
    code, out_text, err = cli("plot", str(out), "--out", str(tmp_path / "fig"))
    assert code == 0, err
    assert "landscape_1d_t.png" in out_text


def test_bad_range_is_a_usage_error(cli, tmp_path):
    code, _, err = cli("run", *SMALL, "--steps", "2", "--plugin", "landscape", "-o", "landscape.alpha=1:0:0.1",
                       "--out", str(tmp_path / "bad.zarr"))
    assert code == 2 and "bad range" in err
    assert not (tmp_path / "bad.zarr").exists()


def test_pca_trajectory_over_the_loss_contour_from_a_runs_checkpoints(cli, tmp_path):
    from lscape.plugins.landscape._pca import checkpoint_states, pca_directions, trajectory_matrix

    run = tmp_path / "r.zarr"
    code, _, err = cli("run", *SMALL, "--steps", "24", "--lr", "0.3", "--checkpoint-schedule", "every:4",
                       "--out", str(run))
    assert code == 0, err
    out = tmp_path / "m.zarr"
    code, _, err = cli("measure", str(run), "--plugin", "landscape", "-o", "landscape.direction=pca",
                       "-o", "landscape.dims=2", "-o", "landscape.alpha=-1:1:#5", "-o", "landscape.batches=2",
                       "--out", str(out))
    assert code == 0, err
    root = zarr.open_group(str(out), mode="r")
    (name,) = list(root["landscape"].group_keys())
    g = root["landscape"][name]
    states = checkpoint_states(zarr.open_group(str(run), mode="r"))
    final = states[-1][1]
    params = list(final)  # the MLP's state is its parameters
    M = trajectory_matrix([s for _, s in states], params, [final[k] for k in params])
    dirs, ratio = pca_directions(M)
    np.testing.assert_allclose(g["path_x"][:], (M @ dirs[0]).numpy(), atol=1e-6)
    np.testing.assert_allclose(g["path_y"][:], (M @ dirs[1]).numpy(), atol=1e-6)
    assert list(g["path_step"][:]) == [s for s, _ in states]
    assert (g["path_x"][-1], g["path_y"][-1]) == (0.0, 0.0)       # the measured model is the last checkpoint
    np.testing.assert_allclose(g.attrs["explained_variance_ratio"], ratio.numpy(), rtol=1e-9)
    # the grid covers the path; the centre row/column pass through θ only approximately, the path exactly
    assert g["alpha"][0] < g["path_x"][:].min() and g["alpha"][-1] > g["path_x"][:].max()
    assert np.isfinite(g["train_loss"][:]).all() and int(g.attrs["rows_done"]) == 5
    code, out_text, err = cli("plot", str(out), "--out", str(tmp_path / "figs"))
    assert code == 0, err
    assert list((tmp_path / "figs").glob("landscape_trajectory_*.png"))
    # too few checkpoints: one clear line (exit 2 before any store when the run is named)
    short = tmp_path / "short.zarr"
    code, _, err = cli("run", *SMALL, "--steps", "2", "--out", str(short))
    code, _, err = cli("measure", str(short), "--plugin", "landscape", "-o", "landscape.direction=pca",
                       "-o", "landscape.dims=2", "-o", "landscape.batches=2", "--out", str(tmp_path / "s.zarr"))
    assert code != 0 and "at least 3 checkpoints" in err and "Traceback" not in err
    code, _, err = cli("measure", str(short), "--plugin", "landscape", "-o", "landscape.direction=pca",
                       "-o", "landscape.dims=2", "-o", f"landscape.pca_run={short}", "--out", str(tmp_path / "t.zarr"))
    assert code == 2 and "at least 3 checkpoints" in err and not (tmp_path / "t.zarr").exists()
