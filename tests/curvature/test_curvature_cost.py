"""Issue 23 (item 4 and the probe side of item 1): curvature probes state their cost before
they run, the default `hessian` measurement fits a 150-product budget, `budget` sizes the
trace and density, and the Lanczos memory options reach the probes and their attrs."""

from __future__ import annotations

import numpy as np
import pytest

import lscape
from lscape.curvature.base import CurvatureOperator
from lscape.errors import UsageError
from lscape.limits import ProbeTimer, parse_size
from lscape.plugins.curvature.hessian import Hessian, plan_products
from lscape.store import RunReader

WORKLOAD = dict(model="mlp", model_opts={"widths": "16"}, data="synthetic",
                data_opts={"n": 128, "dim": 8, "classes": 3}, batch_size=32, progress=False,
                eval_schedule="never", checkpoint_schedule="never")
CLI_WORKLOAD = ["--model-opt", "widths=16", "--data", "synthetic", "--data-opt", "n=128", "--data-opt", "dim=8",
                "--data-opt", "classes=3", "--batch-size", "32", "--no-progress", "--steps", "1"]
SUBSET = {"data": "subset", "batches": 2}


@pytest.fixture
def counted(monkeypatch):
    """Every product any curvature operator makes, counted where the operator counts them."""
    seen: list[int] = []
    original = CurvatureOperator._count

    def count(self, n):
        seen.append(n)
        return original(self, n)

    monkeypatch.setattr(CurvatureOperator, "_count", count)
    return seen


def _run(tmp_path, name, plugins, options, steps=1):
    result = lscape.run(out=str(tmp_path / f"{name}.zarr"), **WORKLOAD, steps=steps, plugins=plugins,
                        plugin_options=options)
    assert result.status == "completed"
    return RunReader(result.path)


def test_the_default_hessian_measurement_costs_at_most_150_products(tmp_path, counted, capsys):
    reader = _run(tmp_path, "default", ["hessian"], {"hessian": {**SUBSET, "schedule": "at:0"}})
    total = sum(counted)
    assert 0 < total <= 150
    top, trace = reader.read("hessian"), reader.read("hessian/trace")
    assert np.isfinite(top["top_eigenvalues"]).all() and list(trace["step"]) == [0]
    assert not reader.has("hessian/density")  # the density is opt-in
    attrs = reader.group_attrs("hessian")
    assert attrs["budget"] == 150 and attrs["budget_plan"]["density"] == 0
    spent = attrs["products_spent"]
    assert spent["top"] == top["hvp_products"][0] and spent["trace"] == trace["trace_products"][0]
    assert spent["top"] + spent["trace"] == total
    # the cost line, once, before the measurement's products are spent
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "products per measurement" in line]
    assert len(lines) == 1 and "hessian: ~150 products per measurement" in lines[0]
    assert "measured on the first product" in lines[0]


def test_the_budget_sizes_trace_and_density_and_is_respected(tmp_path, counted):
    options = {**SUBSET, "schedule": "at:0", "k": 2, "budget": 60, "density_schedule": "at:0",
               "density_points": 32}
    reader = _run(tmp_path, "budget", ["hessian"], {"hessian": options})
    assert 0 < sum(counted) <= 60
    density, trace = reader.read("hessian/density"), reader.read("hessian/trace")
    plan = reader.group_attrs("hessian")["budget_plan"]
    assert plan["top"] + plan["trace"] + plan["density"] <= 60
    assert density["nodes"].shape[1:] == (plan["density_runs"], plan["density_steps"])
    assert trace["trace_products"][0] == plan["trace_samples"]
    assert density["density_products"][0] <= plan["density"]


def test_a_hessian_plot_without_density_draws_the_rest(tmp_path):
    pytest.importorskip("matplotlib")
    from lscape.plugins.curvature.hessian import plot_hessian

    reader = _run(tmp_path, "nodensity", ["hessian"], {"hessian": {**SUBSET, "schedule": "at:0", "k": 2}})
    names = {p.name for p in plot_hessian([reader], tmp_path)}
    assert {"hessian_top_eigenvalues.png", "hessian_trace.png"} <= names and "hessian_density.png" not in names


