"""Limits refused up front (one line naming the option, before the store exists) and the
log line that says how long a probe's measurements will take."""

from __future__ import annotations

import types

import pytest

import lscape
from lscape.errors import UsageError
from lscape.limits import ProbeTimer, require_at_most, require_memory
from lscape.schedule import Schedule

SMALL = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 3}, model_opts={"widths": 8},
             batch_size=16, steps=2, progress=False)


def test_require_memory_refuses_naming_the_option_and_passes_when_unknown():
    with pytest.raises(UsageError, match=r"needs about 8\.0 GiB but cpu has 1\.0 GiB available; lower x\.k"):
        require_memory(8 * 2**30, "the thing", "x.k", "cpu", available=2**30)
    require_memory(0.5 * 2**30, "the thing", "x.k", "cpu", available=2**30)
    import lscape.limits as limits

    assert limits.available_memory("cpu") is None or limits.available_memory("cpu") > 0


def test_require_at_most():
    require_at_most(5, 5, "hessian.k", "the number of parameters")
    with pytest.raises(UsageError, match=r"bad value for hessian\.k: 6 is more than the number of parameters \(5\)"):
        require_at_most(6, 5, "hessian.k", "the number of parameters")


def test_trajectory_projection_larger_than_theta_is_refused_before_the_store(tmp_path):
    # widths 8 on dim 4, 3 classes: 4*8+8 + 8*3+3 = 67 parameters
    out = tmp_path / "t.zarr"
    with pytest.raises(UsageError, match=r"trajectory\.dim: 68 is more than the number of coordinates it projects \(67\)"):
        lscape.run(**SMALL, plugins=["trajectory"], plugin_options={"trajectory": {"dim": 68}}, out=str(out))
    assert not out.exists()


def test_trajectory_projection_that_does_not_fit_in_memory_is_refused(tmp_path, monkeypatch):
    import lscape.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda device="cpu": 1000)
    out = tmp_path / "t.zarr"
    with pytest.raises(UsageError, match=r"trajectory's gaussian projection to 60 needs about .* lower trajectory\.dim"):
        lscape.run(**SMALL, plugins=["trajectory"], plugin_options={"trajectory": {"dim": 60, "projection": "gaussian"}},
                   out=str(out))
    assert not out.exists()


def _probe(schedule):
    return types.SimpleNamespace(name="slow", schedule=Schedule.parse(schedule))


def test_probe_timer_extrapolates_the_first_measurement_once(capsys):
    ctx = types.SimpleNamespace(total_steps=1000, steps_per_epoch=10)
    timer = ProbeTimer(threshold=60)
    line = timer.first(_probe("every:10"), ctx, 0, 2.0)  # 99 more at 2 s
    assert line is not None and "99 more are scheduled, about 3 min in all" in line
    assert line in capsys.readouterr().err
    assert timer.first(_probe("every:10"), ctx, 10, 2.0) is None  # said once per probe
    assert ProbeTimer(60).first(_probe("every:10"), ctx, 0, 0.1) is None  # short: nothing said
    assert "10 more" in ProbeTimer(1).first(_probe("at:0,5,100,200,300,400,500,600,700,800,900,5000"), ctx, 0, 1.0)
    assert "99 more" in ProbeTimer(1).first(_probe("epoch"), ctx, 9, 1.0)
    assert ProbeTimer(0).first(_probe("time:10m"), ctx, 0, 100.0) is None  # wall-clock schedules keep state
    assert ProbeTimer(0).first(_probe("every:1"), types.SimpleNamespace(total_steps=None), 0, 100.0) is None
