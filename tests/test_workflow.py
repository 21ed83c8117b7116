"""The research workflow: final checkpoints, extending runs, the data seed, show/compare/plot,
progress, and the TensorBoard/W&B forwarders."""

import json
from pathlib import Path

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
                engine.request_stop()  # what SIGINT/SIGTERM do

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
    with pytest.raises(UsageError, match="data_seed="):
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


# -- show / compare -------------------------------------------------------------------

def test_show_json_has_numbers_last_finite_values_and_the_latest_checkpoint(cli, tmp_path):
    out = tmp_path / "s.zarr"
    assert lscape.run(steps=12, eval_schedule="every:5", out=str(out), **TINY).status == "completed"
    code, text, err = cli("show", out, "--json")
    assert code == 0, err
    s = json.loads(text)
    train = RunReader(out).read("train")
    rows = np.flatnonzero(np.isfinite(train["eval_loss"]))
    info = s["groups"]["train"]["eval_loss"]
    assert info["last"] == pytest.approx(float(train["eval_loss"][rows[-1]])) and info["last_step"] == 10
    loss = train["loss"]
    summary = s["groups"]["train"]["loss"]["summary"]
    assert summary["first"] == loss[0] and summary["last"] == loss[-1] and summary["min"] == loss.min()
    assert summary["late_mean"] == pytest.approx(loss[-2:].mean())  # 10% of 12 rows, rounded up
    assert s["steps_done"] == 12 and s["total_steps"] == 12
    assert s["latest_checkpoint"]["step"] == 12
    code, text, _ = cli("show", out)
    assert "steps: 12/12" in text and "is step 12" in text and "train: loss" in text


def test_compare_gives_the_late_phase_ratios(cli, tmp_path):
    out = tmp_path / "c.zarr"
    lscape.run(steps=20, plugins=["sharpness"], plugin_options={"sharpness": {"every": 4}}, lr=0.2,
               out=str(out), **TINY)
    code, text, err = cli("compare", out, "--since", "8", "--json")
    assert code == 0, err
    row = json.loads(text)[0]
    s = RunReader(out).read("sharpness")
    keep = s["step"] >= 8
    assert row["lambda_max"] == pytest.approx(np.median(s["lambda_max"][keep]))
    assert row["lambda_over_threshold_gd"] == pytest.approx(np.median(s["lambda_max"][keep] * 0.2 / 2))
    assert row["train_loss"] == pytest.approx(RunReader(out).read("train")["loss"][8:].mean())
    code, text, _ = cli("compare", out, out)
    assert code == 0 and "λ_max/(2/η)" in text
    assert cli("compare", out, "--since", "x")[0] == 2


def test_run_reader_shows_itself_in_jupyter(tmp_path):
    out = tmp_path / "j.zarr"
    lscape.run(steps=3, out=str(out), **TINY)
    page = lscape.open_run(out)._repr_html_()
    assert "completed" in page and "<table>" in page and "grad_norm" in page and "latest checkpoint: step 3" in page


# -- plots ----------------------------------------------------------------------------

def test_plot_helpers_markers_empty_figures_legends_and_log_scale():
    pytest.importorskip("matplotlib")
    from lscape import plotting

    fig, ax = plotting.figure("t", "step", "y")
    one = plotting.line(ax, [5, 6, 7], [np.nan, 2.0, np.nan])
    assert one.get_marker() == "o" and list(one.get_xdata()) == [6.0]
    many = plotting.line(ax, np.arange(100), np.r_[np.logspace(3, 0, 50), [np.nan] * 50], label="diverged")
    assert many.get_marker() in ("None", None, "")
    assert any(l.get_marker() == "x" for l in ax.lines)  # where the series stopped being finite
    for i in range(25):
        ax.plot([0, 1], [1, 2], label=f"run {i % 15}")
    plotting._auto_log(ax)
    assert ax.get_yscale() == "log"  # 1000 down to 1
    plotting._legend(ax)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == plotting.MAX_LEGEND and texts[-1] == "+7 more" and len(set(texts)) == len(texts)
    plotting._pyplot().close(fig)
    with plotting.configure(format="svg") as notes:
        fig, ax = plotting.figure("empty", "x", "y")
        ax.plot([0, 1], [np.nan, np.nan])
        assert plotting.save(fig, Path("never.png"), empty="because") is None
    assert notes == ["never.svg not written: because"] and not Path("never.svg").exists()


