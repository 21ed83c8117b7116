"""The training engine end to end, on small real workloads."""

import math

import numpy as np
import pytest
import torch

import lscape
from lscape.config import RunConfig
from lscape.engine import Engine
from lscape.errors import PluginError, UsageError
from lscape.manager import get_plugin_manager
from lscape.store import RunReader

SMALL = dict(data="synthetic", data_opts={"n": 128, "dim": 8, "classes": 3}, model_opts={"widths": 16},
             batch_size=32, progress=False)


def run(**kw):
    return lscape.run(**{**SMALL, **kw})


def test_run_writes_train_and_probe_groups(tmp_path):
    res = run(steps=12, out=str(tmp_path / "a.zarr"))
    assert res.status == "completed" and res.steps == 12
    r = RunReader(res.path)
    train = r.read("train")
    assert train["step"].tolist() == list(range(12))
    assert np.all(np.isfinite(train["loss"]))
    assert train["epoch"].tolist() == [0] * 4 + [1] * 4 + [2] * 4  # 128 samples, batch 32
    gn = r.read("grad-norm")
    assert gn["step"].tolist() == list(range(12)) and np.all(gn["grad_norm"] > 0)
    assert r.attrs["status"] == "completed"
    assert r.attrs["config"]["lr"] == 0.1 and r.attrs["seed"] == 0
    assert r.attrs["torch_version"] == torch.__version__


def test_same_seed_gives_identical_numbers_and_another_seed_does_not(tmp_path):
    a = RunReader(run(steps=10, out=str(tmp_path / "a.zarr")).path).read("train")["loss"]
    b = RunReader(run(steps=10, out=str(tmp_path / "b.zarr")).path).read("train")["loss"]
    c = RunReader(run(steps=10, seed=1, out=str(tmp_path / "c.zarr")).path).read("train")["loss"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_full_batch_is_gradient_descent(tmp_path):
    res = run(steps=5, batch_size="full", out=str(tmp_path / "gd.zarr"))
    train = RunReader(res.path).read("train")
    assert train["epoch"].tolist() == [0, 1, 2, 3, 4]
    # GD with a small step on a convex-ish start decreases the full loss monotonically
    assert np.all(np.diff(train["loss"]) < 0)


def test_grad_norm_matches_a_plain_loop(tmp_path):
    """The engine's first step is exactly a plain PyTorch step on the same batch."""
    res = run(steps=1, out=str(tmp_path / "x.zarr"), plugins=["grad-norm"])
    gn = RunReader(res.path).read("grad-norm")["grad_norm"][0]
    eng = Engine(lscape.api.make_config(None, **SMALL, steps=1, out=str(tmp_path / "y.zarr")))
    ctx = eng.prepare()
    batch, _, _ = ctx.stream.next()
    loss = ctx.loss_fn(ctx.model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, list(ctx.model.parameters()))
    assert gn == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in grads))), rel=1e-6)


def test_step_lr_schedule_and_regime(tmp_path):
    res = run(epochs=3, lr=0.4, lr_schedule="step:1,2:0.5", out=str(tmp_path / "s.zarr"))
    lr = RunReader(res.path).read("train")["lr"]
    assert lr.tolist() == [0.4] * 4 + [0.2] * 4 + [0.1] * 4
    regime = {"0": {"lr": 0.3}, "2": {"lr": 0.03, "momentum": 0.5}}
    res = run(epochs=3, regime=regime, out=str(tmp_path / "r.zarr"))
    lr = RunReader(res.path).read("train")["lr"]
    assert lr.tolist() == [0.3] * 8 + [0.03] * 4


def test_cosine_schedule_decays_to_zero(tmp_path):
    res = run(steps=8, lr_schedule="cosine", out=str(tmp_path / "c.zarr"))
    lr = RunReader(res.path).read("train")["lr"]
    assert lr[0] == pytest.approx(0.1) and np.all(np.diff(lr) < 0)
    assert lr[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 7 / 8)))


