"""Curvature at the scale people train: lscape vs PyHessian vs hessian-eigenthings, side by side.

Models: wide MLPs of ~5M and ~25M parameters on digits-sized synthetic data (64 inputs,
10 classes, 512 samples) and a GPT-2-small-shaped model (124M parameters, built from a
config, no download) on byte tokens of tiny-shakespeare (random tokens if the file is
absent). Tasks: λ_max, top-5 and the trace. Each (library, task, model) runs in its own
subprocess, so its peak RSS is its own; every column is measured around the solve only:
products, wall and CPU time (user + system of the process), peak RSS and the peak's rise
above the process's RSS just before the solve, peak CUDA memory with ``--device cuda``,
error against a float64 reference where affordable (lscape's Lanczos on a float64 copy of
the model at tol 1e-7). Each lscape worker also times one gradient, one plain
double-backward HVP (autograd.grad with create_graph, then the gradient of g·v) and one
product of lscape's operator, to place the product's cost.

    pip install pyhessian hessian-eigenthings "torch==<your torch>"   # competitors, optional
    python benchmarks/scale.py | tee benchmarks/results/scale.txt
    python benchmarks/scale.py --device cuda --models gpt2 --tasks lmax,top5

A library that cannot be imported is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
MODELS = {"tiny": 64, "mlp5m": 2200, "mlp25m": 4950, "gpt2": None}
TASKS = ("lmax", "top5", "trace")
LIBS = ("lscape", "lscape-tol1e-2", "lscape-full", "pyhessian", "eigenthings-lanczos", "eigenthings-power",
        "reference")
TOL = 1e-3
#: lscape's row variants: (tol, memory_budget in bytes or None for the default 256 MiB)
LSCAPE_ROWS = {"lscape": (TOL, None), "lscape-tol1e-2": (1e-2, None), "lscape-full": (TOL, 8 * 2**30),
               "reference": (1e-7, 3 * 2**30)}


# -- models and data (built identically in every worker) --------------------------------------


class LM(nn.Module):
    """GPT-2 LM head returning logits (what PyHessian and hessian-eigenthings call)."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.m = GPT2LMHeadModel(config)

    def forward(self, x):
        return self.m(input_ids=x).logits


def lm_loss(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build(model_name: str, device: str, dtype=torch.float32, batch: int = 2, seq: int = 64, samples: int = 512):
    torch.manual_seed(0)
    if model_name == "gpt2":
        model = LM()
        if SHAKESPEARE.exists():
            data = torch.tensor(list(SHAKESPEARE.read_bytes()[: batch * (seq + 1) * 4]), dtype=torch.long)
            source = "tiny-shakespeare bytes"
        else:
            data = torch.randint(0, 256, (batch * (seq + 1) * 4,), generator=torch.Generator().manual_seed(0))
            source = "random tokens (tiny-shakespeare absent)"
        rows = data[: batch * (seq + 1)].reshape(batch, seq + 1)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        loss_fn = lm_loss
        desc = f"GPT-2 small (124M), {batch}x{seq} {source}"
    else:
        width = MODELS[model_name]
        model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(samples, 64, generator=g)
        teacher = torch.randn(64, 10, generator=g)
        y = (x @ teacher + 0.5 * torch.randn(samples, 10, generator=g)).argmax(dim=1)
        loss_fn = nn.CrossEntropyLoss()
        desc = f"MLP 64-{width}-{width}-10, {samples} synthetic samples"
    model = model.to(device=device, dtype=dtype)
    return model, loss_fn, x.to(device) if x.dtype == torch.long else x.to(device=device, dtype=dtype), y.to(device), desc


# -- measurement helpers -----------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_costs(model, loss_fn, x, y, device, reps: int = 3) -> dict:
    """Seconds (best of ``reps``) of: one gradient; one plain double-backward HVP from scratch
    (autograd.grad with create_graph, then the gradient of g·v); one plain HVP through a kept
    first-order graph (autograd.grad(g, params, v, retain_graph=True): what PyHessian does per
    product); lscape's first product with method=auto (the method check: finite differences
    of gradients along one vector, then the double-backward product and the first-order graph
    it keeps; once per model, cached) and lscape's later products (one backward through the
    kept graph, flattened)."""
    from lscape.curvature import HessianOperator

    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]

    def grad():
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        return g

    def plain_hvp():
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, v))
        return torch.autograd.grad(dot, params)

    kept = {}

    def cached_hvp():
        if "g" not in kept:
            kept["g"] = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        return torch.autograd.grad(kept["g"], params, v, retain_graph=True)

    flat = torch.cat([t.reshape(-1) for t in v])
    op = HessianOperator(model, loss_fn, [(x, y)])

    def ours():
        return op.matvec(flat)

    def best_of(fn, n):
        best = float("inf")
        for _ in range(n):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    out = {"grad_s": best_of(grad, reps), "plain_hvp_s": best_of(plain_hvp, reps)}
    cached_hvp()  # builds the kept graph, untimed
    out["cached_hvp_s"] = best_of(cached_hvp, reps)
    kept.clear()
    out["first_product_s"] = best_of(ours, 1)  # method=auto: the check and the graph
    out["method"] = op.method
    out["product_s"] = best_of(ours, reps)
    op.release()
    return out


