"""Signals in real processes: the first Ctrl-C abandons a long probe and the run ends with its
final checkpoint; a second changes nothing; SIGTERM while starting is one line; DataLoader
workers print no tracebacks of their own."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import zarr

from lscape.store import RunReader

pytestmark = pytest.mark.slow

#: a hessian measurement that would run for hours: 100000 SLQ runs of 80 products each, within a budget
#: that admits them (the default budget of 150 products would cap it at a fraction of a second)
LONG_PROBE = ["--data", "synthetic", "--data-opt", "n=256", "--data-opt", "dim=16", "--data-opt", "classes=3",
              "--model-opt", "widths=64", "--batch-size", "32", "--no-progress", "--steps", "5",
              "--plugin", "hessian", "-o", "hessian.budget=10000000", "-o", "hessian.density_runs=100000",
              "-o", "hessian.density_steps=80", "-o", "hessian.density_schedule=every:1", "-o", "hessian.k=1", "-o", "hessian.trace_schedule=never",
              "--checkpoint-schedule", "every:1"]


def _start(args, out, cwd, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "lscape", "run", *args, "--out", str(out)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_store(proc, out, then=3.0, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not os.path.exists(os.path.join(out, "zarr.json")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(then)  # into the first step's measurement


def _latest_checkpoint_step(path):
    group = zarr.open_group(str(path), mode="r")["checkpoints"]
    return int(group[group.attrs["latest"]].attrs["step"])


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_abandons_a_long_probe_and_the_run_ends_with_its_checkpoint(tmp_path, signals):
    out = tmp_path / "h.zarr"
    proc = _start(LONG_PROBE, out, tmp_path)
    _wait_for_store(proc, out)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    # without the stop the measurement would take hours: the timeout is what is checked
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    r = RunReader(out)
    assert r.attrs["status"] == "interrupted"
    done = r.attrs["steps_done"]
    assert done >= 1 and _latest_checkpoint_step(out) == done  # every run ends with a checkpoint
    assert len(r.read("train")["loss"]) == done
    # the abandoned measurement left no row (and no partial one)
    assert "hessian" not in r.groups() or len(r.read("hessian")["step"]) < done


def _catches_sigterm(pid):
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("then", [0.0, 3.0])  # while torch imports; while the run is being built
def test_sigterm_while_starting_is_one_line(tmp_path, then):
    out = tmp_path / "t.zarr"
    proc = _start(["--data", "synthetic", "--steps", "100000"], out, tmp_path)
    deadline = time.time() + 60
    # before Python runs lscape's first line nothing can answer; from then on one line does
    while time.time() < deadline and proc.poll() is None and not _catches_sigterm(proc.pid):
        time.sleep(0.005)
    time.sleep(then)
    if os.path.exists(out):  # already training (a fast machine): not start-up any more
        proc.kill()
        proc.wait()
        pytest.skip("the run started before the signal")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if os.path.exists(out):
        pytest.skip("the run started before the signal")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "terminated" in err, err


def test_signals_escalate_without_losing_the_checkpoint_in_process():
    """In one process, deterministically: the first signal asks for a stop and abandons
    ticking work, the second only says so, the third abandons the run."""
    from lscape import activity
    from lscape.lifecycle import stop_on_signals

    asked = []
    with stop_on_signals(lambda: asked.append(1) or len(asked) > 1):
        with activity.doing("long"):
            activity.tick()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert asked == [1] and activity.stopping()
            with pytest.raises(activity.Stopped):
                activity.tick()
        os.kill(os.getpid(), signal.SIGTERM)  # the second: nothing raised
        time.sleep(0.01)
        assert asked == [1]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert not activity.stopping()  # the next run in this process measures again


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_with_workers_interrupts_cleanly(tmp_path, sig):
    """A terminal's Ctrl-C, or a group kill (a scheduler, `kill -TERM -PGID`), reaches the
    loader workers too: a worker killed by SIGTERM failed the run ("DataLoader worker is
    killed by signal"); the workers leave signals to the main process."""
    (tmp_path / "listdata.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import Dataset

        class Points(Dataset):  # not a TensorDataset: batches come through DataLoader workers
            num_classes = 3
            input_shape = (8,)

            def __init__(self):
                g = torch.Generator().manual_seed(0)
                self.x = torch.randn(512, 8, generator=g)
                self.y = torch.randint(0, 3, (512,), generator=g)

            def __len__(self):
                return len(self.x)

            def __getitem__(self, i):
                return self.x[i], self.y[i]

        def points():
            return Points()
    """))
    out = tmp_path / "w.zarr"
    args = ["--data", "listdata:points", "--model-opt", "widths=16", "--batch-size", "8", "--workers", "2",
            "--steps", "100000", "--no-progress", "--checkpoint-schedule", "every:20"]
    proc = _start(args, out, tmp_path, start_new_session=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    _wait_for_store(proc, out, then=2.0)
    os.killpg(proc.pid, sig)  # every process of the group
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    r = RunReader(out)
    assert r.attrs["status"] == "interrupted" and _latest_checkpoint_step(out) == r.attrs["steps_done"]
