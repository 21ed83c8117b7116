"""Per-sample gradient statistics: lscape's vmap vs a loop over samples vs BackPACK, time and memory.

Run ``python benchmarks/noise.py`` (add ``--out benchmarks/results/noise.txt`` to save).
Every method computes the same statistics (tr Σ, GSNR, B_simple, NormTest, InnerTest) on
the same batch with the same accumulation code, so only the per-sample gradients differ:
torch.func vmap, one backward per sample, or BackPACK's BatchGrad. The table reports the best of several runs and the memory peak, and the
largest relative difference from lscape's values shows that they agree. Each (model,
method) runs in a fresh subprocess so that its peak resident memory is its own: the peak
is ``resource.getrusage(...).ru_maxrss`` at the end minus the resident size just before
the first call (both on CPU, so torch's allocations are included, unlike tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import nn

MODELS = {
    "mlp-default": "MLP 64-64-64-10 (lscape default), b128",
    "cnn-small": "CNN c8-c16-fc 1x8x8 (digits), b128",
    "mlp": "MLP 64-256-256-10, batch 128",
    "cnn": "CNN c16-c32-fc 3x16x16, batch 128",
    "mlp-wide": "MLP 784-512-256-10, batch 128",
}
METHODS = ("vmap", "loop", "backpack")
STATS = ("trace_cov", "gsnr", "b_simple", "norm_test", "inner_test")


def build(name: str):
    """The benchmark model, loss and batch (seeded)."""
    torch.manual_seed(0)
    if name == "mlp-default":
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        x = torch.randn(128, 64)
    elif name == "cnn-small":
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        x = torch.randn(128, 1, 8, 8)
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(128, 64)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
        x = torch.randn(128, 3, 16, 16)
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (len(x),))
    return model, nn.CrossEntropyLoss(), (x, y)


def run_vmap(model, loss_fn, batch):
    from lscape.plugins.noise import per_sample_statistics

    st = per_sample_statistics(model, loss_fn, [batch], chunk_size=len(batch[0]), method="vmap")
    return {k: getattr(st, k) for k in STATS}


def run_loop(model, loss_fn, batch):
    """One ordinary backward per sample, then the same accumulation as lscape's."""
    from lscape.plugins.noise import per_sample_statistics

    st = per_sample_statistics(model, loss_fn, [batch], chunk_size=len(batch[0]), method="loop")
    return {k: getattr(st, k) for k in STATS}


def run_backpack(model, loss_fn, batch):
    """BackPACK's BatchGrad individual gradients, then the same accumulation as lscape's."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    from lscape.plugins.noise import statistics_from_gradients

    x, y = batch
    if not getattr(model, "_backpack_extended", False):
        extend(model)
        extend(loss_fn)
        model._backpack_extended = True
    model.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(model(x), y).backward()
    # BackPACK's individual gradients of a mean loss carry the factor 1/B
    chunk = {n: p.grad_batch * len(x) for n, p in model.named_parameters()}
    centre = {n: p.grad.double() for n, p in model.named_parameters()}
    st = statistics_from_gradients([chunk], len(x), centre)
    return {k: getattr(st, k) for k in STATS}


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), or since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(model_name: str, method: str, repeats: int) -> dict:
    """One (model, method) in this process: first-call and best time, memory peak, the statistics."""
    torch.set_num_threads(1)  # the machine is shared; one thread keeps the ratios meaningful
    model, loss_fn, batch = build(model_name)
    fn = {"vmap": run_vmap, "loop": run_loop, "backpack": run_backpack}[method]
    t0 = time.perf_counter()
    fn(model, loss_fn, batch)  # warm-up: torch.func and BackPACK set up once per process
    first = time.perf_counter() - t0
    steady = reset_peak()
    before = rss_bytes()
    times, values = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = fn(model, loss_fn, batch)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "first": first, "peak_mb": max(peak_bytes() - before, 0) / 2**20,
            "steady": steady, "values": values, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return

    lines = [
        "lscape benchmarks/noise.py: per-sample gradient statistics (tr Σ, GSNR, B_simple, NormTest, InnerTest)",
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, 1 thread, "
        f"best of {args.repeats}",
        "memory: peak RSS above the RSS before the timed calls, in a fresh process per row, after one warm-up call",
        "        (kernel VmHWM reset through /proc/self/clear_refs; CPU, so torch's allocations count)",
        "",
    ]
    try:
        import backpack  # noqa: F401

        from importlib.metadata import version

        lines.insert(2, f"backpack-for-pytorch {version('backpack-for-pytorch')}")
    except Exception as e:  # report, never fail: BackPACK is optional
        lines.insert(2, f"backpack-for-pytorch unavailable: {type(e).__name__}: {e}")
    header = (f"{'model':38s} {'method':9s} {'time [ms]':>10s} {'vs vmap':>8s} {'1st call':>9s} {'peak [MB]':>10s}"
              f" {'max rel diff':>13s}")
    lines += [header, "-" * len(header)]
    for name, desc in MODELS.items():
        results = {}
        for method in METHODS:
            proc = subprocess.run([sys.executable, __file__, "--child", name, method, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                results[method] = {"error": last}
            else:
                results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = results["vmap"]
        for method in METHODS:
            r = results[method]
            if "error" in r:
                lines.append(f"{desc:38s} {method:9s} failed: {r['error'][:80]}")
                continue
            ratio = r["seconds"] / ref["seconds"] if "seconds" in ref else float("nan")
            diff = max(abs(r["values"][k] - ref["values"][k]) / abs(ref["values"][k]) for k in r["values"]) \
                if "values" in ref else float("nan")
            mark = "" if r.get("steady", True) else "*"  # * the peak includes the warm-up
            lines.append(f"{desc:38s} {method:9s} {1e3 * r['seconds']:10.1f} {ratio:7.1f}x {1e3 * r['first']:9.0f}"
                         f" {r['peak_mb']:9.1f}{mark or ' '}"
                         f"{diff:13.1e}")
        if "seconds" in ref and "seconds" in results["loop"]:
            lines.append(f"  -> vmap is {results['loop']['seconds'] / ref['seconds']:.1f}x faster than the loop"
                         f" ({ref['params']} parameters)")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