# -- one worker: one library, one task, one model ----------------------------------------------


def worker(lib: str, task: str, model_name: str, device: str, sizes: dict) -> dict:
    torch.manual_seed(0)
    dtype = torch.float64 if lib == "reference" else torch.float32
    model, loss_fn, x, y, desc = build(model_name, device, dtype, **sizes)
    dim = sum(p.numel() for p in model.parameters())
    out = {"lib": lib, "task": task, "model": model_name, "params": dim, "desc": desc}
    if lib == "lscape-costs":
        out.update(timed_costs(model, loss_fn, x, y, device, REPS[0]))
        return out
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    cuda_base = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0
    c0, t0 = cpu_s(), time.perf_counter()
    k = 5 if task == "top5" else 1
    if lib in LSCAPE_ROWS:
        import warnings

        from lscape.curvature import HessianOperator, hutchpp, lanczos

        op = HessianOperator(model, loss_fn, [(x, y)])
        if task == "trace":
            est = hutchpp(op, n=99)
            out.update(values=[est.estimate], stderr=est.stderr)
        else:
            # lscape: the defaults (tol 1e-3 on the residual, basis budget 256 MiB: thick restart
            # where the basis does not fit); lscape-tol1e-2: tol 1e-2; lscape-full: an 8 GiB
            # budget (full reorthogonalisation, the whole basis kept); reference: float64, tol 1e-7
            tol, budget = LSCAPE_ROWS[lib]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = lanczos(op, k=k, tol=tol, max_iter=300 if lib == "reference" else None, memory_budget=budget)
            out.update(values=r.eigenvalues.tolist(), converged=r.converged.tolist(),
                       residuals=r.residuals.tolist(), memory=r.memory,
                       warnings=[str(w.message)[:200] for w in caught if "lanczos" in str(w.message)])
        out["products"] = op.num_products
        out["method"] = op.method
    elif lib == "pyhessian":
        import pyhessian.hessian  # noqa: F401

        ph = sys.modules["pyhessian.hessian"]
        counter = {"n": 0}
        original = ph.hessian_vector_product

        def counted(gradsH, params, v):
            counter["n"] += 1
            return original(gradsH, params, v)

        ph.hessian_vector_product = counted
        h = ph.hessian(model, loss_fn, data=(x, y), cuda=device == "cuda")
        if task == "trace":
            vals = h.trace()  # defaults: maxIter=100, tol=1e-3
            out["values"] = [float(sum(vals) / len(vals))]
        else:
            vals, _ = h.eigenvalues(top_n=k)  # defaults: maxIter=100, tol=1e-3 (relative change)
            out["values"] = sorted(float(v) for v in vals)[::-1]
        out["products"] = counter["n"]
    else:
        import hessian_eigenthings as he

        hop = he.HessianOperator(model, [(x, y)], he.supervised_loss(loss_fn), full_dataset=True)
        counter = {"n": 0}
        original = hop.matvec

        def counted_matvec(v):
            counter["n"] += 1
            return original(v)

        hop.matvec = counted_matvec
        if task == "trace":
            out["values"] = [float(he.trace(hop, num_matvecs=99, seed=0).estimate)]
        elif lib == "eigenthings-lanczos":
            r = he.lanczos(hop, k=k, which="LA", tol=TOL, max_iter=max(4 * k, 40), seed=0)
            out["values"] = sorted(r.eigenvalues.tolist())[::-1]
        else:
            r = he.deflated_power_iteration(hop, k=k, tol=TOL, seed=0)
            out["values"] = sorted(r.eigenvalues.tolist())[::-1]
        out["products"] = counter["n"]
    sync(device)
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = cpu_s() - c0
    out["rss_base_mb"] = base
    out["rss_peak_mb"] = peak_rss_mb()
    out["rss_rise_mb"] = out["rss_peak_mb"] - base
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_rise_mb"] = out["cuda_peak_mb"] - cuda_base
    return out


