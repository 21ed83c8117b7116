"""Cost of the optimizer variants: a SAM step vs an SGD step, an Entropy-SGD step (L=20) vs 21 SGD steps.

Run ``python benchmarks/optimizers.py`` (add ``--out benchmarks/results/optimizers.txt`` to
save, ``--device cuda`` for a GPU). Targets: SAM ≤ 2.1× (two forward/backward passes plus
a few vector operations), Entropy-SGD ≤ 1.1× the L + 1 plain steps it replaces. All
variants run in one process on the same model and pre-built batches, interleaved round by
round so that a noisy neighbour slows every variant alike; each time is the median of the
rounds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from lscape.plugins.optim import SAM, EntropySGD

MODELS = {
    "mlp": "MLP 784-512-512-10 (ReLU), batch 128",
    "lenet": "LeNet c20-c50-fc500 on 1x28x28 (entropy-sgd's mnistconv without BN/dropout), batch 128",
    "cnn": "CNN c32-c64-fc on 3x32x32 (ReLU, maxpool), batch 128",
}


def build(name: str, device: torch.device):
    """The benchmark model and 21 batches (seeded)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        shape = (128, 1, 28, 28)
    elif name == "lenet":
        model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                              nn.ReLU(), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        shape = (128, 1, 28, 28)
    else:
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
        shape = (128, 3, 32, 32)
    batches = [(torch.randn(shape), torch.randint(0, 10, (shape[0],))) for _ in range(21)]
    return model.to(device), [(x.to(device), y.to(device)) for x, y in batches]


def closure_over(model, optimizer, batches):
    """A closure that takes the next batch on every call, as the engine's does for Entropy-SGD."""
    state = {"i": 0}

    def closure():
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    return closure


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(name: str, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds of each variant's step on model ``name``."""
    model, batches = build(name, device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), rho=0.05)
    esgd = EntropySGD(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True), L=20,
                      gamma=0.03, noise=1e-4)
    quiet = EntropySGD(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True), L=20,
                       gamma=0.03, noise=0.0)
    esgd.track_stats = quiet.track_stats = False  # as in a run: statistics only on their schedule
    c_sgd, c_sam, c_esgd, c_quiet = (closure_over(model, o, batches) for o in (sgd, sam, esgd, quiet))

    def sgd_step():
        c_sgd()
        sgd.step()

    def sgd_21():
        for _ in range(21):
            sgd_step()

    variants = {"sgd": sgd_step, "sam": lambda: sam.step(c_sam), "sgd x21": sgd_21,
                "entropy-sgd L=20": lambda: esgd.step(c_esgd), "noise=0": lambda: quiet.step(c_quiet)}
    for fn in variants.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            reps = 5 if key in ("sgd", "sam") else 1
            times[key].append(sum(timed(fn, device) for _ in range(reps)) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [
        "lscape optimizer-variant cost (benchmarks/optimizers.py)",
        f"torch {torch.__version__}, python {platform.python_version()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"),
        f"median of {args.rounds} interleaved rounds; times per step",
        "",
        f"{'model':<6} {'sgd':>9} {'sam':>9} {'sam/sgd':>8}   {'21x sgd':>9} {'esgd L=20':>10} {'esgd/21sgd':>10}"
        f"   {'(noise=0)':>10}",
    ]
    verdicts = []
    for name in MODELS:
        t = bench(name, device, args.rounds)
        r_sam = t["sam"] / t["sgd"]
        r_esgd = t["entropy-sgd L=20"] / t["sgd x21"]
        verdicts.append(f"{name}: sam {'met' if r_sam <= 2.1 else 'NOT met'}, "
                        f"entropy-sgd {'met' if r_esgd <= 1.1 else 'NOT met'}")
        lines.append(f"{name:<6} {t['sgd'] * 1e3:7.2f}ms {t['sam'] * 1e3:7.2f}ms {r_sam:7.2f}x   "
                     f"{t['sgd x21'] * 1e3:7.1f}ms {t['entropy-sgd L=20'] * 1e3:8.1f}ms {r_esgd:9.2f}x"
                     f"   {t['noise=0'] / t['sgd x21']:9.2f}x")
    lines += ["", *(f"{k}: {v}" for k, v in MODELS.items()),
              "(noise=0): Entropy-SGD without the Langevin Gaussian draws, to show what they cost",
              "targets sam/sgd <= 2.1x, esgd/21sgd <= 1.1x -- " + "; ".join(verdicts)]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
