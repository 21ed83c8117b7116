"""Sharpness for the price of a step (issue 20 item 5), in one process on one core.

1. Tracking: a 500-step SGD run of a small MLP on the shipped digits data, `sharpness` every
   5 steps with `track=true` (a cold verified solve every 10th measurement), against the same
   run measured cold (a random start every time: `warm_start=false`) and with the default
   verified warm start. Prints products per measurement: tracked ones alone, all of them
   (cold verifies included), cold, warm, the ratios; the largest relative gap between a
   tracked value and its cold verify, the disagreements, and the largest relative difference
   between the tracked run's λ_max and the cold run's at the same steps, and its error against a
   tight reference measured in the same run (`hessian`, cold Lanczos to tol 1e-5, same subset).
2. `--probe-budget`: 4000 steps of batch 512, with the tracked probe (on 64 samples) every step,
   without a budget and with budgets 0.05 and 0.2: the realised overhead (probe time /
   training time, root attr `probe_overhead`), fired and skipped firings; without a budget
   the same two clocks run with nothing skipped.

Run: OMP_NUM_THREADS=1 python benchmarks/tracking.py | tee benchmarks/results/tracking.txt
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch

import lscape
from lscape.store import RunReader

BASE = dict(model="mlp", model_opts={"widths": [64, 64], "activation": "tanh"}, data="digits", batch_size=32, lr=0.1,
            progress=False, eval_schedule="never", checkpoint_schedule="never")


def run(out, steps, sharpness=None, reference=None, **kw):
    plugins = ["sharpness"] if sharpness is not None else []
    options = {"sharpness": sharpness} if sharpness is not None else {}
    if reference is not None:  # a tight λ_max on the same shared measurement subset
        plugins.append("hessian")
        options["hessian"] = reference
    started = time.perf_counter()
    result = lscape.run(**{**BASE, **kw}, steps=steps, plugins=plugins, plugin_options=options, out=out)
    assert result.status == "completed", result
    return RunReader(out), time.perf_counter() - started


def tracking(tmp, steps, every):
    common = {"every": every, "tol": 1e-3, "batches": 4}
    reference = {"every": every, "k": 2, "tol": 1e-5, "batches": 4, "trace_schedule": "never", "warm_start": False}
    tracked, t_tracked = run(f"{tmp}/tracked.zarr", steps, {**common, "track": True, "verify_every": 10},
                             reference=reference)
    cold, t_cold = run(f"{tmp}/cold.zarr", steps, {**common, "warm_start": False})
    warm, t_warm = run(f"{tmp}/warm.zarr", steps, common)
    s, c, w = tracked.read("sharpness"), cold.read("sharpness"), warm.read("sharpness")
    assert np.array_equal(tracked.read("train")["loss"], cold.read("train")["loss"])  # probes never change training
    verify = s["hvp_products"] > s["track_products"]  # measurements with a cold verified solve
    n = len(s["step"])
    print(f"== tracking: {steps} SGD steps, MLP 64-64-64-10 tanh on digits ({sum(p.numel() for p in _model().parameters())} "
          f"parameters), λ_max every {every} steps on 4 fixed batches of 32, tol 1e-3, {n} measurements")
    print(f"tracked measurements (no cold verify): {int((~verify).sum())}; accepted by the warm search: "
          f"{int(s['tracked'].sum())}; fell back to a full solve: {int((~verify & ~s['tracked']).sum())}; "
          f"cold verifies: {int(verify.sum())} (every 10th measurement, the first included)")
    mean_tracked = float(s["track_products"][~verify].mean())
    mean_all = float(s["hvp_products"].mean())
    mean_cold, mean_warm = float(c["hvp_products"].mean()), float(w["hvp_products"].mean())
    print(f"products per tracked measurement, cold verifies excluded: {mean_tracked:.2f}")
    print(f"products per measurement, cold verifies included (all {n}): {mean_all:.2f}")
    print(f"products per cold measurement (random start, warm_start=false): {mean_cold:.2f}")
    print(f"products per default warm-started measurement (verified warm start): {mean_warm:.2f}")
    print(f"ratio tracked/cold: {mean_tracked / mean_cold:.2f} (verifies excluded), {mean_all / mean_cold:.2f} "
          f"(included); tracked/warm {mean_tracked / mean_warm:.2f}")
    gaps = s["track_gap"][np.isfinite(s["track_gap"])]
    print(f"tracked vs its cold verify: {len(gaps)} comparisons, max relative gap {gaps.max():.2e}, median "
          f"{np.median(gaps):.2e}; disagreements (gap > 2·tol): {int(s['track_disagree'].sum())}")
    rel = np.abs(s["lambda_max"] - c["lambda_max"]) / np.abs(c["lambda_max"])
    print(f"tracked run's λ_max vs the cold run's at the same {n} steps: max relative difference {rel.max():.2e} "
          f"(median {np.median(rel):.2e}); λ_max from {c['lambda_max'][0]:.3f} to {c['lambda_max'][-1]:.3f}")
    exact = np.asarray(tracked.read("hessian")["top_eigenvalues"]).reshape(n, -1)[:, 0]
    err = np.abs(s["lambda_max"] - exact) / np.abs(exact)
    print(f"tracked run's λ_max vs a tight reference (hessian probe, cold Lanczos to tol 1e-5, same subset and steps): "
          f"max relative error {err[~verify].max():.2e} over the tracked measurements (median "
          f"{np.median(err[~verify]):.2e}), {err[verify].max():.2e} over the cold verifies; tol 1e-3")
    print(f"wall time: tracked {t_tracked:.1f} s (with the reference), cold {t_cold:.1f} s, warm {t_warm:.1f} s")


def _model():
    from lscape.plugins.workloads.defaults import MLP

    return MLP(64, [64, 64], 10)


def measured_without_budget(out, steps, sharpness, **kw):
    """The run with no budget, its probe and training time measured as a budget would
    (a ProbeBudget that allows every firing: the same clocks, nothing skipped)."""
    from lscape.api import make_config
    from lscape.engine import Engine
    from lscape.limits import ProbeBudget

    cfg = make_config(None, **{**BASE, **kw}, steps=steps, plugins=["sharpness"],
                      plugin_options={"sharpness": sharpness}, out=out)
    engine = Engine(cfg)
    engine.prepare().probe_budget = ProbeBudget(math.inf)
    started = time.perf_counter()
    assert engine.run().status == "completed"
    return RunReader(out), time.perf_counter() - started


def budget(tmp, steps):
    probe = {"every": 1, "tol": 1e-3, "batches": 1, "measure_batch_size": 64, "track": True, "verify_every": 10}
    kw = {"batch_size": 512}
    print(f"== --probe-budget: {steps} steps of batch 512 (the same MLP and data), tracked sharpness (on one fixed "
          f"batch of 64) scheduled every step; overhead = probe time / training time, both timed in the run itself")
    none, t = measured_without_budget(f"{tmp}/none.zarr", steps, probe, **kw)
    a = none.attrs
    print(f"no budget: overhead {a['probe_overhead']:.3f} (probes {a['probe_seconds']:.2f} s / training "
          f"{a['train_seconds']:.2f} s), {a['probe_fired']['sharpness']} measurements; wall {t:.1f} s")
    for fraction in (0.05, 0.2):
        r, t = run(f"{tmp}/b{fraction}.zarr", steps, probe, probe_budget=fraction, **kw)
        a = r.attrs
        print(f"--probe-budget {fraction}: realised overhead probe_overhead = {a['probe_overhead']:.3f} "
              f"(probes {a['probe_seconds']:.2f} s / training {a['train_seconds']:.2f} s), "
              f"{a['probe_fired']['sharpness']} measurements fired, {a['probe_skipped']['sharpness']} skipped; "
              f"wall {t:.1f} s")
    print("(wall times on a shared 2-core machine vary by 2x between identical runs; the overhead ratios are "
          "timed within each run)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--budget-steps", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        run(f"{tmp}/warm-up.zarr", 20, {"every": 5})  # first-call costs (data, autograd) out of the timings
        tracking(tmp, args.steps, args.every)
        budget(tmp, args.budget_steps)


if __name__ == "__main__":
    main()