SIZES: list[str] = []  # --samples/--batch/--seq/--threads/--reps passed on to the workers
REPS = [3]


def run_worker(lib, task, model_name, device, timeout) -> dict:
    cmd = [sys.executable, __file__, "--worker", lib, task, model_name, "--device", device, *SIZES]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"lib": lib, "task": task, "model": model_name, "error": f"timed out after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"lib": lib, "task": task, "model": model_name, "error": tail[0][:160]}


def available(lib: str) -> str | None:
    mod = {"pyhessian": "pyhessian.hessian", "eigenthings-lanczos": "hessian_eigenthings",
           "eigenthings-power": "hessian_eigenthings"}.get(lib)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001 - any import failure skips the library
        return f"{type(e).__name__}: {e}"
    return None


def rel_err(values, ref) -> float | None:
    if not values or not ref:
        return None
    n = min(len(values), len(ref))
    return max(abs(a - b) / abs(b) for a, b in zip(values[:n], ref[:n]))


PLAN = {
    "tiny": {},  # a smoke test of every column: filled below from mlp5m
    # model: {task: libraries}; the reference is run where a float64 copy is affordable
    "mlp5m": {"lmax": ["lscape", "lscape-tol1e-2", "lscape-full", "pyhessian", "eigenthings-lanczos",
                       "eigenthings-power"],
              "top5": ["lscape", "lscape-tol1e-2", "pyhessian", "eigenthings-lanczos"],
              "trace": ["lscape", "pyhessian", "eigenthings-lanczos"]},
    "mlp25m": {"lmax": ["lscape", "lscape-tol1e-2", "pyhessian", "eigenthings-lanczos"]},
    "gpt2": {"lmax": ["lscape", "lscape-tol1e-2", "pyhessian"]},
}
PLAN["tiny"] = PLAN["mlp5m"]
REFERENCE = {"tiny": "top5", "mlp5m": "top5"}  # one float64 top-5 run gives λ_max and the top 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "TASK", "MODEL"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="mlp5m,mlp25m,gpt2")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per worker")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--samples", type=int, default=512, help="MLP data set size")
    ap.add_argument("--batch", type=int, default=2, help="GPT-2 sequences per batch")
    ap.add_argument("--seq", type=int, default=64, help="GPT-2 tokens per sequence")
    ap.add_argument("--skip", default="", help="comma-separated libraries to leave out")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timed cost (best kept)")
    args = ap.parse_args()
    sizes = {"samples": args.samples, "batch": args.batch, "seq": args.seq}
    REPS[0] = args.reps
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, sizes)), flush=True)
        return
    SIZES.extend(["--samples", str(args.samples), "--batch", str(args.batch), "--seq", str(args.seq),
                  "--threads", str(args.threads), "--reps", str(args.reps)])
    skip = set(filter(None, args.skip.split(",")))
    models = args.models.split(",")
    tasks = args.tasks.split(",")
    print(f"lscape scale benchmark: torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {args.threads or torch.get_num_threads()} torch threads per worker, device "
          f"{args.device}, tol {TOL} (lscape residual, PyHessian relative change)")
    print(f"command: python benchmarks/scale.py {' '.join(sys.argv[1:])}")
    for lib in ("pyhessian", "eigenthings-lanczos"):
        why = available(lib)
        if why:
            print(f"{lib.split('-')[0]}: unavailable ({why}); its rows are skipped")
    for model_name in models:
        start = time.perf_counter()
        costs = run_worker("lscape-costs", "-", model_name, args.device, args.timeout)
        print(f"\n== {model_name}: {costs.get('desc', '?')}, {costs.get('params', 0) / 1e6:.1f}M parameters")
        if "error" in costs:
            print(f"   costs: {costs['error']}")
        else:
            g = costs["grad_s"]
            print(f"   one gradient {g:.3f}s; plain double-backward HVP from scratch {costs['plain_hvp_s']:.3f}s "
                  f"= {costs['plain_hvp_s'] / g:.2f} gradients; through a kept graph (PyHessian's product) "
                  f"{costs['cached_hvp_s']:.3f}s = {costs['cached_hvp_s'] / g:.2f} gradients\n"
                  f"   lscape product {costs['product_s']:.3f}s = {costs['product_s'] / g:.2f} gradients "
                  f"({costs['product_s'] / costs['cached_hvp_s']:.2f}x the kept-graph HVP); its first product "
                  f"(method=auto: check + graph, once per model) {costs['first_product_s']:.3f}s = "
                  f"{costs['first_product_s'] / g:.1f} gradients, chose {costs['method']}")
        ref = None
        if not args.no_reference and model_name in REFERENCE:
            ref = run_worker("reference", REFERENCE[model_name], model_name, args.device, args.timeout)
            if "error" in ref:
                print(f"   float64 reference: {ref['error']}")
                ref = None
            else:
                print(f"   float64 reference (lscape Lanczos, tol 1e-7): top-5 {[round(v, 7) for v in ref['values']]}, "
                      f"{ref['products']} products, {ref['wall_s']:.0f}s")
        for task in tasks:
            libs = PLAN.get(model_name, {}).get(task)
            if not libs:
                continue
            print(f"-- {task}")
            print(f"   {'library':<22}{'products':>9}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}{'rise MB':>9}"
                  + (f"{'CUDA MB':>9}" if args.device == "cuda" else "") + f"{'rel err':>10}  values / notes")
            rows = {}
            for lib in libs:
                if lib in skip:
                    print(f"   {lib:<22}left out of this run (--skip)")
                    continue
                if available(lib):
                    print(f"   {lib:<22}skipped (not installed)")
                    continue
                r = run_worker(lib, task, model_name, args.device, args.timeout)
                rows[lib] = r
                if "error" in r:
                    print(f"   {lib:<22}failed: {r['error']}")
                    continue
                expected = None
                if ref and task in ("lmax", "top5"):
                    expected = ref["values"][:1] if task == "lmax" else ref["values"]
                err = rel_err(r.get("values"), expected)
                note = ", ".join(f"{v:.6g}" for v in r.get("values", []))
                if "converged" in r:
                    note += f"; converged {sum(r['converged'])}/{len(r['converged'])}"
                if "stderr" in r:
                    note += f" ± {r['stderr']:.3g}"
                if "memory" in r and r["memory"]:
                    mem = r["memory"]
                    note += (f"; basis {mem['basis_vectors']}+{mem['remainder_vectors']} vectors "
                             f"{mem['basis_bytes'] / 2**20:.0f} MB {mem['basis_dtype']}, {mem['reorth']}"
                             + (f" ({mem['restarts']} restarts)" if mem["restarts"] else ""))
                for w in r.get("warnings", []):
                    note += f"; warned: {w}"
                print(f"   {lib:<22}{r['products']:>9}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['rss_peak_mb']:>13.0f}"
                      f"{r['rss_rise_mb']:>9.0f}" + (f"{r['cuda_peak_mb']:>9.0f}" if args.device == "cuda" else "")
                      + (f"{err:>10.1e}" if err is not None else f"{'-':>10}") + f"  {note}")
            ph = rows.get("pyhessian")
            for name in ("lscape", "lscape-tol1e-2"):
                ours = rows.get(name)
                if ours and ph and "error" not in ours and "error" not in ph:
                    key = "cuda_peak_mb" if args.device == "cuda" else "rss_peak_mb"
                    rise = "cuda_rise_mb" if args.device == "cuda" else "rss_rise_mb"
                    print(f"   ratios {name}/PyHessian: products {ours['products'] / max(ph['products'], 1):.2f}, "
                          f"CPU {ours['cpu_s'] / max(ph['cpu_s'], 1e-9):.2f}, wall "
                          f"{ours['wall_s'] / max(ph['wall_s'], 1e-9):.2f}, peak memory "
                          f"{ours[key] / max(ph[key], 1e-9):.2f} (rise above baseline "
                          f"{ours[rise] / max(ph[rise], 1e-9):.2f})")
        print(f"   ({model_name}: {time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
