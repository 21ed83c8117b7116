"""The `sharpness`, `hessian` and `hessian-exact` probes through the engine, `lscape measure` and the plots."""

from __future__ import annotations

import numpy as np
import pytest

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

# A 3-class synthetic problem and an MLP of about 200 parameters: dense spectra are cheap.
WORKLOAD = dict(
    model="mlp",
    model_opts={"widths": "16"},
    data="synthetic",
    data_opts={"n": 128, "dim": 8, "classes": 3},
    batch_size=32,
    progress=False,
    eval_schedule="never",
)
CLI_WORKLOAD = ["--model-opt", "widths=16", "--data", "synthetic", "--data-opt", "n=128", "--data-opt", "dim=8",
                "--data-opt", "classes=3", "--batch-size", "32", "--no-progress"]
SUBSET = {"data": "subset", "batches": 2}


def _run(tmp_path, name, **kw):
    result = lscape.run(out=str(tmp_path / f"{name}.zarr"), **WORKLOAD, **kw)
    assert result.status == "completed"
    return RunReader(result.path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One short run with all three probes on the same fixed subset."""
    tmp = tmp_path_factory.mktemp("probes")
    return _run(
        tmp, "all", steps=4, checkpoint_schedule="never",
        plugins=["sharpness", "hessian", "hessian-exact"],
        plugin_options={
            "sharpness": {**SUBSET, "every": 1, "tol": 1e-5},
            "hessian": {**SUBSET, "schedule": "at:0,3", "k": 3, "tol": 1e-5, "eigenvectors": True,
                        "trace_schedule": "every:2", "trace_samples": 30, "density_schedule": "at:3",
                        "density_runs": 2, "density_steps": 30, "density_points": 200},
            "hessian-exact": {**SUBSET, "schedule": "at:0,3"},
        },
    )  # fmt: skip


def test_lanczos_probes_match_the_dense_spectrum_at_the_same_steps(measured):
    exact = measured.read("hessian-exact")
    sharp = measured.read("sharpness")
    top = measured.read("hessian")
    assert list(exact["step"]) == [0, 3] and list(top["step"]) == [0, 3] and list(sharp["step"]) == [0, 1, 2, 3]
    for row, step in enumerate(exact["step"]):
        values = np.sort(exact["eigenvalues"][row])[::-1]
        s = list(sharp["step"]).index(step)
        assert sharp["lambda_max"][s] == pytest.approx(values[0], rel=1e-4)
        np.testing.assert_allclose(top["top_eigenvalues"][row], values[:3], rtol=1e-4)
        assert top["converged"][row].all() and sharp["converged"][s]
        assert exact["trace"][row] == pytest.approx(values.sum())
    assert top["eigenvectors"].shape == (2, 3, exact["eigenvalues"].shape[1])
    np.testing.assert_allclose(np.linalg.norm(top["eigenvectors"][0], axis=1), 1.0, rtol=1e-5)
    # warm starts: after the first measurement λ_max costs fewer products
    assert sharp["hvp_products"][1:].mean() < sharp["hvp_products"][0]


def test_trace_and_density_follow_their_own_schedules(measured):
    exact = measured.read("hessian-exact")
    trace = measured.read("hessian/trace")
    density = measured.read("hessian/density")
    assert list(trace["step"]) == [0, 2]
    assert (trace["trace_products"] == 30).all()
    z = abs(trace["trace"][0] - exact["trace"][0]) / trace["trace_stderr"][0]
    assert z < 4
    assert list(density["step"]) == [3]
    assert np.trapezoid(density["density"][0], density["grid"][0]) == pytest.approx(1.0, abs=1e-6)
    assert density["nodes"].shape == (1, 2, 30)


def test_probe_groups_open_as_labelled_xarray_datasets(measured):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(measured.path, group="hessian", consolidated=False)
    assert ds["top_eigenvalues"].dims == ("step", "k")
    assert ds["eigenvectors"].dims == ("step", "k", "param")
    assert list(ds["step"].values) == [0, 3]


def test_plots_draw_lambda_max_top_k_and_density(measured, tmp_path):
    pytest.importorskip("matplotlib")
    from lscape.plugins.curvature.hessian import plot_hessian
    from lscape.plugins.curvature.hessian_exact import plot_hessian_exact
    from lscape.plugins.curvature.sharpness import plot_sharpness

    paths = plot_sharpness([measured], tmp_path) + plot_hessian([measured], tmp_path) + plot_hessian_exact([measured], tmp_path)
    names = {p.name for p in paths}
    assert {"sharpness_lambda_max.png", "hessian_top_eigenvalues.png", "hessian_density.png",
            "hessian_trace.png", "hessian_exact_histogram.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)


def test_measure_every_checkpoint_of_a_run_from_the_cli(tmp_path, cli):
    run = tmp_path / "run.zarr"
    code, out, err = cli("run", *CLI_WORKLOAD, "--steps", "4", "--checkpoint-schedule", "every:2", "--out", run)
    if code == 2 and "checkpoint-schedule" in err:
        pytest.skip("the CLI has no --checkpoint-schedule yet")
    assert code == 0, err
    measured = tmp_path / "measured.zarr"
    code, out, err = cli("measure", run, "--plugin", "hessian-exact", "--plugin", "hessian", "--plugin", "sharpness",
                         "--checkpoints", "all", "-o", "hessian.k=2", "-o", "hessian.trace_schedule=never",
                         "-o", "hessian.density_schedule=never", "--out", measured)
    assert code == 0, err
    reader = RunReader(measured)
    exact, top, sharp = reader.read("hessian-exact"), reader.read("hessian"), reader.read("sharpness")
    assert len(exact["step"]) >= 2 and list(exact["step"]) == list(top["step"]) == list(sharp["step"])
    for row in range(len(exact["step"])):
        values = np.sort(exact["eigenvalues"][row])[::-1]
        np.testing.assert_allclose(top["top_eigenvalues"][row], values[:2], rtol=1e-3)
        assert sharp["lambda_max"][row] == pytest.approx(values[0], rel=1e-3)
    assert not reader.has("hessian/trace") and not reader.has("hessian/density")


def test_hessian_exact_refuses_a_model_above_max_params(tmp_path):
    """Bad input: refused before the store exists."""
    with pytest.raises(UsageError, match="max_params=50"):
        lscape.run(out=str(tmp_path / "big.zarr"), **WORKLOAD, steps=1, plugins=["hessian-exact"],
                   plugin_options={"hessian-exact": {"max_params": 50}})
    assert not (tmp_path / "big.zarr").exists()


def test_bad_probe_options_are_usage_errors(tmp_path, cli):
    code, out, err = cli("run", *CLI_WORKLOAD, "--steps", "1", "--plugin", "hessian", "-o", "hessian.which=XX",
                         "--out", tmp_path / "bad.zarr")
    assert code == 2 and "hessian.which" in err
    code, out, err = cli("run", *CLI_WORKLOAD, "--steps", "1", "--plugin", "hessian",
                         "-o", "hessian.trace_schedule=sometimes", "--out", tmp_path / "bad2.zarr")
    assert code == 2 and "sometimes" in err
