"""One writer per store, consistent live reads, and the run states a fault leaves behind:
a second writer is refused in one line, a dead writer's lock is stale and taken over, a
reader polling a live writer always sees a consistent prefix, a run killed before its first
checkpoint resumes from step 0, an old error goes on a successful resume, a killed `measure`
is measured again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import lscape
from lscape.errors import UsageError
from lscape.store import RunReader, RunStore

SMALL = dict(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 3}, model_opts={"widths": 8},
             batch_size=16, progress=False)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "r.zarr"
    first = RunStore.create(path, {"lscape_version": "test"})
    with pytest.raises(UsageError, match=rf"is being written by pid {os.getpid()} on "):
        RunStore.open(path)
    first.close()
    again = RunStore.open(path)  # released: the next writer gets it
    assert again.lock is not None
    again.close()


def test_lock_of_a_killed_writer_is_stale_and_taken_over(tmp_path, capsys):
    path = tmp_path / "r.zarr"
    code = (f"from lscape.store import RunStore; import os, signal; "
            f"RunStore.create({str(path)!r}, {{'lscape_version': 'test'}}); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -signal.SIGKILL
    holder = RunReader(path).writer()
    assert holder["pid"] != os.getpid() and holder["alive"] is False and holder["released"] is False
    store = RunStore.open(path)  # no "being written": its process is gone
    assert "which is gone: taking the store over" in capsys.readouterr().err
    assert RunReader(path).writer()["pid"] == os.getpid()
    store.close()
    assert RunReader(path).writer()["alive"] is False


def test_two_runs_racing_for_one_out_one_wins_the_other_gets_one_line(tmp_path):
    out = tmp_path / "race.zarr"
    results: list[object] = []

    def create():
        try:
            results.append(RunStore.create(out, {"lscape_version": "test"}))
        except UsageError as e:
            results.append(e)

    for _ in range(5):
        results.clear()
        threads = [threading.Thread(target=create) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r for r in results if isinstance(r, UsageError)]
        stores = [r for r in results if isinstance(r, RunStore)]
        assert len(stores) == 1 and len(errors) == 1
        assert "already exists" in str(errors[0]) and "\n" not in str(errors[0])
        stores[0].close()
        import shutil

        shutil.rmtree(out)


def _fork(body) -> int:
    """Run ``body()`` in a forked copy of this process (no interpreter start-up); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def test_resume_while_the_run_is_running_is_refused(cli, tmp_path):
    out = tmp_path / "live.zarr"
    pid = _fork(lambda: lscape.run(**SMALL, steps=10**6, checkpoint_schedule="every:20", out=str(out)))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints").exists():
            time.sleep(0.02)
        code, _, err = cli("run", "--resume", str(out))
        assert code == 2, err
        assert f"is being written by pid {pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    assert RunReader(out).attrs["status"] == "interrupted"  # the refused resume wrote nothing


WRITER = textwrap.dedent("""
    import os, sys, numpy as np
    from lscape.options import Output
    from lscape.store import RunStore
    store = RunStore.create(sys.argv[1], {"lscape_version": "test", "status": "running"})
    a = store.group("a", [Output("v", dims=("k",))])
    b = store.group("probe/b")
    a.flush_seconds = b.flush_seconds = 1e9
    step, written = 0, 0
    while not os.path.exists(sys.argv[2]):
        a.append(step, x=2.0 * step, v=np.arange(3.0) + step, **({"late": -float(step)} if step >= 40 else {}))
        if step % 3 == 0:
            b.append(step, y=float(step) ** 0.5)
        step += 1
        written += 1
        if written % 4 == 0:
            a.flush()
            b.flush()
        if written == 300:  # what a resume does: cut back, then write the same rows again
            a.truncate(150); b.truncate(50)
            step = 150
    store.close()
""")


def _check_prefix(d_a, d_b):
    n = len(d_a["step"])
    for name, value in d_a.items():
        assert value.shape[0] == n, name
    if n == 0 or len(d_b["step"]) == 0:  # the first flush is under way: no rows, and no array is longer
        assert all(v.shape[0] == 0 for v in d_b.values()) or n > 0
        return n
    np.testing.assert_array_equal(d_a["step"], np.arange(n))
    np.testing.assert_array_equal(d_a["x"], 2.0 * np.arange(n))
    np.testing.assert_array_equal(d_a["v"], np.arange(3.0)[None, :] + np.arange(n)[:, None])
    if "late" in d_a:
        late = d_a["late"]
        assert np.isnan(late[:40]).all() and np.array_equal(late[40:], -np.arange(40, n))
    m = len(d_b["step"])
    assert all(v.shape[0] == m for v in d_b.values())
    np.testing.assert_array_equal(d_b["step"], 3 * np.arange(m))
    np.testing.assert_array_equal(d_b["y"], np.sqrt(3.0 * np.arange(m)))
    return n


