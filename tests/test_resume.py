"""Checkpoints and exact resume: a run killed with SIGKILL and resumed stores exactly what an
uninterrupted run stores; SIGTERM/SIGINT flush and mark the run interrupted."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import lscape
from lscape.store import RunReader

ARGS = ["--data", "synthetic", "--data-opt", "n=256", "--data-opt", "dim=8", "--data-opt", "classes=3",
        "--model-opt", "widths=32", "--batch-size", "16", "--momentum", "0.9", "--lr-schedule", "cosine",
        "--checkpoint-schedule", "every:25", "--no-progress"]


def _start(out, steps, cwd):
    return subprocess.Popen([sys.executable, "-m", "lscape", "run", *ARGS, "--steps", str(steps), "--out", str(out)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _latest_checkpoint_step(path):
    try:
        group = zarr.open_group(str(path), mode="r")["checkpoints"]
        return int(group[group.attrs["latest"]].attrs["step"])
    except Exception:
        return -1


def _wait_for_checkpoint(proc, path, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if _latest_checkpoint_step(path) >= at_least:
            return True
        time.sleep(0.05)
    return False


def _assert_same_records(a, b):
    ra, rb = RunReader(a), RunReader(b)
    groups = [g for g in ra.groups() if g != "checkpoints"]
    assert groups == [g for g in rb.groups() if g != "checkpoints"]
    for g in groups:
        da, db = ra.read(g), rb.read(g)
        assert sorted(da) == sorted(db), g
        for name in da:
            if name == "time":
                continue  # wall clock
            np.testing.assert_array_equal(da[name], db[name], err_msg=f"{g}/{name}")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps = 300
    killed = tmp_path / "killed.zarr"
    proc = _start(killed, steps, tmp_path)
    assert _wait_for_checkpoint(proc, killed, 50), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunReader(killed).attrs["status"] == "running"  # killed part-way: nothing marked it
    done = subprocess.run([sys.executable, "-m", "lscape", "run", "--resume", str(killed), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert RunReader(killed).attrs["status"] == "completed"
    reference = tmp_path / "reference.zarr"
    ref = subprocess.run([sys.executable, "-m", "lscape", "run", *ARGS, "--steps", str(steps), "--out",
                          str(reference)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    assert len(RunReader(reference).read("train")["loss"]) == steps
    _assert_same_records(killed, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_flush_and_mark_interrupted(tmp_path, sig):
    out = tmp_path / "s.zarr"
    proc = _start(out, 100000, tmp_path)
    assert _wait_for_checkpoint(proc, out, 25)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    r = RunReader(out)
    assert r.attrs["status"] == "interrupted"
    n = len(r.read("train")["loss"])
    assert n >= 25 and len(r.read("grad-norm")["grad_norm"]) == n  # flushed up to the signal


def test_resume_of_an_in_process_run_continues_to_the_end(tmp_path):
    out = str(tmp_path / "r.zarr")
    first = lscape.run(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2}, batch_size=16, steps=6,
                       checkpoint_schedule="every:3", progress=False, out=out)
    assert first.status == "completed"
    # a completed run resumes to a no-op that keeps every row
    again = lscape.run(resume=out, progress=False)
    assert again.status == "completed" and len(RunReader(out).read("train")["loss"]) == 6