def test_time_limit_stops_the_run(tmp_path):
    res = run(time_limit=1.0, out=str(tmp_path / "t.zarr"))
    assert res.status == "completed" and res.steps > 0
    assert RunReader(res.path).read("train")["time"][-1] < 5.0


def test_eval_metrics_recorded_at_epoch_end(tmp_path):
    res = run(epochs=2, out=str(tmp_path / "e.zarr"))
    train = RunReader(res.path).read("train")
    measured = ~np.isnan(train["eval_loss"])
    assert measured.tolist() == [False, False, False, True] * 2
    assert np.all((train["eval_accuracy"][measured] >= 0) & (train["eval_accuracy"][measured] <= 1))


def test_factories_by_module_path(tmp_path):
    res = lscape.run(model="helpers_workloads:linear", data="helpers_workloads:linear_regression",
                     loss="helpers_workloads:l1_loss", optimizer="helpers_workloads:PlainSGD", lr=0.3,
                     batch_size=16, steps=80, progress=False, out=str(tmp_path / "m.zarr"))
    train = RunReader(res.path).read("train")
    assert train["loss"][-8:].mean() < 0.5 * train["loss"][:8].mean()
    assert "eval_loss" not in train  # a plain Dataset has no eval split


def test_torch_loss_class_is_instantiated(tmp_path):
    res = run(steps=3, loss="torch.nn:CrossEntropyLoss", out=str(tmp_path / "l.zarr"))
    assert res.status == "completed"


def test_nan_loss_is_recorded_and_stops_the_run(tmp_path):
    # four forward passes are fine (one is the engine's set-up check), the fifth gives inf
    res = lscape.run(model="helpers_workloads:exploding", model_opts={"after": 4}, data="synthetic",
                     data_opts={"n": 64, "dim": 8, "classes": 3}, batch_size=16, steps=20, progress=False,
                     out=str(tmp_path / "n.zarr"))
    assert res.status == "diverged"
    r = RunReader(res.path)
    assert r.attrs["status"] == "diverged" and "loss became" in r.attrs["error"]
    loss = r.read("train")["loss"]
    assert len(loss) == 4 and np.isfinite(loss[:3]).all() and not np.isfinite(loss[3])


def test_nan_policy_continue_keeps_going(tmp_path):
    res = lscape.run(model="helpers_workloads:exploding", data="synthetic", data_opts={"n": 64, "dim": 8,
                     "classes": 3}, batch_size=16, steps=6, on_nan="continue", progress=False,
                     out=str(tmp_path / "n.zarr"))
    assert res.status == "completed"
    assert len(RunReader(res.path).read("train")["loss"]) == 6


def test_failing_plugin_is_named_and_data_kept(tmp_path):
    with pytest.raises(PluginError, match="'failing'") as info:
        run(steps=10, plugins=["helpers_plugins", "grad-norm"], out=str(tmp_path / "f.zarr"))
    assert "boom" in str(info.value)
    r = RunReader(tmp_path / "f.zarr")
    assert r.attrs["status"] == "failed" and "boom" in r.attrs["error"]
    assert r.read("failing")["value"].tolist() == [0.0, 1.0]
    assert len(r.read("train")["loss"]) == 2


def test_engine_restores_what_a_probe_changes(tmp_path):
    """A probe that changes parameters, grads, modes and the RNG changes nothing the
    training sees: the losses equal those of a run without it."""
    plain = RunReader(run(steps=8, out=str(tmp_path / "p.zarr")).path).read("train")["loss"]
    cfg = lscape.api.make_config(None, **SMALL, steps=8, plugins=["grad-norm", "meddler"], out=str(tmp_path / "m.zarr"))
    res = Engine(cfg, pm=get_plugin_manager(["helpers_plugins"])).run()
    r = RunReader(res.path)
    np.testing.assert_array_equal(plain, r.read("train")["loss"])
    assert r.read("meddler")["touched"].tolist() == [1.0] * 8