def test_run_labels_come_from_differing_config_keys():
    class Run:
        def __init__(self, name, status, **config):
            self.name, self.attrs = name, {"status": status, "config": {"lr": 0.1, "seed": 0, **config}}

    runs = [Run("mlp-digits-20261201-104400", "completed", lr=0.1), Run("mlp-digits-20261201-104401", "diverged", lr=2.0)]
    from lscape.plotting import run_labels

    assert run_labels(runs) == ["lr=0.1", "lr=2.0 (diverged)"]
    assert run_labels([Run("small-batch", "completed")]) == ["small-batch"]


def test_plot_command_format_dpi_smooth(cli, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    lscape.run(steps=8, out=str(a), plugins=["hessian"], plugin_options={"hessian": {"k": 2, "every": 100}}, **TINY)
    lscape.run(steps=8, lr=0.5, out=str(b), **TINY)
    code, text, err = cli("plot", a, b, "--format", "svg", "--dpi", "50", "--smooth", "3", "--out", tmp_path / "f")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert "train_loss.svg" in files and "hessian_top_eigenvalues.svg" in files
    assert all(f.endswith(".svg") for f in files)
    assert cli("plot", a, "--format", "gif")[0] == 2


# -- progress -------------------------------------------------------------------------

def test_progress_false_prints_nothing(tmp_path, capfd):
    lscape.run(steps=3, out=str(tmp_path / "q.zarr"), **TINY)
    assert capfd.readouterr().err == ""


def test_plain_progress_has_an_eta_and_names_the_probe_measuring(tmp_path, capfd):
    lscape.run(steps=6, out=str(tmp_path / "p.zarr"), **{**TINY, "progress": True}, plugins=["sharpness"],
               plugin_options={"sharpness": {"every": 3}, "progress": {"log_every": 0}})
    err = capfd.readouterr().err
    assert "step 6/6" in err and "ETA 0:00:00" in err
    assert "step 1/6  measuring sharpness:" in err and "HVPs" in err


def test_activity_reports_nest_and_count():
    from lscape import activity

    seen = []
    stop = activity.listen(lambda act: seen.append(None if act is None else (act.name, act.done, act.total)))
    try:
        with activity.doing("outer"):
            activity.tick(2, total=5)
            with activity.doing("inner"):
                activity.tick()
    finally:
        stop()
    activity.tick()  # nothing going on: ignored
    assert seen == [("outer", 0, None), ("outer", 2, 5), ("inner", 0, None), ("inner", 1, None), ("outer", 2, 5),
                    None]


def test_measure_shows_progress(cli, tmp_path):
    out = tmp_path / "m.zarr"
    lscape.run(steps=2, out=str(out), **TINY)
    code, _, err = cli("measure", out, "--plugin", "sharpness", "--out", tmp_path / "mm.zarr")
    assert code == 0 and "measuring sharpness" in err
    code, _, err = cli("measure", out, "--plugin", "sharpness", "--out", tmp_path / "m2.zarr", "--no-progress")
    assert code == 0 and "measuring" not in err


# -- TensorBoard and W&B --------------------------------------------------------------

def test_tensorboard_gets_every_groups_scalars_once_per_step_even_across_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs" / "tb.zarr"
    opts = dict(plugins=["tensorboard", "sharpness"], plugin_options={"sharpness": {"every": 2}})
    lscape.run(steps=4, out=str(out), eval_schedule="every:2", **TINY, **opts)
    lscape.run(resume=str(out), steps=7, progress=False)
    events = EventAccumulator(str(tmp_path / "runs" / "tb.zarr" / "tensorboard"))
    events.Reload()

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    train, sharp = RunReader(out).read("train"), RunReader(out).read("sharpness")
    loss = scalars("train/loss")
    assert [e.step for e in events.Scalars("train/loss")] == list(range(7))  # each step once
    np.testing.assert_allclose([loss[s] for s in range(7)], train["loss"], rtol=1e-6)
    lam = scalars("sharpness/lambda_max")
    assert sorted(lam) == sharp["step"].tolist()
    np.testing.assert_allclose([lam[s] for s in sharp["step"]], sharp["lambda_max"], rtol=1e-6)
    evals = np.isfinite(train["eval_loss"])
    assert sorted(scalars("train/eval_loss")) == train["step"][evals].tolist()  # NaN rows are not sent


def _wandb_history(path):
    """The history rows of an offline W&B run file (a LevelDB-style log of Record protobufs)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, rows, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles a block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_logs_every_groups_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "w.zarr"
    lscape.run(steps=5, out=str(out), plugins=["wandb", "grad-norm"],
               plugin_options={"wandb": {"mode": "offline", "project": "test"}}, **TINY)
    files = list((out / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = {int(r["_step"]): r for r in _wandb_history(files[0])}
    train, norms = RunReader(out).read("train"), RunReader(out).read("grad-norm")
    assert sorted(rows) == list(range(5))
    np.testing.assert_allclose([rows[s]["train/loss"] for s in range(5)], train["loss"], rtol=1e-6)
    np.testing.assert_allclose([rows[s]["grad-norm/grad_norm"] for s in range(5)], norms["grad_norm"], rtol=1e-6)
    assert "grad-norm/update_size" not in rows[0] and "grad-norm/update_size" in rows[1]  # NaN is not sent


def test_until_loss_stops_at_the_first_step_whose_subset_loss_reaches_the_target(tmp_path):
    from lscape.engine import Engine

    ref = lscape.run(steps=40, out=str(tmp_path / "ref.zarr"), **TINY, until_loss=-1.0)  # never reached
    losses = RunReader(ref.path).read("until-loss")
    assert losses["step"].tolist() == list(range(40))
    # the same loss computed independently: the model of each step on the (here: whole) data set
    engine = Engine(lscape.api.make_config(steps=1, out=str(tmp_path / "x.zarr"), **TINY))
    ctx = engine.prepare()
    from lscape.engine import load_checkpoint

    final = load_checkpoint(RunReader(ref.path).root)["model"]
    ctx.model.load_state_dict(final)
    x, y = ctx.train_set.tensors
    with torch_no_grad():
        exact = float(ctx.loss_fn(ctx.model(x), y))
    assert losses["loss"][-1] == pytest.approx(exact, rel=1e-6)
    target = float(losses["loss"][25])
    stop = int(np.flatnonzero(losses["loss"] <= target)[0])
    run = lscape.run(steps=40, out=str(tmp_path / "u.zarr"), **TINY, until_loss=target)
    assert run.status == "completed" and run.steps == stop + 1
    attrs = RunReader(run.path).attrs
    assert attrs["stopped_by"]["step"] == stop and attrs["stopped_by"]["loss"] <= target
    np.testing.assert_array_equal(RunReader(run.path).read("train")["loss"], RunReader(ref.path).read("train")["loss"][:stop + 1])


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_a_named_run_is_stored_and_labelled_by_its_name(cli, tmp_path):
    code, _, err = cli("run", *SMALL, "--steps", "2", "--name", "small-batch")
    assert code == 0, err
    r = RunReader("runs/small-batch.zarr")
    from lscape.plotting import run_labels

    assert run_labels([r]) == ["small-batch"]


@pytest.mark.parametrize("args, hint", [
    (["run", "--plugin", "sharpnes"], "did you mean 'sharpness'?"),
    (["run", "--model", "mpl"], "did you mean 'mlp'?"),
    (["run", "--plugin", "sharpness", "-o", "sharpness.evry=3"], "did you mean 'every'?"),
    (["plugins", "hesian"], "did you mean 'hessian'?"),
])
def test_unknown_names_get_a_suggestion(cli, args, hint):
    code, _, err = cli(*args)
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1


def test_toml_keys_get_a_suggestion_and_plugin_names_complete(cli, tmp_path):
    (tmp_path / "e.toml").write_text("batchsize = 3\n")
    code, _, err = cli("run", "--config", tmp_path / "e.toml")
    assert code == 2 and "did you mean 'batch_size'?" in err
    from lscape.cli import _complete_plugins

    assert "sharpness" in _complete_plugins("sharp") and "grad-norm" not in _complete_plugins("sharp")
    code, out, _ = cli("plugins")
    assert "┃ loss " in out and "┃ losse " not in out


def test_every_config_key_is_reachable_from_the_command_line():
    import dataclasses

    from lscape.cli import run as run_command
    from lscape.config import RunConfig

    flags = {opt.lstrip("-").replace("-", "_") for p in run_command.params
             for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    covered = {"model_opts": "model_opt", "data_opts": "data_opt", "optimizer_opts": "optimizer_opt",
               "plugins": "plugin", "plugin_options": "o", "progress": "no_progress", "regime": "regime"}
    missing = [f.name for f in dataclasses.fields(RunConfig) if covered.get(f.name, f.name) not in flags]
    assert not missing, f"config keys without a command-line option: {missing}"


def test_eos_figures_without_sam_skip_the_sam_edge_figure(cli, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "e.zarr"
    lscape.run(steps=4, out=str(out), plugins=["eos"], plugin_options={"eos": {"every": 2}}, **TINY)
    code, text, err = cli("plot", out, "--out", tmp_path / "f")
    assert code == 0
    assert "eos_eigenvalues.png" in text and "eos_eigenvalues_sam_edge" not in text
    assert "eos_eigenvalues_sam_edge.png not written: the SAM-edge is undefined (rho = 0)" in err


def test_show_while_running_counts_the_rows_written(tmp_path):
    from lscape.display import run_summary
    from lscape.engine import Engine

    seen = {}

    class Peek(lscape.Plugin):
        name = "peek"

        @lscape.hookimpl
        def on_step_start(self, ctx, state):
            if state.step == 6:
                ctx.store.flush()
                seen.update(run_summary(RunReader(ctx.store.path)))

    engine = Engine(lscape.api.make_config(steps=10, out=str(tmp_path / "r.zarr"), **TINY))
    engine.prepare()
    engine.pm.register(Peek(), name="peek")
    engine.run()
    assert seen["status"] == "running" and seen["steps_done"] == 6 and seen["total_steps"] == 10


def test_extending_by_epochs_and_time_limit(tmp_path):
    out = str(tmp_path / "ep.zarr")
    D = {**TINY, "batch_size": 16}
    assert lscape.run(epochs=1, out=out, **D).steps == 4  # 52 training samples in batches of 16
    assert lscape.run(resume=out, epochs=2, progress=False).steps == 8
    assert RunReader(out).attrs["total_steps"] == 8
    with pytest.raises(UsageError, match="has none"):
        lscape.run(resume=out, time_limit="1h", progress=False)
    timed = str(tmp_path / "t.zarr")
    lscape.run(time_limit=0.0001, out=timed, **D)
    with pytest.raises(UsageError, match="can only be raised"):
        lscape.run(resume=timed, time_limit=0.00001, progress=False)


def test_plot_names_a_run_that_recorded_nothing(cli, tmp_path):
    pytest.importorskip("matplotlib")
    from lscape.store import RunStore

    RunStore.create(str(tmp_path / "empty.zarr"), {"lscape_version": lscape.__version__, "status": "failed"}).flush()
    good = tmp_path / "good.zarr"
    lscape.run(steps=3, out=str(good), **TINY)
    code, out, err = cli("plot", good, tmp_path / "empty.zarr", "--out", tmp_path / "f")
    assert code == 0 and "train_loss.png" in out
    assert "empty.zarr (failed): nothing recorded, not drawn" in err
