"""Adaptive edge of stability at small scale (issue 20): full-batch Adam and heavy-ball momentum
on a small tanh MLP with MSE, tracking λ_max of H and of the preconditioned P^{-1/2} H P^{-1/2}.

Cohen et al. 2022 ("Adaptive Gradient Methods at the Edge of Stability"): under full-batch
Adam the preconditioned sharpness λ_max(P⁻¹H) rises and settles at (2 + 2β₁)/((1 − β₁)η)
(38/η at β₁ = 0.9) while the raw λ_max(H) does not settle there; under heavy-ball momentum β
(P = I) λ_max(H) settles at (2 + 2β)/η. The script trains with torch directly (no engine),
reads P from Adam's own state with lscape.curvature.preconditioner and measures with
lscape.curvature.lanczos; it prints the trajectory and the ratio of the late (last quarter,
median) value to the threshold.

    python benchmarks/adaptive_eos.py            # both runs, under 3 minutes on one core
    python benchmarks/adaptive_eos.py --only adam

Output recorded in benchmarks/results/adaptive_eos.txt.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lscape.curvature import (HessianOperator, PreconditionedOperator, batch_sharpness, edge_threshold, lanczos,
                              preconditioner, random_batches)


def problem(seed: int = 0, n: int = 1000, d: int = 8, width: int = 32):
    """A regression the network cannot fit quickly (an oscillating target of two projections),
    so that training runs long enough for progressive sharpening to reach the edge."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 2, generator=gen) / d**0.5
    z = x @ w
    y = torch.sin(3 * z[:, :1]) * torch.cos(2 * z[:, 1:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    return model, x, y


def top(op) -> float:
    res = lanczos(op, k=1, tol=1e-3, max_iter=100)
    return float(res.eigenvalues[0])


def run(kind: str, lr: float, steps: int, every: int, beta: float = 0.9) -> dict:
    model, x, y = problem()
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta, 0.999))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    threshold = edge_threshold(opt)
    mse = nn.functional.mse_loss
    rows = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{kind} diverged at step {step} (lr={lr}); lower the learning rate")
        if step % every == 0 or step == steps:
            op = HessianOperator(model, mse, [(x, y)])
            raw = top(op)
            pre = top(PreconditionedOperator(op, preconditioner(opt, op.params))) if kind == "adam" else raw
            rows.append((step, float(loss.detach()), raw, pre))
    late = rows[len(rows) * 3 // 4:]
    return {
        "kind": kind, "lr": lr, "beta": beta, "threshold": threshold, "rows": rows,
        "late_pre": statistics.median(r[3] for r in late), "late_raw": statistics.median(r[2] for r in late),
        "late_pre_max": max(r[3] for r in late), "late_pre_min": min(r[3] for r in late),
        "late_raw_min": min(r[2] for r in late), "late_raw_max": max(r[2] for r in late),
        "seconds": time.perf_counter() - start,
    }


def run_eoss(lr: float, steps: int, every: int, batch_size: int, estimates: int) -> dict:
    """Mini-batch SGD (no momentum): batch sharpness (Andreyev & Beneventano 2024) against 2/η,
    next to the full-batch λ_max; training batches from a shuffled sampler without replacement."""
    model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    threshold = edge_threshold(opt)
    mse = nn.functional.mse_loss
    gen = torch.Generator().manual_seed(1)
    rows, order, pos = [], torch.randperm(len(x), generator=gen), 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad()
        loss = mse(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"mini-batch SGD diverged at step {step} (lr={lr}); lower the learning rate")
        if step % every == 0 or step == steps:
            bs = batch_sharpness(model, mse, random_batches(x, y, batch_size, estimates, seed=step))
            full = top(HessianOperator(model, mse, [(x, y)]))
            with torch.no_grad():
                full_loss = float(mse(model(x), y))
            rows.append((step, full_loss, full, bs.value, bs.ratio_of_means))
    late = rows[len(rows) * 3 // 4:]
    return {"lr": lr, "batch_size": batch_size, "threshold": threshold, "rows": rows,
            "late_bs": statistics.median(r[3] for r in late), "late_full": statistics.median(r[2] for r in late),
            "seconds": time.perf_counter() - start}


def report_eoss(res: dict) -> None:
    t = res["threshold"]
    print(f"== mini-batch SGD, lr={res['lr']}, batch size {res['batch_size']}: threshold {t.formula} = {t.value:.1f}")
    print(f"{'step':>6} {'full loss':>10} {'lam_max(H)':>12} {'batch sharp.':>13} {'ratio of means':>15} {'BS/threshold':>13}")
    for step, loss, full, bs, rom in res["rows"]:
        print(f"{step:>6} {loss:>10.5f} {full:>12.3f} {bs:>13.3f} {rom:>15.3f} {bs / t.value:>13.3f}")
    print(f"late (last quarter, median): batch sharpness / threshold = {res['late_bs'] / t.value:.3f}; "
          f"full-batch lam_max / threshold = {res['late_full'] / t.value:.3f}; {res['seconds']:.1f} s")


def report(res: dict) -> None:
    t = res["threshold"]
    name = "Adam" if res["kind"] == "adam" else "SGD heavy-ball"
    print(f"== {name}, lr={res['lr']}, beta={res['beta']}: threshold {t.formula} = {t.value:.1f}")
    print(f"{'step':>6} {'loss':>10} {'lam_max(H)':>12} {'lam_max(P^-1 H)':>16} {'pre/threshold':>14}")
    for step, loss, raw, pre in res["rows"]:
        print(f"{step:>6} {loss:>10.5f} {raw:>12.3f} {pre:>16.2f} {pre / t.value:>14.3f}")
    print(f"late (last quarter of the measurements): preconditioned lam_max / threshold: median "
          f"{res['late_pre'] / t.value:.3f}, range [{res['late_pre_min'] / t.value:.3f}, {res['late_pre_max'] / t.value:.3f}]; "
          f"raw lam_max: median {res['late_raw']:.3f}, range [{res['late_raw_min']:.3f}, {res['late_raw_max']:.3f}] "
          f"(raw / threshold = {res['late_raw'] / t.value:.4f}); {res['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["adam", "momentum", "eoss"])
    parser.add_argument("--adam-lr", type=float, default=2e-3)
    parser.add_argument("--adam-steps", type=int, default=3000)
    parser.add_argument("--momentum-lr", type=float, default=0.1)
    parser.add_argument("--momentum-steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--sgd-lr", type=float, default=0.5)
    parser.add_argument("--sgd-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--estimates", type=int, default=20, help="mini-batches per batch-sharpness measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, float32, 1 thread, full batch (1000 samples), tanh MLP 8-32-32-1, MSE")
    if args.only in (None, "adam"):
        report(run("adam", args.adam_lr, args.adam_steps, args.every))
    if args.only in (None, "momentum"):
        report(run("momentum", args.momentum_lr, args.momentum_steps, args.every))
    if args.only in (None, "eoss"):
        report_eoss(run_eoss(args.sgd_lr, args.sgd_steps, 4 * args.every, args.batch_size, args.estimates))


if __name__ == "__main__":
    main()