def test_module_plugins_get_run_events_only_when_active(tmp_path):
    import helpers_plugins

    helpers_plugins.EVENTS.clear()
    run(steps=2, out=str(tmp_path / "a.zarr"))
    assert helpers_plugins.EVENTS == []
    run(steps=2, plugins=["helpers_plugins"], plugin_options={"failing": {"at_step": 99}},
        out=str(tmp_path / "b.zarr"))
    assert helpers_plugins.EVENTS == ["run_start", "run_end:completed"]
    # activating one probe of a module does not activate the module's own run events
    helpers_plugins.EVENTS.clear()
    Engine(lscape.api.make_config(None, **SMALL, steps=2, plugins=["meddler"], out=str(tmp_path / "c.zarr")),
           pm=get_plugin_manager(["helpers_plugins"])).run()
    assert helpers_plugins.EVENTS == []


def test_two_step_owners_are_a_clear_error(tmp_path):
    from lscape import StepOwner
    from lscape.manager import build_registry, get_plugin_manager

    class A(StepOwner):
        name = "owner-a"

    class B(StepOwner):
        name = "owner-b"

    pm = get_plugin_manager()

    class Mod:
        @staticmethod
        @lscape.hookimpl
        def register_step_owners(register):
            register(A)
            register(B)

    pm.register(Mod, name="owners")
    cfg = lscape.api.make_config(None, **SMALL, steps=2, plugins=["owner-a", "owner-b"], out=str(tmp_path / "o.zarr"))
    with pytest.raises(UsageError, match="both own the training step"):
        Engine(cfg, pm=pm).prepare()
    assert not (tmp_path / "o.zarr").exists()


def test_probe_options_every_and_schedule(tmp_path):
    res = run(steps=10, plugin_options={"grad-norm": {"every": 3}}, out=str(tmp_path / "o.zarr"))
    r = RunReader(res.path)
    assert r.read("grad-norm")["step"].tolist() == [0, 3, 6, 9]
    assert r.group_attrs("grad-norm")["schedule"] == "every:3"
    res = run(steps=10, plugin_options={"grad-norm": {"schedule": "at:1,7"}}, out=str(tmp_path / "p.zarr"))
    assert RunReader(res.path).read("grad-norm")["step"].tolist() == [1, 7]


def test_toml_config_with_plugin_tables(tmp_path):
    (tmp_path / "exp.toml").write_text(
        'data = "synthetic"\nsteps = 6\nbatch_size = 32\nprogress = false\n'
        '[data_opts]\nn = 128\ndim = 8\nclasses = 3\n[model_opts]\nwidths = 16\n'
        '[plugins.grad-norm]\nevery = 2\n')
    res = lscape.run(str(tmp_path / "exp.toml"), out=str(tmp_path / "t.zarr"), lr=0.05)
    r = RunReader(res.path)
    assert r.read("grad-norm")["step"].tolist() == [0, 2, 4]
    assert r.attrs["config"]["lr"] == 0.05  # the override wins over the file


def test_digits_default_workload_learns(tmp_path):
    res = lscape.run(epochs=3, progress=False, out=str(tmp_path / "d.zarr"))
    train = RunReader(res.path).read("train")
    acc = train["eval_accuracy"][~np.isnan(train["eval_accuracy"])]
    assert acc[-1] > 0.7


def test_command_line_steps_replace_the_files_epochs(tmp_path):
    (tmp_path / "e.toml").write_text('data = "synthetic"\nepochs = 50\nbatch_size = "full"\n')
    cfg = lscape.api.make_config(str(tmp_path / "e.toml"), steps=3).validate()
    assert cfg.steps == 3 and cfg.epochs is None
    # full batch: checkpoints and evaluations are not taken every single step by default
    assert cfg.checkpoint_schedule == "every:100" and cfg.eval_schedule == "every:10"
