"""Curvature of a replicated (DDP) vs a sharded (FSDP2) model on 1 and 2 processes.

For each configuration (processes × strategy × product method) a torchrun job builds the
same tanh MLP (64 → W → W → 10, float32, ``--width`` W; 4.3M parameters at the default
2048) on the same 256 samples, each rank holding its share of them, and measures on every
rank:

- products/s: ``--products`` Hessian-vector products of random vectors (after one warm-up
  product), through :func:`lscape.curvature.HessianOperator` — on the DDP model the exact
  double-backward product (the default) or finite differences, each rank a whole vector and
  the products all-reduced; on the FSDP model finite differences of the model's own
  reduce-scattered gradients on vectors sharded like the parameters
  (:class:`lscape.curvature.ShardedHessian`);
- λ_max by Lanczos (tol 1e-4) and its relative difference from the exact value (the
  one-process double-backward Lanczos at tol 1e-6);
- peak memory per rank: on CUDA the peak allocated bytes during the products and the
  solve; on the CPU the peak RSS of the rank's process and its rise above the RSS before the
  model was built (model, data, autograd graphs, Lanczos basis — what sharding divides).

``--eps`` instead measures the finite-difference step rule on a wide model (648k parameters):
the Rayleigh quotient of the top eigenvector from finite-difference products with the old
step u^{1/3}·max(1, ‖θ‖) and with the rule u^{1/3}·max(1, rms θ), against double backward.

    python benchmarks/distributed.py | tee benchmarks/results/distributed.txt
    python benchmarks/distributed.py --device cuda --nprocs 1 --precision bf16   # one GPU: FSDP in bf16 vs DDP
    python benchmarks/distributed.py --eps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SAMPLES = 256


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, 64, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)


def rss_mb() -> float:
    """The current resident set size of this process in MB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: prints a JSON line."""
    import torch.distributed as dist

    from lscape.curvature import HessianOperator, lanczos
    from lscape.sharding import shard_model

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    before = rss_mb()
    model = make_model(args.width).to(device)
    x, y = make_data()
    batch = (x[rank::world].to(device), y[rank::world].to(device))
    if args.strategy == "fsdp":  # --precision bf16: FSDP's policy computes in bf16; DDP stays float32
        shard_model(model, args.precision)
    op = HessianOperator(model, nn.functional.cross_entropy, [batch], method=args.method)
    g = torch.Generator().manual_seed(5)
    vs = [torch.randn(op.dim, generator=g).to(device=device, dtype=op.dtype) for _ in range(args.products + 1)]
    op.matvec(vs[0])  # warm-up (the first product also builds a cached graph or checks the method)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    start = time.perf_counter()
    for v in vs[1:]:
        op.matvec(v)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top = lanczos(op, k=1, tol=args.tol, max_iter=80, seed=3)
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    out = {"rank": rank, "world": world, "dim": int(op.dim), "global_dim": int(getattr(op, "global_dim", op.dim)),
           "method": op.method, "products_per_s": args.products / seconds, "lambda": float(top.eigenvalues[0]),
           "lanczos_products": int(top.num_products), "product_error": op.product_error,
           "peak_cuda_mb": peak_cuda, "peak_rss_mb": peak_rss, "rss_rise_mb": peak_rss - before}
    Path(args.results, f"rank{rank}.json").write_text(json.dumps(out))  # stdout lines of two ranks interleave
    dist.barrier()  # no rank tears its group down while another still works (gloo aborts)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(nproc: int, strategy: str, method: str, args: argparse.Namespace, tol: float) -> list[dict]:
    import tempfile

    results = tempfile.mkdtemp(prefix="lscape-distributed-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker",
           "--strategy", strategy, "--method", method, "--width", str(args.width), "--products", str(args.products),
           "--device", args.device, "--precision", args.precision, "--tol", str(tol),
           "--results", results]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    rows = [json.loads(p.read_text()) for p in Path(results).glob("rank*.json")]
    if proc.returncode != 0 or len(rows) != nproc:
        print(f"# {nproc} × {strategy} {method} failed (exit {proc.returncode}): "
              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        return []
    return sorted(rows, key=lambda r: r["rank"])


def compare(args: argparse.Namespace) -> None:
    print(f"# benchmarks/distributed.py  torch {torch.__version__}  {platform.machine()}  "
          f"{os.cpu_count()} cores  device {args.device}  OMP_NUM_THREADS={args.threads} per process")
    width = args.width
    dim = 64 * width + width + width * width + width + 10 * width + 10
    print(f"# tanh MLP 64-{width}-{width}-10 ({dim:,} parameters, float32), {SAMPLES} samples split over the "
          f"processes; {args.products} timed products of random vectors after one warm-up; λ_max by Lanczos "
          f"(tol {args.tol:g}); FSDP precision {args.precision} (DDP float32)")
    reference = run_config(1, "ddp", "double-backward", args, 1e-6)
    lam = reference[0]["lambda"] if reference else float("nan")
    print(f"# exact λ_max (1 process, double backward, tol 1e-6): {lam:.8f}")
    configs = []
    for nproc in args.nprocs:
        configs += [(nproc, "ddp", "double-backward"), (nproc, "ddp", "finite-difference"),
                    (nproc, "fsdp", "auto")]
    head = (f"{'procs':>5} {'strategy':>8} {'product':>17} {'vector/rank':>12} {'products/s':>10} "
            f"{'λ_max':>12} {'rel. to exact':>13} {'Lanczos':>7} {'FD err est':>10} "
            + ("peak CUDA MB/rank" if args.device == "cuda" else "peak RSS MB/rank (rise)"))
    print(head)
    for nproc, strategy, method in configs:
        rows = run_config(nproc, strategy, method, args, args.tol)
        if not rows:
            continue
        r0 = rows[0]
        rel = abs(r0["lambda"] - lam) / abs(lam)
        err = f"{r0['product_error']:.1e}" if r0["product_error"] is not None else "-"
        if args.device == "cuda":
            mem = " ".join(f"{r['peak_cuda_mb']:.0f}" for r in rows)
        else:
            mem = " ".join(f"{r['peak_rss_mb']:.0f} ({r['rss_rise_mb']:+.0f})" for r in rows)
        dims = "/".join(str(r["dim"]) for r in rows)
        print(f"{nproc:>5} {strategy:>8} {r0['method']:>17} {dims:>12} {r0['products_per_s']:>10.2f} "
              f"{r0['lambda']:>12.8f} {rel:>13.1e} {r0['lanczos_products']:>7} {err:>10} {mem}")


def eps_rule(args: argparse.Namespace) -> None:
    """The finite-difference step on a wide model: old (‖θ‖) and new (rms θ) rules against exact."""
    from lscape.curvature import HessianOperator, lanczos
    from lscape.curvature.products import unit_roundoff

    torch.manual_seed(0)
    width = 768
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = make_data()
    batches = [(x, y)]
    loss = nn.functional.cross_entropy
    exact = HessianOperator(model, loss, batches, method="double-backward")
    v = lanczos(exact, k=1, tol=1e-5, max_iter=80).eigenvectors[0]
    hv = exact.matvec(v)
    lam = float(v @ hv)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    norm, rms = float(theta.norm()), float(theta.norm()) / math.sqrt(theta.numel())
    u3 = unit_roundoff(torch.float32) ** (1 / 3)
    print(f"# the finite-difference step on a tanh MLP 64-{width}-{width}-10 ({theta.numel():,} parameters, "
          f"float32): ‖θ‖ = {norm:.2f}, rms θ = {rms:.4f}; v the top eigenvector (λ = {lam:.6f}, double backward)")
    print(f"{'rule':>28} {'‖εv‖':>9} {'λ rel. error':>12} {'‖Hv‖ rel. error':>15} {'estimate':>9}")
    for name, length in (("u^1/3·max(1,‖θ‖)  (old)", u3 * max(1.0, norm)),
                         ("u^1/3·max(1,rms θ) (rule)", u3 * max(1.0, rms))):
        fd = HessianOperator(model, loss, batches, method="finite-difference", fd_eps=length)
        f = fd.matvec(v)
        print(f"{name:>28} {length:>9.2e} {abs(float(v @ f) - lam) / lam:>12.1e} "
              f"{float((f - hv).norm() / hv.norm()):>15.1e} {fd.product_error:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--products", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--results", default=".", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--nprocs", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--eps", action="store_true", help="measure the finite-difference step rule instead")
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.eps:
        eps_rule(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
