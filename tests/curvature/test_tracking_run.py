"""Issue 20 item 5 through the engine: `sharpness` with track=true records its arrays, never
changes training, gives the untracked λ, and survives --resume exactly (the dense references
are in test_tracking.py)."""

from __future__ import annotations

import numpy as np
import pytest

import lscape
from lscape.store import RunReader

BASE = dict(data="synthetic", data_opts={"n": 96, "dim": 6, "classes": 3}, model_opts={"widths": [8]},
            batch_size=16, lr=0.3, progress=False)
TRACK = {"sharpness": {"every": 2, "track": True, "verify_every": 3, "tol": 1e-4, "batches": 2}}


def _run(tmp_path, name, options, **kw):
    out = str(tmp_path / f"{name}.zarr")
    result = lscape.run(**{**BASE, **kw}, plugins=["sharpness"], plugin_options=options, out=out)
    assert result.status == "completed"
    return RunReader(out)


def test_tracking_records_its_arrays_and_never_changes_training(tmp_path):
    tracked = _run(tmp_path, "track", TRACK, steps=24)
    plain = _run(tmp_path, "plain", {"sharpness": {"every": 2, "tol": 1e-4, "batches": 2}}, steps=24)
    a, b = tracked.read("train"), plain.read("train")
    assert np.array_equal(a["loss"], b["loss"])  # probes never change training
    s, p = tracked.read("sharpness"), plain.read("sharpness")
    assert len(s["step"]) == 12
    for name in ("tracked", "track_products", "track_gap", "track_disagree"):
        assert name in s and name not in p
    cold = np.arange(12) % 3 == 0
    assert np.all(np.isnan(s["track_gap"][~cold]))
    assert np.all(s["track_gap"][cold][1:] <= 2e-4)  # every cold verify after the first compared
    assert not s["track_disagree"].any()
    assert np.all(s["hvp_products"] >= s["track_products"])
    np.testing.assert_allclose(s["lambda_max"], p["lambda_max"], rtol=2e-4)  # the same λ, tracked or not
    # a tracked measurement is cheaper than the untracked warm start on average
    assert s["track_products"][~cold].mean() < p["hvp_products"][1:].mean()
    assert tracked.group_attrs("sharpness")["track_disagreements"] == 0


def test_tracking_resumes_exactly(tmp_path):
    whole = _run(tmp_path, "whole", TRACK, steps=30)
    out = str(tmp_path / "half.zarr")
    first = lscape.run(**BASE, steps=13, plugins=["sharpness"], plugin_options=TRACK, out=out)
    assert first.status == "completed"
    again = lscape.run(resume=out, steps=30, progress=False)
    assert again.status == "completed"
    a, b = whole.read("sharpness"), RunReader(out).read("sharpness")
    for name in ("step", "lambda_max", "hvp_products", "tracked", "track_products", "track_disagree"):
        assert np.array_equal(a[name], b[name]), name
    assert np.array_equal(np.isnan(a["track_gap"]), np.isnan(b["track_gap"]))
    assert np.array_equal(whole.read("train")["loss"], RunReader(out).read("train")["loss"])


def test_bad_tracking_options_are_refused(tmp_path):
    from lscape.errors import UsageError

    for bad in ({"verify_every": 0}, {"track_max_iter": 0}):
        with pytest.raises(UsageError):
            lscape.run(**BASE, steps=2, plugins=["sharpness"], plugin_options={"sharpness": {"track": True, **bad}},
                       out=str(tmp_path / "bad.zarr"))
        assert not (tmp_path / "bad.zarr").exists()