def test_reader_polling_a_live_writer_always_sees_a_consistent_prefix(tmp_path):
    xr = pytest.importorskip("xarray")
    path, stop = tmp_path / "live.zarr", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(stop)], stderr=subprocess.PIPE, text=True)
    polls, seen, reader = 0, set(), None
    try:
        while polls < 200:
            assert proc.poll() is None, proc.stderr.read()
            if reader is None:
                try:
                    reader = RunReader(path)
                except UsageError:  # not created yet
                    continue
            try:
                reader.root["probe/b"]
            except KeyError:  # the second group is not created yet
                continue
            n = _check_prefix(reader.read("a"), reader.read("probe/b"))
            if polls % 4 == 0:
                ds = reader.to_xarray("a")  # never "conflicting sizes for dimension 'step'"
                assert list(ds["step"].values) == list(range(ds.sizes["step"]))
                assert ds.sizes["step"] == 0 or ds["v"].dims == ("step", "k")
            seen.add(n)
            polls += 1
    finally:
        stop.touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert len(seen) > 20  # the reader really watched the store grow
    _check_prefix(RunReader(path).read("a"), RunReader(path).read("probe/b"))


def test_run_killed_before_its_first_checkpoint_resumes_from_step_zero(tmp_path):
    ref = lscape.run(**SMALL, steps=8, checkpoint_schedule="every:3", out=str(tmp_path / "ref.zarr"))
    out = str(tmp_path / "early.zarr")

    def killed_at_step_0():
        from lscape import hookimpl
        from lscape.api import make_config
        from lscape.engine import Engine

        class Kill:
            @hookimpl
            def on_step_end(self, ctx, state):
                os.kill(os.getpid(), signal.SIGKILL)  # step 0, before its checkpoint

        engine = Engine(make_config(None, **SMALL, steps=8, checkpoint_schedule="every:3", out=out))
        engine.prepare()
        engine.pm.register(Kill())
        engine.run()

    _, status = os.waitpid(_fork(killed_at_step_0), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert "checkpoints" not in list(RunReader(out).root.group_keys())
    done = lscape.run(resume=out, progress=False)
    assert done.status == "completed" and done.steps == 8
    a, b = RunReader(out).read("train"), RunReader(ref.path).read("train")
    np.testing.assert_array_equal(a["loss"], b["loss"])
    np.testing.assert_array_equal(a["step"], np.arange(8))


def test_successful_resume_clears_the_old_error(tmp_path):
    out = str(tmp_path / "r.zarr")
    lscape.run(**SMALL, steps=4, checkpoint_schedule="every:2", out=out)
    store = RunStore.open(out)
    store.update_attrs(status="failed", error="OSError: [Errno 28] No space left on device")
    store.close()
    assert lscape.run(resume=out, progress=False).status == "completed"
    attrs = RunReader(out).attrs
    assert attrs["status"] == "completed" and "error" not in attrs


def test_killed_measure_is_measured_again(tmp_path):
    src = lscape.run(**SMALL, steps=3, out=str(tmp_path / "src.zarr")).path
    out = str(tmp_path / "m.zarr")
    code = (f"from lscape.store import RunStore; import os, signal\n"
            f"s = RunStore.create({out!r}, {{'lscape_version': 'x', 'kind': 'measure', 'status': 'running'}})\n"
            f"os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert RunReader(out).attrs["status"] == "running" and RunReader(out).status == "killed"
    result = lscape.measure(src, ["grad-norm"], out=out)
    assert result.status == "completed" and RunReader(out).attrs["status"] == "completed"
    with pytest.raises(UsageError, match="already exists"):  # a finished one is kept
        lscape.measure(src, ["grad-norm"], out=out)


def test_a_store_naming_code_is_imported_only_when_trusted(cli, tmp_path, monkeypatch):
    code_args = ["--model", "helpers_workloads:linear", "--data", "helpers_workloads:linear_regression",
                 "--loss", "mse"]
    code, _, err = cli("run", *code_args, "--steps", "3", "--checkpoint-schedule", "every:1", "--out", "c.zarr",
                       "--no-progress")
    assert code == 0, err
    # from here on another user: the store is not one this user wrote (lscape.trust)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "another-user"))
    for args in (["run", "--resume", "c.zarr", "--steps", "5"], ["measure", "c.zarr", "--plugin", "grad-norm",
                                                                  "--out", "m.zarr", "--no-progress"]):
        code, _, err = cli(*args)
        assert code == 2 and "--trust-store" in err and "helpers_workloads:linear" in err, err
        assert len(err.strip().splitlines()) == 1
    assert RunReader("c.zarr").attrs["steps_done"] == 3 and not os.path.exists("m.zarr")
    code, _, err = cli("run", "--resume", "c.zarr", "--steps", "5", "--trust-store")
    assert code == 0, err
    code, _, err = cli("measure", "c.zarr", "--plugin", "grad-norm", "--out", "m.zarr", "--no-progress",
                       *code_args[:4])  # the same names on the command line
    assert code == 0, err
