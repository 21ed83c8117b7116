"""The command line: the main commands work, and bad input gets one line and exit 2."""

import json
import os

import pytest

from conftest import SMALL, run_subprocess


def test_run_show_plot_round_trip(cli, tmp_path):
    code, out, err = cli("run", *SMALL, "--steps", "6", "--out", tmp_path / "r.zarr")
    assert code == 0, err
    assert "lscape plot" in out and str(tmp_path / "r.zarr") in out
    code, out, _ = cli("show", tmp_path / "r.zarr", "--json")
    info = json.loads(out)
    assert code == 0 and info["status"] == "completed"
    assert info["groups"]["train"]["loss"]["shape"] == [6]
    code, out, _ = cli("show", tmp_path / "r.zarr")
    assert "grad_norm" in out and "completed" in out
    pytest.importorskip("matplotlib")
    code, out, _ = cli("plot", tmp_path / "r.zarr", "--out", tmp_path / "figs")
    assert code == 0 and (tmp_path / "figs" / "train_loss.png").is_file()


def test_plot_overlays_several_runs(cli, tmp_path):
    pytest.importorskip("matplotlib")
    for name, lr in (("a", "0.1"), ("b", "0.05")):
        assert cli("run", *SMALL, "--steps", "4", "--lr", lr, "--out", tmp_path / f"{name}.zarr")[0] == 0
    code, out, _ = cli("plot", tmp_path / "a.zarr", tmp_path / "b.zarr", "--out", tmp_path / "figs")
    assert code == 0 and "train_loss.png" in out


def test_plugins_lists_and_describes(cli):
    code, out, _ = cli("plugins", "--json")
    info = json.loads(out)
    assert code == 0 and "grad-norm" in info["plugins"] and "mlp" in info["models"]
    assert info["plugins"]["train-metrics"]["always_on"]
    code, out, _ = cli("plugins", "grad-norm", "--json")
    desc = json.loads(out)
    assert {o["name"] for o in desc["options"]} >= {"schedule", "every", "data", "params"}
    assert "grad_norm" in {o["name"] for o in desc["outputs"]}
    code, out, _ = cli("plugins", "grad-norm")
    assert code == 0 and "every" in out


def test_measure_a_runs_checkpoints(cli, tmp_path):
    assert cli("run", *SMALL, "--epochs", "2", "--out", tmp_path / "r.zarr")[0] == 0
    code, out, err = cli("measure", tmp_path / "r.zarr", "--plugin", "grad-norm", "--checkpoints", "all",
                         "--out", tmp_path / "m.zarr")
    assert code == 0, err
    from lscape.store import RunReader

    steps = RunReader(tmp_path / "m.zarr").read("grad-norm")["step"].tolist()
    assert steps == [4, 8]  # a checkpoint after each epoch of 4 steps


BAD = [
    (["run", "--plugin", "no-such-plugin"], "unknown plugin 'no-such-plugin'"),
    (["run", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", "--data", "nope"], "unknown data 'nope'"),
    (["run", "--loss", "hinge"], "unknown loss 'hinge'"),
    (["run", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["run", "--steps", "-3"], "--steps must be a positive integer"),
    (["run", "--steps", "0"], "--steps must be a positive integer"),
    (["run", "--batch-size", "0"], "--batch-size must be a positive integer or 'full'"),
    (["run", "--batch-size", "many"], "--batch-size must be a positive integer or 'full'"),
    (["run", "--lr", "fast"], "--lr must be a number"),
    (["run", "--lr", "-1"], "--lr must be a positive"),
    (["run", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["run", "--epochs", "2", "--steps", "3"], "not both"),
    (["run", "--config", "missing.toml"], "missing.toml does not exist"),
    (["run", "--config", "bad.toml"], "is not valid TOML"),
    (["run", "--config", "unknown_key.toml"], "unknown key 'learning_rate'"),
    (["run", "-o", "grad-norm.nope=1"], "unknown option 'grad-norm.nope'"),
    (["run", "-o", "grad-norm.every=x"], "bad value for grad-norm.every"),
    (["run", "-o", "garbage"], "expected PLUGIN.KEY=VALUE"),
    (["run", "-o", "grad-norm.schedule=weekly"], "bad schedule 'weekly'"),
    (["run", "--model-opt", "depth=3"], "has no option 'depth'"),
    (["run", "--model-opt", "novalue"], "expected KEY=VALUE"),
    (["run", "--time-limit", "soon"], "bad duration 'soon'"),
    (["run", "--lr-schedule", "wiggly"], "bad --lr-schedule"),
    (["run", "--device", "tpu"], "--device must be cpu or cuda"),
    (["run", "--disable", "nothing"], "cannot disable unknown plugin"),
    (["run", "--model", "os:nope"], "has no attribute 'nope'"),
    (["run", "--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["run", "--resume", "nowhere.zarr"], "no run store at nowhere.zarr"),
    (["show", "nowhere.zarr"], "no run store at nowhere.zarr"),
    (["plot", "nowhere.zarr"], "no run store at nowhere.zarr"),
    (["plugins", "nope"], "unknown plugin 'nope'"),
    (["run", "--no-such-flag"], "No such option"),
    (["run", "--plugin", "hessian-exact", "--model-opt", "widths=256,256"], "above max_params=20000"),
    (["run", "--plugin", "diffusion"], "add --plugin trajectory"),
    (["run", "--plugin", "sam", "--plugin", "entropy-sgd"], "both own the training step"),
    (["run", "--loss", "torch.nn:MSELoss", "--data", "synthetic"], "do not fit together"),
    (["measure", "nowhere.zarr", "--plugin", "grad-norm"], "no run store"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(cli, tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("lr = [unclosed\n")
    (tmp_path / "unknown_key.toml").write_text("learning_rate = 0.1\n")
    before = set(os.listdir(tmp_path))
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert message in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err + out
    assert set(os.listdir(tmp_path)) == before  # nothing created, in particular no runs/


def test_existing_out_is_not_overwritten(cli, tmp_path):
    assert cli("run", *SMALL, "--steps", "2", "--out", tmp_path / "r.zarr")[0] == 0
    before = sorted(p.name for p in (tmp_path / "r.zarr").rglob("*"))
    code, _, err = cli("run", *SMALL, "--steps", "2", "--out", tmp_path / "r.zarr")
    assert code == 2 and "already exists" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "r.zarr").rglob("*")) == before


def test_failing_plugin_exits_nonzero_naming_it(cli, tmp_path):
    code, out, err = cli("run", *SMALL, "--steps", "5", "--plugin", "helpers_plugins", "--out", tmp_path / "f.zarr")
    assert code == 1 and "plugin 'failing' failed" in err and "Traceback" not in err


def test_real_process_bad_input_has_no_traceback(tmp_path):
    proc = run_subprocess("run", "--steps", "-1", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_trace_plugins_prints_hook_calls(tmp_path):
    proc = run_subprocess("run", *SMALL, "--steps", "2", "--out", tmp_path / "t.zarr", cwd=tmp_path,
                          env={"LSCAPE_TRACE_PLUGINS": "1", "PYTHONPATH": os.path.dirname(__file__)})
    assert proc.returncode == 0, proc.stderr
    assert "[lscape trace] on_step_end" in proc.stderr and "[lscape trace] register_models" in proc.stderr
