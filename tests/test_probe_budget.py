"""Issue 20 item 5: --probe-budget F spaces scheduled probe firings so that probes take at most
about F of the training wall time; the realised overhead and the skipped firings are recorded,
survive --resume, and bad values are refused in one line."""

from __future__ import annotations

import math
import os

import pytest

import lscape
from lscape.errors import UsageError
from lscape.limits import ProbeBudget
from lscape.store import RunReader

# a probe far more expensive than a training step: λ_max by Lanczos at every step
BASE = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2}, batch_size=16, progress=False,
            plugins=["sharpness"], plugin_options={"sharpness": {"every": 1, "tol": 1e-4, "warm_start": False}})


def test_budget_arithmetic():
    budget = ProbeBudget(0.1)
    assert budget.allows("p")  # the first firing: its cost is not known yet
    budget.begin_step()
    budget.charge("p", 1.0)
    budget.add_step(3.0)  # 2 s of training, 1 s of probe
    assert budget.train_seconds == pytest.approx(2.0) and budget.overhead == pytest.approx(0.5)
    assert not budget.allows("p") and budget.skipped == {"p": 1}
    budget.add_step(18.0)  # 20 s of training: 1 + 1 ≤ 0.1·20
    assert budget.allows("p") and budget.skipped == {"p": 1}
    budget.charge("q", 0.5)  # outside a step (run start/end): probe time, not training time
    assert budget.train_seconds == pytest.approx(20.0) and budget.probe_seconds == pytest.approx(1.5)
    assert budget.cost("p") == pytest.approx(1.0)  # one measurement: its time
    budget.charge("p", 0.2)
    budget.charge("p", 0.4)
    assert budget.cost("p") == pytest.approx(0.3)  # the mean after the first (which paid the setup)
    other = ProbeBudget(0.1)
    other.load_state_dict(budget.state_dict())
    assert other.attrs() == budget.attrs()


def test_a_budget_skips_firings_and_records_the_overhead(tmp_path, cli):
    out = str(tmp_path / "b.zarr")
    assert lscape.run(**BASE, steps=30, probe_budget=0.02, out=out).status == "completed"
    r = RunReader(out)
    attrs = r.attrs
    fired, skipped = attrs["probe_fired"]["sharpness"], attrs["probe_skipped"]["sharpness"]
    assert skipped > 0 and fired + skipped == 30
    assert len(r.read("sharpness")["step"]) == fired
    assert r.group_attrs("sharpness")["budget_skipped"] == skipped
    assert attrs["probe_budget"] == 0.02
    assert math.isfinite(attrs["probe_overhead"]) and attrs["probe_overhead"] > 0
    assert attrs["probe_overhead"] == pytest.approx(attrs["probe_seconds"] / attrs["train_seconds"])
    code, shown, _ = cli("show", out)
    assert code == 0 and f"probe budget 0.02: realised overhead {attrs['probe_overhead']:.3g}" in shown
    assert f"sharpness {fired} measured, {skipped} skipped" in shown
    # without a budget every scheduled firing measures and nothing is recorded about it
    plain = str(tmp_path / "p.zarr")
    assert lscape.run(**BASE, steps=30, out=plain).status == "completed"
    assert len(RunReader(plain).read("sharpness")["step"]) == 30
    assert "probe_overhead" not in RunReader(plain).attrs


def test_the_budget_does_not_change_training(tmp_path):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    lscape.run(**BASE, steps=12, probe_budget=0.01, out=a)
    lscape.run(**BASE, steps=12, out=b)
    assert (RunReader(a).read("train")["loss"] == RunReader(b).read("train")["loss"]).all()


def test_budget_state_survives_resume(tmp_path):
    out = str(tmp_path / "r.zarr")
    assert lscape.run(**BASE, steps=10, probe_budget=0.02, out=out).status == "completed"
    first = dict(RunReader(out).attrs)
    assert lscape.run(resume=out, steps=25, progress=False).status == "completed"
    r = RunReader(out)
    fired, skipped = r.attrs["probe_fired"]["sharpness"], r.attrs["probe_skipped"]["sharpness"]
    assert fired + skipped == 25  # the counts of the first part go on
    assert fired >= first["probe_fired"]["sharpness"] and skipped >= first["probe_skipped"]["sharpness"]
    assert r.attrs["probe_seconds"] >= first["probe_seconds"]
    assert r.attrs["train_seconds"] > first["train_seconds"]
    assert len(r.read("sharpness")["step"]) == fired


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "nan", "lots"])
def test_bad_budget_is_refused(value, tmp_path):
    out = tmp_path / "bad.zarr"
    with pytest.raises(UsageError, match="probe_budget"):
        lscape.run(**BASE, steps=2, probe_budget=value, out=str(out))
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "1.01", "-1", "x"])
def test_bad_budget_on_the_command_line(cli, tmp_path, value):
    before = set(os.listdir(tmp_path))
    code, out, err = cli("run", "--steps", "2", "--probe-budget", value, "--out", tmp_path / "r.zarr")
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--probe-budget" in lines[0] and "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before
