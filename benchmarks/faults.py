"""Fault loop: kill a training run with SIGKILL at random points, resume it with --resume each
time, and check that the final store equals an uninterrupted run's, array for array.

Run: python benchmarks/faults.py [--kills 20] [--seed 0]. Prints runs, kills and the number of
differing arrays (must be 0).
"""

from __future__ import annotations

import argparse
import random
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
STEPS = 400


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
            if name not in da or name not in db or da[name].shape != db[name].shape \
                    or not np.array_equal(da[name], db[name], equal_nan=True):
                out.append(f"{g}/{name}")
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
        while True:
            # a random moment within roughly one uninterrupted run's length
            time.sleep(rng.uniform(0.5, max(1.0, full / 3)))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            try:
                kill_steps.append(len(RunReader(run).read("train")["step"]))
            except Exception:  # killed before the store existed: start again from scratch
                kill_steps.append(0)
            if kills >= args.kills:
                proc = lscape("run", "--resume", str(run), cwd=tmp) if _has_checkpoint(run) else \
                    lscape("run", *ARGS, "--steps", str(STEPS), "--out", str(run), cwd=tmp)
                assert proc.wait() == 0, proc.stderr.read()
                resumes += 1
                break
            if _has_checkpoint(run):
                proc = lscape("run", "--resume", str(run), cwd=tmp)
                resumes += 1
            else:
                import shutil

                shutil.rmtree(run, ignore_errors=True)
                proc = lscape("run", *ARGS, "--steps", str(STEPS), "--out", str(run), cwd=tmp)
        if proc.poll() is None or proc.returncode != 0:
            assert proc.wait() == 0, proc.stderr.read()
        diff = differences(run, ref)
        status = RunReader(run).attrs["status"]
    print(f"fault loop: {STEPS}-step run (MLP, SGD+momentum, cosine lr, grad-norm, sharpness), "
          f"checkpoints every 10 steps, seed {args.seed}")
    print(f"uninterrupted run: {full:.1f}s")
    print(f"kills (SIGKILL at random moments): {kills}; resumes: {resumes}; final status: {status}")
    print(f"rows present at each kill: {kill_steps}")
    print(f"arrays differing from the uninterrupted run: {len(diff)} {diff if diff else ''}")


def _has_checkpoint(path: Path) -> bool:
    try:
        import zarr

        return "latest" in zarr.open_group(str(path), mode="r")["checkpoints"].attrs
    except Exception:
        return False


if __name__ == "__main__":
    main()
