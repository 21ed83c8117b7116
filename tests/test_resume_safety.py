"""`--resume` never loses a run (issue 21): it continues from the newest intact checkpoint,
cutting the rows after it; it refuses in one line, touching nothing, what it cannot continue
(records without a usable checkpoint, a foreign zarr group, a measurement store, a store that
lost a chunk, a length shorter than what was done, a config that no longer fits its
checkpoint); a damaged lock record does not block it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader

SMALL = {"data": "synthetic", "data_opts": {"n": 128, "dim": 8, "classes": 3}, "model_opts": {"widths": 16},
         "batch_size": 32, "progress": False}
FIXTURE = Path(__file__).parent / "fixtures" / "store_v0_1"


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A completed 20-step run with checkpoints at steps 1, 6, 11, 16 and 20."""
    path = tmp_path_factory.mktemp("done") / "done.zarr"
    lscape.run(**SMALL, steps=20, checkpoint_schedule="every:5", out=str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its content hash and mtime: what "touch nothing" means."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = hashlib.sha1(f.read_bytes()).hexdigest() + str(f.stat().st_mtime_ns)
    return out


def _refused(cli, store: Path, *args: str, match: str) -> str:
    """`lscape run --resume STORE ARGS` is one line, exit 2, and the store is untouched."""
    before = _snapshot(store)
    code, _, err = cli("run", "--resume", str(store), *args, "--no-progress")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert _snapshot(store) == before, "a refused resume touched the store"
    return lines[0]


def _latest(store: Path) -> str:
    return json.loads((store / "checkpoints" / "zarr.json").read_text())["attributes"]["latest"]


def _assert_resumed_from(store: Path, reference: Path, err: str, step: int) -> None:
    assert f"(step {step})" in err, err
    a, b = RunReader(store).read("train"), RunReader(reference).read("train")
    np.testing.assert_array_equal(a["step"], np.arange(20))
    np.testing.assert_array_equal(a["loss"], b["loss"])  # the cut rows were recorded again, exactly
    assert RunReader(store).attrs["status"] == "completed"


# -- 1. the newest intact checkpoint, never step 0 over records ----------------------------


def _delete_latest(store: Path) -> None:
    shutil.rmtree(store / "checkpoints" / _latest(store))


def _damage_latest_bytes(store: Path) -> None:
    for chunk in (store / "checkpoints" / _latest(store) / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(os.urandom(64))


def _damage_latest_metadata(store: Path) -> None:
    (store / "checkpoints" / _latest(store) / "zarr.json").write_text("garbage{")


def _latest_names_nothing(store: Path) -> None:
    meta = json.loads((store / "checkpoints" / "zarr.json").read_text())
    meta["attributes"]["latest"] = "step_000000099"
    (store / "checkpoints" / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize("damage,step", [(_delete_latest, 16), (_damage_latest_bytes, 16),
                                         (_damage_latest_metadata, 16), (_latest_names_nothing, 20)])
def test_resume_continues_from_the_newest_intact_checkpoint(cli, tmp_path, done, damage, step):
    store = _copy(done, tmp_path / "s.zarr")
    damage(store)
    code, _, err = cli("run", "--resume", str(store), "--no-progress")
    assert code == 0, err
    _assert_resumed_from(store, done, err, step)
    assert "step 0" not in err
    # the resumed run's checkpoints are consistent again: the latest is its last step
    assert _latest(store) == "step_000000020"
    assert lscape.run(resume=str(store), progress=False).status == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("garbage", [b"garbage{", bytes(range(128, 256))], ids=["text", "random-bytes"])
def test_damaged_checkpoints_group_metadata_does_not_block_resuming(cli, tmp_path, done, garbage):
    store = _copy(done, tmp_path / "s.zarr")
    (store / "checkpoints" / "zarr.json").write_bytes(garbage)
    _delete_latest_named = store / "checkpoints" / "step_000000020"
    shutil.rmtree(_delete_latest_named)
    code, _, err = cli("run", "--resume", str(store), "--no-progress")
    assert code == 0, err
    _assert_resumed_from(store, done, err, 16)
    json.loads((store / "checkpoints" / "zarr.json").read_text())  # repaired


def _no_checkpoints(store: Path) -> None:
    shutil.rmtree(store / "checkpoints")


def _every_checkpoint_damaged(store: Path) -> None:
    for chunk in (store / "checkpoints").rglob("c/*"):
        chunk.write_bytes(b"garbage{")


@pytest.mark.parametrize("damage", [_no_checkpoints, _every_checkpoint_damaged])
def test_records_without_a_usable_checkpoint_are_refused_not_retrained(cli, tmp_path, done, damage):
    store = _copy(done, tmp_path / "s.zarr")
    damage(store)
    line = _refused(cli, store, match="no usable checkpoint")
    assert "20 recorded steps" in line


def test_a_measurement_store_is_never_resumed(cli, tmp_path, done):
    out = tmp_path / "m.zarr"
    lscape.measure(str(done), ["grad-norm"], out=str(out))
    _refused(cli, out, match="measurement store")
    with pytest.raises(UsageError, match="measurement store"):
        lscape.run(resume=str(out), progress=False)


# -- 2. a foreign zarr group ---------------------------------------------------------------


def _lscape_like_attrs() -> dict:
    return {"lscape_version": "0.1.0", "status": "completed", "start_time": "2026-01-01T00:00:00+00:00",
            "config": {"model": "mlp", "data": "synthetic", "steps": 5}}


def test_a_zarr_v2_group_with_lscape_like_attributes_is_refused(cli, tmp_path):
    path = tmp_path / "v2.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs.update(_lscape_like_attrs())
    group.create_array("loss", shape=(3,), dtype="f8")[:] = 1.0
    _refused(cli, path, match="zarr v2 group")


@pytest.mark.parametrize("attrs", [
    {"lscape_version": "0.1.0", "status": "completed"},  # no config: the default experiment would be trained
    {**_lscape_like_attrs(), "config": ["model", "mlp"]},  # a config that is not a table
    {**_lscape_like_attrs(), "config": "model=mlp"},
])
def test_a_v3_group_without_lscape_run_attributes_is_refused(cli, tmp_path, attrs):
    path = tmp_path / "g.zarr"
    zarr.open_group(str(path), mode="w").attrs.update(attrs)
    _refused(cli, path, match="")


# -- 3. a length shorter than what was done: --steps and --epochs alike ---------------------


@pytest.mark.parametrize("length", [["--steps", "7"], ["--epochs", "1"]])
def test_a_length_below_the_steps_done_is_refused_for_steps_and_epochs(cli, tmp_path, done, length):
    store = _copy(done, tmp_path / "s.zarr")
    line = _refused(cli, store, *length, match="length can only be raised")
    assert line.startswith(f"error: {length[0]} {length[1]}") and "than the 20 steps" in line
    # a store of no set length (a --time-limit run) that did 20 steps: shorter than done is refused too
    attrs = json.loads((store / "zarr.json").read_text())
    attrs["attributes"]["total_steps"] = None
    (store / "zarr.json").write_text(json.dumps(attrs))
    _refused(cli, store, *length, match="is fewer than the 20 steps")


# -- 5. a lost chunk -----------------------------------------------------------------------


@pytest.mark.parametrize("array", ["train/loss", "train/step", "grad-norm/grad_norm"])
def test_a_lost_chunk_is_refused_naming_it(cli, tmp_path, done, array):
    store = _copy(done, tmp_path / "s.zarr")
    (store / array / "c" / "0").unlink()
    _refused(cli, store, "--steps", "25", match=f"{array}/c/0 is missing")


def test_arrays_keep_their_chunks_even_when_they_hold_only_fill_values(tmp_path):
    from lscape.store import RunStore

    store = RunStore.create(str(tmp_path / "f.zarr"), {"lscape_version": "x"})
    writer = store.group("g")
    for step in range(3):
        writer.append(step, maybe=float("nan"))
    store.close()
    assert (tmp_path / "f.zarr" / "g" / "maybe" / "c" / "0").is_file()  # an all-NaN chunk is a chunk


# -- 6. refusals touch nothing; a damaged lock record is taken over --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("garbage", [b"garbage{", bytes(range(128, 256))], ids=["text", "random-bytes"])
def test_a_damaged_lock_record_is_taken_over_with_a_message(cli, tmp_path, done, garbage):
    store = _copy(done, tmp_path / "s.zarr")
    (store / "lock" / "zarr.json").write_bytes(garbage)
    assert RunReader(store).status == "completed"  # readers are not blocked either
    code, _, err = cli("run", "--resume", str(store), "--steps", "22", "--no-progress")
    assert code == 0, err
    assert "lock record" in err and "taking it over" in err
    assert RunReader(store).writer()["released"] is True


@pytest.mark.slow
def test_the_old_store_fixture_still_resumes_as_before(tmp_path):
    store = _copy(FIXTURE, tmp_path / "old.zarr")
    result = lscape.run(resume=str(store), steps=8, progress=False)
    assert result.status == "completed" and result.steps == 8


def test_a_config_that_no_longer_fits_its_checkpoint_is_one_line(cli, tmp_path, done):
    store = _copy(done, tmp_path / "s.zarr")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["config"]["model_opts"] = {"widths": 24}
    (store / "zarr.json").write_text(json.dumps(meta))
    line = _refused(cli, store, match="does not fit the model its config builds")
    assert "of another shape" in line and "step_000000020" in line


def test_measure_of_a_store_whose_latest_names_nothing_measures_the_newest(tmp_path, done):
    store = _copy(done, tmp_path / "s.zarr")
    _latest_names_nothing(store)
    result = lscape.measure(str(store), ["grad-norm"], out=str(tmp_path / "m.zarr"))
    assert result.status == "completed"
    assert RunReader(result.path).read("grad-norm")["step"].tolist() == [20]
