"""--until-loss is the stopping rule: the default length does not cap it silently, a cap
that comes first is said (a line, root attributes), and `lscape compare` warns when runs
are not at matched loss."""

import pytest

import lscape
from lscape.config import RunConfig
from lscape.store import RunReader

TINY = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2}, model_opts={"widths": [8]},
            batch_size=16, progress=False)


@pytest.mark.slow
def test_until_loss_without_a_length_runs_to_the_large_stated_cap(tmp_path):
    from lscape.engine import Engine

    assert RunConfig().total_epochs == RunConfig.DEFAULT_EPOCHS == 10
    assert RunConfig(until_loss=0.1).total_epochs == RunConfig.UNTIL_LOSS_EPOCHS == 1000
    assert RunConfig(until_loss=0.1, epochs=3).total_epochs == 3  # an explicit cap is the cap
    assert "1000 epochs" in lscape.config.run_options()["until_loss"].help
    engine = Engine(lscape.api.make_config(out=str(tmp_path / "p.zarr"), until_loss=0.1, **TINY))
    ctx = engine.prepare()
    assert ctx.total_steps == 1000 * ctx.steps_per_epoch


@pytest.mark.slow
def test_a_cap_that_comes_first_is_said_and_recorded(tmp_path, capsys):
    run = lscape.run(steps=5, until_loss=1e-9, until_loss_every=3, out=str(tmp_path / "c.zarr"), **TINY)
    assert run.status == "completed" and run.steps == 5
    assert "--steps 5" in run.note and "came before --until-loss 1e-09" in run.note
    assert "came before --until-loss" in capsys.readouterr().err
    attrs = RunReader(run.path).attrs
    assert attrs["until_loss_reached"] is False
    assert attrs["stopped_by"]["cap"] == "--steps 5" and attrs["stopped_by"]["step"] == 4
    # the final step is checked too, though the every-3 schedule would not have
    assert RunReader(run.path).read("until-loss")["step"].tolist() == [2, 4]
    reached = lscape.run(steps=5, until_loss=1e9, out=str(tmp_path / "r.zarr"), **TINY)
    assert reached.note is None and reached.steps == 1
    assert RunReader(reached.path).attrs["until_loss_reached"] is True


def test_cli_says_the_cap_came_first(cli):
    code, _, err = cli("run", "--data", "synthetic", "--data-opt", "n=64", "--model-opt", "widths=8",
                       "--batch-size", "16", "--steps", "3", "--until-loss", "1e-9", "--out", "c.zarr", "--no-progress")
    assert code == 0, err
    assert "the cap (--steps 3) came before --until-loss 1e-09" in err


@pytest.mark.slow
def test_compare_warns_when_runs_are_not_at_matched_loss(cli, tmp_path):
    a = lscape.run(steps=3, until_loss=1e9, out="a.zarr", **TINY).path  # reached at once
    b = lscape.run(steps=3, until_loss=1e9, out="b.zarr", **TINY).path
    capped = lscape.run(steps=3, until_loss=1e-9, out="capped.zarr", **TINY).path
    code, _, err = cli("compare", a, b)
    assert code == 0 and "warning" not in err, err  # the same target, both reached
    code, _, err = cli("compare", a, capped, "--json")
    assert code == 0
    assert "capped did not reach --until-loss 1e-09" in err and "different --until-loss targets" in err
    far = lscape.run(steps=1, out="far.zarr", **{**TINY, "data_opts": {"n": 64, "dim": 4, "classes": 2}}).path
    near = lscape.run(steps=60, lr=0.5, out="near.zarr", **TINY).path
    code, _, err = cli("compare", far, near)
    assert code == 0 and "not at matched loss" in err and "--until-loss" in err, err
