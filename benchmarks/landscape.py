"""Benchmark: a 51×51 loss surface in place vs deep-copying the model per point; the trajectory probe's overhead.

Run from the repository root: ``python benchmarks/landscape.py`` (writes
benchmarks/results/landscape.txt). Both parts run in this one process, on the benchmark
CNN (sam_edge's CNN from the built-in workloads, CIFAR-shaped 3×32×32 inputs, 10 classes).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lscape
from lscape.plugins.landscape import evaluate, filter_normalized_direction, parse_range, surface_2d
from lscape.plugins.workloads.models import cnn

INPUT = (3, 32, 32)
CLASSES = 10
RESULT = Path(__file__).parent / "results" / "landscape.txt"


def benchmark_cnn(**_) -> nn.Module:
    """The benchmark CNN: two conv blocks (16, 32 channels) with LayerNorm, a linear head."""
    torch.manual_seed(0)
    return cnn(blocks=2, feature_multiplier=16, num_classes=CLASSES, input_shape=INPUT)


def images(**_) -> dict:
    """CIFAR-shaped random images with labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096 + 512, *INPUT, generator=g)
    teacher = torch.randn(int(np.prod(INPUT)), CLASSES, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return {"train": TensorDataset(x[:4096], y[:4096]), "eval": TensorDataset(x[4096:], y[4096:])}


def surface_naive(model, loss_fn, batches, params, d1, d2, alphas, betas) -> np.ndarray:
    """The naive surface: a deep copy of the model per grid point, its weights set to θ + αd₁ + βd₂."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    base = [p.detach().clone() for p in params]
    out = np.empty((len(alphas), len(betas)))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            m = copy.deepcopy(model)
            named = dict(m.named_parameters())
            with torch.no_grad():
                for n, t, x1, x2 in zip(names, base, d1, d2):
                    named[n].copy_(t + a * x1 + b * x2)
            m.eval()
            out[i, j] = evaluate(m, loss_fn, batches)[0]
    return out


def bench_surface(log) -> None:
    model = benchmark_cnn()
    params = list(model.parameters())
    data = images()["train"]
    batch = (data.tensors[0][:32], data.tensors[1][:32])
    g = torch.Generator().manual_seed(1)
    d1, d2 = filter_normalized_direction(params, g), filter_normalized_direction(params, g)
    alphas = betas = parse_range("-1:1:#51")
    loss_fn = nn.functional.cross_entropy
    log(f"surface: 51×51 grid, {sum(p.numel() for p in params)} parameters, one batch of 32 images")

    t = time.perf_counter()
    ours = surface_2d(model, loss_fn, [batch], params, d1, d2, alphas, betas)["loss"]
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    naive = surface_naive(model, loss_fn, [batch], params, d1, d2, alphas, betas)
    t_naive = time.perf_counter() - t
    log(f"  in place (lscape surface_2d):   {t_ours:8.2f} s  ({t_ours / 2601 * 1e3:.2f} ms/point)")
    log(f"  deep copy per point (naive):    {t_naive:8.2f} s  ({t_naive / 2601 * 1e3:.2f} ms/point)")
    log(f"  ratio naive / in place: {t_naive / t_ours:.2f}x   max |Δloss| = {np.abs(ours - naive).max():.2e}")


def loop_seconds(path: str) -> tuple[float, int]:
    """Wall time of the training loop from the store's train/time (first to last step)."""
    t = lscape.open_run(path).read("train")["time"]
    return float(t[-1] - t[0]), len(t) - 1


def bench_trajectory(log, steps: int = 100, repeats: int = 3) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    common = dict(model="landscape:benchmark_cnn", data="landscape:images", batch_size=128, steps=steps, lr=0.01,
                  eval_schedule="at:0", checkpoint_schedule=f"at:{steps - 1}", progress=False)
    variants = {
        "plain training": dict(plugins=[]),
        "trajectory, sparse JL to 1024": dict(plugins=["trajectory"], plugin_options={"trajectory": {"dim": 1024}}),
        "trajectory, gaussian JL to 1024": dict(
            plugins=["trajectory"], plugin_options={"trajectory": {"dim": 1024, "projection": "gaussian"}}),
    }
    log(f"trajectory overhead: {steps} SGD steps, batch 128, recorded every step; best of {repeats} alternating runs")
    best = {k: np.inf for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for k, extra in variants.items():
                out = os.path.join(tmp, f"run{r}_{list(variants).index(k)}.zarr")
                res = lscape.run(out=out, **common, **extra)
                assert res.status == "completed", res
                sec, n = loop_seconds(out)
                best[k] = min(best[k], sec / n)
    base = best["plain training"]
    for k, v in best.items():
        log(f"  {k:34s} {v * 1e3:8.2f} ms/step   ratio {v / base:.3f}x")


def main() -> None:
    torch.set_num_threads(1)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(f"lscape {lscape.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"1 torch thread, {time.strftime('%Y-%m-%d %H:%M')}")
    bench_surface(log)
    bench_trajectory(log)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n".join(lines) + "\n")
    print(f"written to {RESULT}")


if __name__ == "__main__":
    main()
