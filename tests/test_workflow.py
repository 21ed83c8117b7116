"""The research workflow: final checkpoints, extending runs, the data seed, show/compare/plot,
progress, and the TensorBoard/W&B forwarders."""

import json

import numpy as np
import pytest
import zarr

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

from conftest import SMALL

TINY = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2}, model_opts={"widths": [8]},
            batch_size="full", progress=False)


def _checkpoints(path):
    group = zarr.open_group(str(path), mode="r")["checkpoints"]
    return sorted(int(group[n].attrs["step"]) for n in group.array_keys()), int(group[group.attrs["latest"]].attrs["step"])


def test_a_run_always_ends_with_a_checkpoint(tmp_path):
    out = tmp_path / "c.zarr"
    assert lscape.run(steps=12, out=str(out), **TINY).status == "completed"
    steps, latest = _checkpoints(out)
    assert latest == 12 and steps[-1] == 12  # full batch checkpoints every:100, and at the end
    diverged = lscape.run(steps=50, lr=1e6, out=str(tmp_path / "d.zarr"), **TINY)
    assert diverged.status == "diverged"
    assert _checkpoints(tmp_path / "d.zarr")[1] == diverged.steps


def test_a_run_stopped_by_a_signal_checkpoints_where_it_stopped(tmp_path):
    from lscape.engine import Engine

    class Stop(lscape.Plugin):
        name = "stop-at-5"

        @lscape.hookimpl
        def on_step_end(self, ctx, state):
            if state.step == 4:
                engine._stop_requested = True  # what SIGINT/SIGTERM do

    engine = Engine(lscape.api.make_config(steps=100, out=str(tmp_path / "s.zarr"), **TINY))
    engine.prepare()
    engine.pm.register(Stop(), name="stop")
    assert engine.run().status == "interrupted"
    assert _checkpoints(tmp_path / "s.zarr")[1] == 5


def test_extending_a_run_equals_the_longer_run(tmp_path):
    out = tmp_path / "e.zarr"
    lscape.run(steps=7, out=str(out), **TINY)
    again = lscape.run(resume=str(out), steps=15, progress=False)
    assert again.status == "completed" and again.steps == 15
    lscape.run(steps=15, out=str(tmp_path / "ref.zarr"), **TINY)
    a, b = RunReader(out).read("train"), RunReader(tmp_path / "ref.zarr").read("train")
    np.testing.assert_array_equal(a["loss"], b["loss"])
    np.testing.assert_array_equal(a["step"], np.arange(15))
    attrs = RunReader(out).attrs
    assert attrs["config"]["steps"] == 15
    assert attrs["extensions"][0]["steps"] == 15 and attrs["extensions"][0]["from"] == {"steps": 7}
    assert attrs["extensions"][0]["at_step"] == 7
    with pytest.raises(UsageError, match="can only be raised"):
        lscape.run(resume=str(out), steps=10, progress=False)


def test_resume_takes_only_the_length_from_the_command_line(cli, tmp_path):
    out = tmp_path / "r.zarr"
    assert cli("run", *SMALL, "--steps", "3", "--out", out)[0] == 0
    code, _, err = cli("run", "--resume", out, "--lr", "0.5")
    assert code == 2 and "--lr" in err and "--steps" in err
    code, _, err = cli("run", "--resume", out, "--steps", "6", "--no-progress")
    assert code == 0, err
    assert len(RunReader(out).read("train")["loss"]) == 6


def test_the_data_seed_is_apart_from_the_training_seed(tmp_path):
    from lscape.engine import Engine

    def split(**kw):
        ctx = Engine(lscape.api.make_config(out=str(tmp_path / "x.zarr"), **{**TINY, **kw})).prepare()
        return ctx.train_set.tensors[0].clone(), next(iter(ctx.model.parameters())).detach().clone()

    (x0, w0), (x1, w1), (x2, _) = split(seed=0), split(seed=1), split(seed=0, data_seed=3)
    assert torch_equal(x0, x1) and not torch_equal(w0, w1)  # --seed: same data, another initialisation
    assert not torch_equal(x0, x2)
    with pytest.raises(UsageError, match="--data-seed"):
        lscape.api.make_config(data_seed="x").validate()


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_drop_last_and_regime_from_the_command_line(cli, tmp_path):
    out = tmp_path / "d.zarr"
    code, _, err = cli("run", "--data", "synthetic", "--data-opt", "n=100", "--batch-size", "32", "--drop-last",
                       "--regime", "1:lr=0.01", "--epochs", "2", "--no-progress", "--out", out)
    assert code == 0, err
    cfg = RunReader(out).attrs["config"]
    assert cfg["drop_last"] is True and cfg["regime"] == {"1": {"lr": 0.01}}
    lr = RunReader(out).read("train")["lr"]
    assert len(lr) == 2 * 2 and lr[0] == pytest.approx(0.1) and lr[-1] == pytest.approx(0.01)
    assert cli("run", "--regime", "lr=0.1")[0] == 2