def test_plan_shares_the_budget_and_refuses_sizes_that_do_not_fit():
    default = Hessian().plan
    assert (default["top"], default["trace"], default["density"]) == (100, 50, 0)
    with_density = Hessian(density_schedule="every:10").plan
    assert sum(with_density[p] for p in ("top", "trace", "density")) <= 150 and with_density["density"] > 0
    # explicit sizes count first; top-k takes what is left, up to max_iter + k
    explicit = Hessian(trace_samples=99, k=3).plan
    assert explicit["trace"] == 99 and explicit["top"] == 51 and explicit["max_iter"] == 48
    # a larger budget restores the old sizes
    old = Hessian(density_schedule="every:10", density_runs=8, density_steps=80, trace_samples=99, budget=1044).plan
    assert (old["density"], old["trace"], old["top"]) == (640, 99, 305)
    with pytest.raises(UsageError, match=r"budget=150.*-o hessian.budget=656"):
        Hessian(density_schedule="every:10", density_runs=8, density_steps=80)
    with pytest.raises(UsageError, match="k=100"):
        Hessian(k=100)
    with pytest.raises(UsageError, match="trace_samples.*at least 6"):
        Hessian(trace_samples=3)
    assert Hessian(trace_samples=3, trace_method="hutchinson").plan["trace"] == 3
    # a size for a part that is off would do nothing: refused, naming the switch
    with pytest.raises(UsageError, match="density_runs=4.*density_schedule"):
        Hessian(density_runs=4)
    with pytest.raises(UsageError, match="trace_samples=30.*trace_schedule"):
        Hessian(trace_samples=30, trace_schedule="never")
    assert Hessian(density_runs=4, density_steps=5, density_schedule="every:2").plan["density"] == 20
    off = plan_products(Hessian().opts, {"top": True, "trace": False, "density": False})
    assert off["top"] == 150 and off["trace"] == 0


def test_a_budget_too_small_is_refused_before_the_store_exists(tmp_path, cli):
    out = tmp_path / "bad.zarr"
    code, _, err = cli("run", *CLI_WORKLOAD, "--plugin", "hessian", "-o", "hessian.trace_samples=200",
                       "--out", out)
    assert code == 2 and "hessian.budget" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_lscape_plugins_shows_the_cost_model(cli):
    code, out, _ = cli("plugins", "hessian")
    assert code == 0 and "cost model" in out and "budget" in out and "density_runs × density_steps" in " ".join(out.split())
    code, out, _ = cli("plugins", "sharpness")
    assert code == 0 and "max_iter + 1" in out
    code, out, _ = cli("plugins", "hessian", "--json")
    import json

    assert "budget products per measurement" in json.loads(out)["cost"]


def test_sharpness_memory_options_reach_lanczos_and_the_attrs(tmp_path):
    reader = _run(tmp_path, "memory", ["sharpness"],
                  {"sharpness": {**SUBSET, "every": 1, "basis_device": "cpu", "memory_budget": "64KiB"}})
    memory = reader.group_attrs("sharpness")["lanczos_memory"]
    assert memory["budget_bytes"] == 64 * 1024 and memory["basis_device"] == "cpu"
    assert memory["basis_bytes"] <= memory["budget_bytes"] and memory["dim"] > 0
    assert memory["peak_bytes"] == (memory["basis_vectors"] + memory["remainder_vectors"]
                                    + memory["final_vectors"]) * memory["bytes_per_vector"]
    assert memory["reorth"] in ("full", "thick-restart")


def test_hessian_records_its_lanczos_memory(tmp_path):
    reader = _run(tmp_path, "hmemory", ["hessian"],
                  {"hessian": {**SUBSET, "schedule": "at:0", "k": 2, "trace_schedule": "never",
                               "memory_budget": "1MB"}})
    memory = reader.group_attrs("hessian")["lanczos_memory"]
    assert memory["budget_bytes"] == 10**6 and memory["param_bytes"] == memory["dim"] * 4


@pytest.mark.parametrize("option", ["sharpness.memory_budget=lots", "sharpness.memory_budget=-1GB",
                                    "sharpness.basis_device=nowhere"])
def test_bad_memory_options_are_one_line(tmp_path, cli, option):
    out = tmp_path / "bad.zarr"
    code, _, err = cli("run", *CLI_WORKLOAD, "--plugin", "sharpness", "-o", option, "--out", out)
    assert code == 2 and option.split("=")[0] in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == parse_size("2G") == 2 * 2**30
    assert parse_size("1.5MiB") == 3 * 2**19 and parse_size("4096") == 4096 and parse_size(10) == 10
    for bad in ("lots", "-1", "2XB", "", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_probe_timer_states_the_cost_once(capsys):
    timer = ProbeTimer()
    line = timer.cost("hessian", {"top-k": 100, "trace": 50}, 0.5)
    assert "hessian: ~150 products per measurement" in line and "~75 s" in line and timer.announced("hessian")
    assert "first product" in capsys.readouterr().err
