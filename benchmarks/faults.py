"""Fault loop: kill a training run with SIGKILL at random points, resume it with --resume each
time, and check that the final store equals an uninterrupted run's, array for array.

Run: python benchmarks/faults.py [--kills 20] [--seed 0]. Prints runs, kills and the number of
differing arrays (must be 0).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lscape.store import RunReader

ARGS = ["--data", "synthetic", "--data-opt", "n=512", "--data-opt", "dim=16", "--data-opt", "classes=4",
        "--model-opt", "widths=64,64", "--batch-size", "32", "--momentum", "0.9", "--lr-schedule", "cosine",
        "--checkpoint-schedule", "every:10", "--plugin", "grad-norm", "--plugin", "sharpness",
        "-o", "sharpness.every=15", "--no-progress"]
STEPS = 600


def lscape(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lscape", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def differences(a: Path, b: Path) -> list[str]:
    ra, rb = RunReader(a), RunReader(b)
    out = []
    ga = [g for g in ra.groups() if g != "checkpoints"]
    if ga != [g for g in rb.groups() if g != "checkpoints"]:
        return ["groups differ"]
    for g in ga:
        da, db = ra.read(g), rb.read(g)
        for name in sorted(set(da) | set(db)):
            if name == "time":  # wall clock
                continue
            if name not in da or name not in db:
                out.append(f"{g}/{name} (missing)")
            elif da[name].shape != db[name].shape:
                out.append(f"{g}/{name} (shape {da[name].shape} vs {db[name].shape})")
            elif not np.array_equal(da[name], db[name], equal_nan=True):
                bad = np.nonzero(~((da[name] == db[name]) | (np.isnan(da[name].astype(float)) & np.isnan(db[name].astype(float)))))[0]
                out.append(f"{g}/{name} (rows {bad[:5].tolist()}...)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = tmp / "reference.zarr"
        t0 = time.time()
        proc = lscape("run", *ARGS, "--steps", str(STEPS), "--out", str(ref), cwd=tmp)
        assert proc.wait() == 0, proc.stderr.read()
        full = time.time() - t0
        run = tmp / "killed.zarr"
        proc = lscape("run", *ARGS, "--steps", str(STEPS), "--out", str(run), cwd=tmp)
        kills, resumes, kill_steps = 0, 0, []
        while kills < args.kills:
            # kill once the run is past a random step (spread so that every kill fits in the
            # run), plus a random delay so kills land anywhere: mid-step, mid-flush, mid-checkpoint
            done = _checkpoint_step(run)
            target = rng.randint(done + 1, min(STEPS - 1, done + max(2, STEPS // (2 * args.kills))))
            while proc.poll() is None and _checkpoint_step(run) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            kill_steps.append(_checkpoint_step(run))
            if _checkpoint_step(run) >= 0:
                proc = lscape("run", "--resume", str(run), cwd=tmp)
                resumes += 1
            else:  # killed before the first checkpoint: start again from scratch
                shutil.rmtree(run, ignore_errors=True)
                proc = lscape("run", *ARGS, "--steps", str(STEPS), "--out", str(run), cwd=tmp)
        assert proc.wait() == 0, proc.stderr.read()
        diff = differences(run, ref)
        status = RunReader(run).attrs["status"]
    print(f"fault loop: {STEPS}-step run (MLP, SGD+momentum, cosine lr, grad-norm, sharpness), "
          f"checkpoints every 10 steps, seed {args.seed}")
    print(f"uninterrupted run: {full:.1f}s")
    print(f"kills (SIGKILL at random moments): {kills}; resumes: {resumes}; final status: {status}")
    print(f"last checkpoint step at each kill: {kill_steps}")
    print(f"arrays differing from the uninterrupted run: {len(diff)} {diff if diff else ''}")


def _checkpoint_step(path: Path) -> int:
    """The step of the run's latest checkpoint (-1 when there is none yet)."""
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")["checkpoints"]
        return int(group[group.attrs["latest"]].attrs["step"])
    except Exception:  # no store, no group or no checkpoint yet
        return -1


if __name__ == "__main__":
    main()
