"""Training throughput on a folder of JPEGs: the lscape engine against a plain PyTorch loop
written like torchvision's reference ``train.py``, and the memory of micro-batched
full-batch GD.

1. Throughput. A generated ImageFolder of JPEGs (``make_image_folder``), read with Pillow
   and augmented as torchvision's reference does for ImageNet (RandomResizedCrop + flip,
   normalised), the same model (torchvision-style ResNet-18, ``--channels`` wide), SGD with
   momentum and the same ``--workers``. The reference is torchvision's
   ``train_one_epoch``: a ``DataLoader`` (random sampler, ``num_workers``, ``pin_memory`` on
   CUDA), ``.to(device, non_blocking=True)``, autocast for ``--precision bf16|fp16`` (a
   GradScaler for fp16), ``zero_grad``/``backward``/``step`` and ``loss.item()`` logged each
   step. lscape runs ``Engine.run()`` with only its always-on plugins (no probes, no
   evaluation, no checkpoints). Both are timed over the same number of steps, from loader
   start to the last step, in one process, interleaved repeats; the printed ratio is
   lscape steps/s over reference steps/s (target >= 0.97 on CPU, >= 0.95 on a GPU).
2. Memory (``--memory``). Full-batch GD on N samples in micro-batches of m
   (``--batch-size full --micro-batch-size m``) against plain training with batches of m,
   each in a fresh subprocess; peak RSS from ``resource.getrusage`` (and peak CUDA memory
   on a GPU). Target: the micro-batched full batch within 1.3x one micro-batch's peak.
3. HVP cost (``--hvp``). The time of one Hessian-vector product (``HessianOperator``, the
   default method) over the time of one gradient (forward + backward), same model and batch.

Run: python benchmarks/throughput.py [--device cuda] [--precision bf16] [--memory] [--hvp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lscape.api import make_config
from lscape.engine import Engine
from lscape.plugins.workloads.images import imagefolder, make_image_folder
from lscape.plugins.workloads.resnet_imagenet import resnet18


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lscape_config(args, root, out, steps, **extra):
    opts = dict(model="resnet18", model_opts={"channels": args.channels}, data="imagefolder",
                data_opts={"root": str(root), "size": args.size, "augment": "imagenet"}, batch_size=args.batch_size,
                steps=steps, lr=0.1, momentum=0.9, weight_decay=1e-4, workers=args.workers, device=args.device,
                precision=args.precision, plugins=[], progress=False, out=out, eval_schedule="never",
                checkpoint_schedule="never", seed=0)
    opts.update(extra)
    return make_config(None, **opts)


def lscape_loop(args, root, tmp, steps):
    engine = Engine(lscape_config(args, root, f"{tmp}/run-{time.perf_counter_ns()}.zarr", steps))
    engine.prepare()
    _sync(args.device)
    t0 = time.perf_counter()
    result = engine.run()
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    assert result.status == "completed" and result.steps == steps, result
    from lscape.store import RunReader

    return elapsed, _steady(RunReader(result.path).read("train")["time"])


#: steady-state rates leave out the first steps (worker start-up, first batches)
SKIP = 5


def _steady(stamps) -> float:
    """Steps per second between step SKIP and the last step, from per-step time stamps."""
    stamps = list(stamps)
    k0, k1 = min(SKIP, len(stamps) - 2), len(stamps) - 1
    return (k1 - k0) / max(1e-12, float(stamps[k1]) - float(stamps[k0]))


def reference_loop(args, root, steps):
    """torchvision's references/classification/train.py, train_one_epoch, for ``steps`` steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    dataset = imagefolder(root=str(root), size=args.size, augment="imagenet")["train"]
    model = resnet18(num_classes=dataset.num_classes, channels=args.channels).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sampler = torch.utils.data.RandomSampler(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    model.train()
    losses, stamps = [], []
    _sync(args.device)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for image, target in loader:
            stamps.append(time.perf_counter())
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                output = model(image)
                loss = criterion(output, target)
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.item())  # torchvision's MetricLogger.update(loss=loss.item())
            done += 1
            if done == steps:
                break
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    return elapsed, _steady(stamps)


def throughput(args, root, tmp):
    lscape_loop(args, root, tmp, 8), reference_loop(args, root, 8)  # warm-up: imports, kernels, page cache
    ref, ours, ref_rate, our_rate = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
        t, rate = reference_loop(args, root, args.steps)
        ref.append(t)
        ref_rate.append(rate)
        t, rate = lscape_loop(args, root, tmp, args.steps)
        ours.append(t)
        our_rate.append(rate)
    ratios = [r / o for r, o in zip(ref, ours)]  # steps/s of lscape over the reference's
    steady = [o / r for r, o in zip(ref_rate, our_rate)]
    mr, mo = statistics.median(ref), statistics.median(ours)
    print(f"throughput — ResNet-18 (channels {args.channels}) on {args.size}x{args.size} crops of "
          f"{args.images} generated JPEGs, RandomResizedCrop+flip, batch {args.batch_size}, {args.workers} workers, "
          f"{args.precision}, {args.steps} steps x {args.repeats} repeats, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'loop':<44}{'median s':>10}{'steps/s':>10}{'steady steps/s':>16}")
    print(f"{'reference (torchvision train.py style)':<44}{mr:>10.3f}{args.steps / mr:>10.2f}"
          f"{statistics.median(ref_rate):>16.2f}")
    print(f"{'lscape engine (always-on plugins only)':<44}{mo:>10.3f}{args.steps / mo:>10.2f}"
          f"{statistics.median(our_rate):>16.2f}")
    target = 0.97 if args.device == "cpu" else 0.95
    print(f"steps/s ratio lscape/reference, end to end (run start to end, store and final checkpoint "
          f"included): {statistics.median(ratios):.3f} (median of repeats; target >= {target})")
    print("  per-repeat: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"steps/s ratio lscape/reference, steady state (steps {SKIP}..{args.steps - 1}): "
          f"{statistics.median(steady):.3f}")
    print("  per-repeat: " + ", ".join(f"{r:.3f}" for r in steady))


