"""A run store written by lscape 0.1 (before the engine was split into the event driver,
checkpoint and resume modules) still opens: ``show``, ``plot``, ``measure`` and ``--resume``.

``tests/fixtures/store_v0_1`` was written by the old code with
``lscape run --data synthetic --data-opt n=128 --data-opt dim=8 --data-opt classes=3
--model-opt widths=16 --batch-size 32 --steps 6 --plugin sharpness --plugin grad-norm
--checkpoint-schedule every:3`` (checkpoints at steps 1, 4 and 6; 4 steps an epoch).
"""

import json
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "store_v0_1"


@pytest.fixture
def old_store(tmp_path):
    copy = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_fixture_is_the_old_code_s_store():
    attrs = json.loads((FIXTURE / "zarr.json").read_text())["attributes"]
    assert attrs["lscape_version"] == "0.1.0" and attrs["status"] == "completed" and attrs["steps_done"] == 6
    assert sorted(p.name for p in (FIXTURE / "checkpoints").iterdir() if p.is_dir()) == \
        ["step_000000001", "step_000000004", "step_000000006"]


def test_old_store_shows(cli, old_store):
    code, out, err = cli("show", old_store, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["status"] == "completed"
    assert info["groups"]["train"]["loss"]["shape"] == [6]
    assert info["groups"]["grad-norm"]["grad_norm"]["shape"] == [6]
    assert info["groups"]["sharpness"]["lambda_max"]["shape"] == [1]
    code, out, _ = cli("show", old_store)
    assert code == 0 and "step 6 (step_000000006)" in out


def test_old_store_plots(cli, old_store, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = cli("plot", old_store, "--out", tmp_path / "figs")
    assert code == 0, err
    assert (tmp_path / "figs" / "train_loss.png").is_file()


def test_old_store_measures_its_checkpoints(cli, old_store, tmp_path):
    from lscape.store import RunReader

    code, _, err = cli("measure", old_store, "--plugin", "sharpness", "--checkpoints", "all",
                       "--out", tmp_path / "m.zarr")
    assert code == 0, err
    got = RunReader(tmp_path / "m.zarr").read("sharpness")
    assert got["step"].tolist() == [1, 4, 6]
    assert all(v > 0 for v in got["lambda_max"].tolist())


def test_old_store_resumes_and_extends(cli, old_store):
    from lscape.store import RunReader

    before = RunReader(old_store).read("train")["loss"].tolist()
    code, _, err = cli("run", "--resume", old_store, "--steps", "8", "--no-progress")
    assert code == 0, err
    reader = RunReader(old_store)
    assert reader.attrs["status"] == "completed" and reader.attrs["steps_done"] == 8
    train = reader.read("train")
    assert train["step"].tolist() == list(range(8))
    assert train["loss"].tolist()[:6] == before  # the old rows are kept, two new ones appended
    assert reader.read("grad-norm")["step"].tolist() == list(range(8))
    assert reader.attrs["extensions"][-1]["steps"] == 8
    assert reader.attrs["extensions"][-1]["from"]["steps"] == 6
    latest = json.loads((old_store / "checkpoints" / "zarr.json").read_text())["attributes"]["latest"]
    assert latest == "step_000000008"
