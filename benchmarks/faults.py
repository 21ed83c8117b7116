"""Fault loop: runs with every built-in plugin active at least once (probes and step owners,
the online diffusion analysis, landscape slices during training, hessian, eos), each SIGKILLed
twice at random moments (mid-step, mid-flush, mid-checkpoint) and resumed with --resume; every
array of every group must equal an uninterrupted run's.

Run: python benchmarks/faults.py [--kills 2] [--seed 0] [--steps 240]. Prints, per run, the
kills, resumes and the number of arrays compared and differing (must be 0).
The CI-sized version is tests/test_reliability_faults.py.
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
import torch

from lscape.store import RunReader

BASE = ["--data", "synthetic", "--data-opt", "n=512", "--data-opt", "dim=8", "--data-opt", "classes=4",
        "--model-opt", "widths=16", "--batch-size", "32", "--momentum", "0.9", "--lr-schedule", "cosine",
        "--checkpoint-schedule", "every:10", "--no-progress"]

# name: (plugins, options); every built-in plugin is in at least one run, step owners one per run
RUNS = {
    "probes": (["trajectory", "diffusion", "grad-norm", "sharpness", "hessian", "hessian-exact", "landscape",
                "interpolate", "eps-sharpness", "eos"],
               {"diffusion": {"window": 40, "span": 6, "fit_points": 8, "fragment": 10},
                "sharpness": {"every": 15}, "hessian": {"every": 25, "k": 3, "trace_schedule": "every:30",
                                                         "density_schedule": "every:50", "density_points": 64,
                                                         "density_steps": 20, "density_runs": 2},
                "hessian-exact": {"every": 40}, "landscape": {"every": 35, "alpha": "-1:1:#9"},
                "interpolate": {"schedule": "every:45", "alpha": "0:1:#5"},
                "eps-sharpness": {"every": 30, "iters": 3, "repeats": 2}, "eos": {"every": 20}}),
    "sam": (["sam", "grad-stats", "trajectory"], {"sam": {"stats": "every:5"}, "grad-stats": {"every": 12},
                                                  "trajectory": {"every": 3, "dim": 16}}),
    "smoothout": (["smoothout", "grad-norm"], {"smoothout": {"stats": "every:5"}}),
    "entropy-sgd": (["entropy-sgd", "sharpness"], {"entropy-sgd": {"L": 3, "stats": "every:5"},
                                                   "sharpness": {"every": 10}}),
    "grad-noise": (["grad-noise", "grad-stats"], {"grad-noise": {"every": 16, "noise_size": 4,
                                                                 "sharpness_batches": 2},
                                                  "grad-stats": {"every": 9}}),
}


def command(plugins: list[str], options: dict, steps: int, out: Path) -> list[str]:
    args = [*BASE, "--steps", str(steps), "--out", str(out)]
    for p in plugins:
        args += ["--plugin", p]
    for p, opts in options.items():
        for k, v in opts.items():
            args += ["-o", f"{p}.{k}={v}"]
    return args


def lscape(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lscape", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def differences(a: Path, b: Path) -> tuple[int, list[str]]:
    """(arrays compared, those that differ): every array of every group, wall clock aside."""
    ra, rb = RunReader(a), RunReader(b)
    ga = [g for g in ra.groups() if g != "checkpoints"]
    if ga != [g for g in rb.groups() if g != "checkpoints"]:
        return 0, ["groups differ"]
    out, compared = [], 0
    for g in ga:
        da, db = ra.read(g), rb.read(g)
        for name in sorted(set(da) | set(db)):
            if name == "time" or name.endswith("_seconds"):  # wall clock
                continue
            compared += 1
            if name not in da or name not in db:
                out.append(f"{g}/{name} (missing)")
            elif da[name].shape != db[name].shape:
                out.append(f"{g}/{name} (shape {da[name].shape} vs {db[name].shape})")
            elif not np.array_equal(da[name], db[name], equal_nan=da[name].dtype.kind == "f"):
                out.append(f"{g}/{name}")
    return compared, out


def fault_run(name: str, steps: int, kills: int, rng: random.Random, tmp: Path) -> dict:
    plugins, options = RUNS[name]
    options = {k: dict(v) for k, v in options.items()}
    if "interpolate" in options:
        from lscape.plugins.workloads.defaults import MLP

        torch.manual_seed(123)
        other = tmp / "other.pt"
        torch.save(MLP(8, [16], 4).state_dict(), other)
        options["interpolate"]["other"] = str(other)
    ref, run = tmp / f"{name}-reference.zarr", tmp / f"{name}-killed.zarr"
    t0 = time.time()
    proc = lscape("run", *command(plugins, options, steps, ref), cwd=tmp)
    assert proc.wait() == 0, proc.stderr.read()
    seconds = time.time() - t0
    proc = lscape("run", *command(plugins, options, steps, run), cwd=tmp)
    done_kills, resumes, at = 0, 0, []
    while done_kills < kills:
        # past a random step (so that both kills fit in the run), then a random delay, so kills
        # land anywhere: mid-step, mid-flush, mid-checkpoint, before the first checkpoint
        done = _checkpoint_step(run)
        target = rng.randint(done + 1, min(steps - 1, done + max(2, steps // (kills + 1))))
        while proc.poll() is None and _checkpoint_step(run) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_kills += 1
        at.append(_checkpoint_step(run))
        proc = lscape("run", "--resume", str(run), cwd=tmp)  # also before the first checkpoint
        resumes += 1
    assert proc.wait() == 0, proc.stderr.read()
    compared, diff = differences(run, ref)
    return {"name": name, "plugins": plugins, "seconds": seconds, "kills": done_kills, "resumes": resumes,
            "at": at, "status": RunReader(run).attrs["status"], "compared": compared, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--only", nargs="*", default=None, help="run only these plugin sets")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    total_kills = total_compared = total_diff = 0
    print(f"fault loop: {args.steps}-step runs (MLP 8-16-4, SGD+momentum, cosine lr), checkpoints every 10 steps, "
          f"{args.kills} SIGKILLs per run at random moments, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or RUNS:
            r = fault_run(name, args.steps, args.kills, rng, Path(tmp))
            total_kills += r["kills"]
            total_compared += r["compared"]
            total_diff += len(r["diff"])
            print(f"{r['name']:12s} plugins: {', '.join(r['plugins'])}")
            print(f"{'':12s} uninterrupted {r['seconds']:.1f}s; kills {r['kills']}, resumes {r['resumes']} "
                  f"(last checkpoint step at each kill: {r['at']}); final status {r['status']}; "
                  f"arrays compared {r['compared']}, differing {len(r['diff'])} {r['diff'] or ''}")
    print(f"total: kills {total_kills}, arrays compared {total_compared}, differences: {total_diff}")


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