# -- memory --------------------------------------------------------------------------------


def _rss_mb() -> float:
    """This process's current resident set (MiB), from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_child(spec: dict) -> None:
    """One configuration in this (fresh) process; prints its peaks as JSON."""
    torch.set_num_threads(spec["threads"])
    opts = dict(spec["config"])
    engine = Engine(make_config(None, **opts))
    engine.prepare()
    before = _rss_mb()
    if opts.get("device", "cpu").startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = engine.run()
    seconds = time.perf_counter() - t0
    assert result.status == "completed", result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if opts.get("device", "cpu").startswith("cuda") else None
    print(json.dumps({"peak_rss_mb": peak, "rss_before_run_mb": before, "cuda_peak_mb": cuda, "seconds": seconds}))


def memory(args, tmp):
    n, micro = args.memory_samples, args.micro_batch_size
    base = dict(model="resnet20", progress=False, eval_schedule="never",
                checkpoint_schedule="never", plugins=[], device=args.device, steps=1, lr=0.1)
    # an in-memory CIFAR-shaped data set (the tensor fast path), written as a module:factory
    base["data"] = "throughput:cifar_shaped"
    base["data_opts"] = {"n": n}
    configs = {
        f"full batch ({n}) in micro-batches of {micro}": dict(base, batch_size="full", micro_batch_size=micro),
        f"one micro-batch ({micro}) per step": dict(base, batch_size=micro),
    }
    results = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    for name, cfg in configs.items():
        cfg = dict(cfg, out=f"{tmp}/mem-{time.perf_counter_ns()}.zarr")
        spec = {"config": cfg, "threads": torch.get_num_threads()}
        proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"memory child failed: {proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nmemory — CIFAR ResNet-20 on {n} in-memory 3x32x32 samples, one step each, fresh subprocess per row, "
          f"device {args.device}")
    print(f"{'configuration':<44}{'peak RSS MiB':>14}{'RSS before run':>16}{'CUDA peak MiB':>15}{'step s':>9}")
    for name, r in results.items():
        cuda = f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-"
        print(f"{name:<44}{r['peak_rss_mb']:>14.0f}{r['rss_before_run_mb']:>16.0f}{cuda:>15}{r['seconds']:>9.2f}")
    full, one = list(results.values())
    ratio = full["peak_rss_mb"] / one["peak_rss_mb"]
    growth = (full["peak_rss_mb"] - full["rss_before_run_mb"]) / max(1e-9, one["peak_rss_mb"] - one["rss_before_run_mb"])
    print(f"peak RSS ratio full-in-micro-batches / one micro-batch: {ratio:.3f}x (target <= 1.3x); "
          f"growth during the run: {growth:.2f}x")
    if full["cuda_peak_mb"] is not None:
        print(f"peak CUDA memory ratio: {full['cuda_peak_mb'] / one['cuda_peak_mb']:.3f}x")


def cifar_shaped(n: int = 4096, seed: int = 0):
    """``n`` random 3x32x32 images with 10 labels, in memory (for the memory rows)."""
    from lscape.plugins.workloads.datasets import ArrayDataset

    g = torch.Generator().manual_seed(int(seed))
    return ArrayDataset(torch.randn(int(n), 3, 32, 32, generator=g), torch.randint(0, 10, (int(n),), generator=g), 10)


# -- HVP / gradient ----------------------------------------------------------------------------


def hvp_ratio(args, repeats: int = 10) -> None:
    from lscape.batch import BatchAdapter
    from lscape.curvature import HessianOperator

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18(num_classes=10, channels=args.channels).to(device)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    adapter = BatchAdapter(nn.functional.cross_entropy)
    op = HessianOperator(model, adapter, [(x, y)], mode="eval", cache_graph=False)
    v = torch.randn(op.dim, device=device, dtype=op.dtype)
    model.eval()

    def gradient():
        model.zero_grad(set_to_none=True)
        adapter.loss(model, (x, y)).backward()

    def timed(fn):
        for _ in range(3):
            fn()
        _sync(args.device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    tg, th = timed(gradient), timed(lambda: op.matvec(v))
    model.zero_grad(set_to_none=True)
    print(f"\nHVP cost — ResNet-18 (channels {args.channels}), batch {args.batch_size} of {args.size}x{args.size}, "
          f"eval mode, fp32, method {op.method}, device {args.device}")
    print(f"gradient {1e3 * tg:.2f} ms, HVP {1e3 * th:.2f} ms: HVP/gradient {th / tg:.2f}x (target <= 2.5x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=8, help="ResNet-18 width (torchvision: 64)")
    parser.add_argument("--size", type=int, default=32, help="crop size")
    parser.add_argument("--images", type=int, default=640, help="JPEGs in the generated folder (48x48 pixels)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput rows")
    parser.add_argument("--memory", action="store_true", help="also the micro-batch memory rows")
    parser.add_argument("--memory-samples", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--hvp", action="store_true", help="also the HVP/gradient time ratio")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_throughput:
            classes = 10
            root = make_image_folder(Path(tmp) / "images", classes=classes, per_class=max(1, args.images // classes),
                                     size=48, seed=0)
            throughput(args, root, tmp)
        if args.memory:
            memory(args, tmp)
        if args.hvp:
            hvp_ratio(args)


if __name__ == "__main__":
    main()
