"""Benchmark lscape.curvature against PyHessian and hessian-eigenthings on one small CNN, against its dense Hessian.

Run:  python benchmarks/curvature.py  (a few minutes on 2 CPU cores; needs `pip install
pyhessian hessian-eigenthings` for the side-by-side columns, and skips a library that
fails to install or import). Everything runs in one process on the same model, data and
weights; the ground truth is the dense float64 Hessian of a float64 copy of the model.
"""

from __future__ import annotations

import copy
import platform
import sys
import time
import warnings

import torch
from torch import nn

from lscape.curvature import HessianOperator, dense_matrix, hutchpp, lanczos

# PyHessian calls loss.backward(create_graph=True); its copy of the model is dropped afterwards.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
torch.set_num_threads(1)  # the same single thread for every library: ratios, not absolute speed
loss_fn = nn.functional.cross_entropy


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )  # fmt: skip


def make_data(n: int, seed: int, labels: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """1x16x16 inputs with 10 classes.

    ``balanced``: a Gaussian mixture, one mean image per class and equally many examples of
    each class — the Hessian then has about C − 1 = 9 clustered outliers, as on MNIST or
    CIFAR-10 (Papyan 2019), the case where Lanczos and power iteration differ most.
    ``teacher``: labels of a random teacher CNN — unbalanced classes and a single isolated
    outlier, power iteration's best case.
    """
    g = torch.Generator().manual_seed(seed)
    if labels == "balanced":
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=g)]
        means = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(99))
        return means[y] + 1.5 * torch.randn(n, 1, 16, 16, generator=g), y
    x = torch.randn(n, 1, 16, 16, generator=g)
    torch.manual_seed(1234)
    with torch.no_grad():
        y = make_cnn()(x).argmax(dim=1)
    return x, y


def train(model: nn.Module, x, y, steps: int, lr: float, batch: int = 64, seed: int = 0, on_step=None) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        if on_step is not None:
            on_step(step)


def timed(fn, repeats: int = 5):
    """(fastest seconds, last result) over ``repeats`` calls: on a shared CPU contention only adds time."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def rel_err(values, exact) -> float:
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    exact = torch.as_tensor(exact, dtype=torch.float64).reshape(-1)[: len(values)]
    return float(((values - exact).abs() / exact.abs()).max())


# -- the libraries ------------------------------------------------------------------------


def load_pyhessian():
    try:
        import pyhessian.hessian  # noqa: F401 - the package re-exports the class under the module's name

        ph = sys.modules["pyhessian.hessian"]

        counter = {"n": 0}
        original = ph.hessian_vector_product

        def counted(gradsH, params, v):
            counter["n"] += 1
            return original(gradsH, params, v)

        ph.hessian_vector_product = counted
        return ph, counter
    except Exception as e:  # noqa: BLE001 - report any import failure and go on
        print(f"pyhessian: unavailable ({type(e).__name__}: {e}); its columns are skipped")
        return None, None


def load_eigenthings():
    try:
        import hessian_eigenthings as he

        return he
    except Exception as e:  # noqa: BLE001
        print(f"hessian-eigenthings: unavailable ({type(e).__name__}: {e}); its rows are skipped")
        return None


def pyhessian_eigenvalues(ph, counter, model, x, y, top_n: int):
    counter["n"] = 0
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    h = ph.hessian(m, loss_fn, data=(x, y), cuda=False)
    values, _ = h.eigenvalues(top_n=top_n)  # defaults: maxIter=100, tol=1e-3
    return sorted(values, reverse=True), counter["n"]


def pyhessian_trace(ph, counter, model, x, y, seed: int = 0):
    counter["n"] = 0
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    h = ph.hessian(m, loss_fn, data=(x, y), cuda=False)
    values = h.trace()  # defaults: maxIter=100, tol=1e-3
    return float(sum(values) / len(values)), counter["n"]


class CountingOperator:
    """Wraps a hessian-eigenthings operator to count its products."""

    def __init__(self, op):
        self.op, self.n = op, 0

    def __getattr__(self, name):
        return getattr(self.op, name)

    def matvec(self, v):
        self.n += 1
        return self.op.matvec(v)

    __call__ = matvec

    def __matmul__(self, v):
        return self.matvec(v)


def eigenthings_run(he, model, x, y, algorithm: str, k: int):
    m = copy.deepcopy(model).eval()
    op = CountingOperator(he.HessianOperator(m, [(x, y)], he.supervised_loss(loss_fn), full_dataset=True))
    if algorithm == "lanczos":
        result = he.lanczos(op, k=k, which="LA", seed=0)  # default max_iter = 2k steps, no residual stop
    else:
        result = he.deflated_power_iteration(op, k=k, seed=0)  # defaults: max_iter=100, tol=1e-4
    return sorted(result.eigenvalues.tolist(), reverse=True), op.n


# -- the benchmark ------------------------------------------------------------------------


def main() -> None:
    print(f"lscape curvature benchmark: torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, 1 thread; times are the fastest of repeated runs (shared CPU)")
    ph, counter = load_pyhessian()
    he = load_eigenthings()
    checks = []
    for labels in ("balanced", "teacher"):
        checks += workload(labels, ph, counter, he, micro=(labels == "balanced"))
    print("\ntargets (workload: check)")
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    sys.stdout.flush()


def workload(labels: str, ph, counter, he, micro: bool) -> list[tuple[str, bool]]:
    """Every comparison on one model and batch; returns (target text, met) pairs."""
    x_train, y_train = make_data(2048, seed=0, labels=labels)
    torch.manual_seed(0)
    model = make_cnn()
    train(model, x_train, y_train, steps=150, lr=0.05)  # off the random initialisation: real outliers
    x, y = x_train[:256], y_train[:256]
    dim = sum(p.numel() for p in model.parameters())
    print(f"\n=== workload '{labels}': CNN conv6-conv12-linear on 1x16x16 inputs, {dim} float32 parameters, "
          f"150 SGD steps; Hessian of the mean cross-entropy on one batch of {len(x)} (eval mode) ===")

    t0 = time.perf_counter()
    model64 = copy.deepcopy(model).double()
    exact_h = dense_matrix(HessianOperator(model64, loss_fn, [(x.double(), y)]))
    exact = torch.linalg.eigvalsh(exact_h).flip(0)
    print(f"ground truth: dense float64 Hessian and eigvalsh in {time.perf_counter() - t0:.1f}s; "
          f"top-6 {[round(float(v), 4) for v in exact[:6]]}, trace {float(exact.sum()):.4f}")
    rows = []
    checks: list[tuple[str, bool]] = []

    # 1. one product against one gradient ------------------------------------------------
    if micro:
        params = list(model.parameters())
        v = torch.randn(dim)
        ops = {label: HessianOperator(model, loss_fn, [(x, y)], method=method, cache_graph=cache)
               for label, method, cache in (("double backward, graph cached (default)", "double-backward", True),
                                            ("double backward, recomputed", "double-backward", False),
                                            ("forward-over-reverse (torch.func)", "forward-over-reverse", False))}
        for op in ops.values():
            op.matvec(v)  # builds the cached graph where there is one
        samples = {"gradient": [], **{label: [] for label in ops}}
        for _ in range(15):  # interleaved, minimum taken: the CPU is shared, contention only adds time
            t1 = time.perf_counter()
            torch.autograd.grad(loss_fn(model(x), y), params)
            samples["gradient"].append(time.perf_counter() - t1)
            for label, op in ops.items():
                t1 = time.perf_counter()
                op.matvec(v)
                samples[label].append(time.perf_counter() - t1)
        t_grad = min(samples["gradient"])
        print(f"one gradient (forward + backward, autograd.grad): {t_grad * 1e3:.1f} ms (min of 15)")
        for label in ops:
            t = min(samples[label])
            print(f"one HVP, {label:40s}: {t * 1e3:6.1f} ms = {t / t_grad:4.2f} x gradient")
        cached = min(samples["double backward, graph cached (default)"]) / t_grad
        recomputed = min(samples["double backward, recomputed"]) / t_grad
        print("method='auto' uses double backward and caches the first-order graph for up to 8 batches, so every "
              "product after the first is one backward pass through it")
        checks.append((f"{labels}: one HVP <= 2.5x one gradient: default (cached graph) {cached:.2f}x; "
                       f"a stand-alone HVP recomputing the forward pass {recomputed:.2f}x", cached <= 2.5))

    # 2. lambda_max ------------------------------------------------------------------------
    def ours_top(k, tol):
        op = HessianOperator(model, loss_fn, [(x, y)])
        result = lanczos(op, k=k, tol=tol)
        return result.eigenvalues.tolist(), result.num_products

    t_ours, (vals, n_ours) = timed(lambda: ours_top(1, 1e-3))
    err1 = rel_err(vals, exact)
    rows.append(("top-1", "lscape lanczos tol=1e-3 (residual)", n_ours, t_ours, err1))
    ph_top1 = None
    if ph is not None:
        t_ph, (vals, n_ph) = timed(lambda: pyhessian_eigenvalues(ph, counter, model, x, y, 1))
        ph_top1 = (n_ph, t_ph)
        rows.append(("top-1", "pyhessian eigenvalues() defaults", n_ph, t_ph, rel_err(vals, exact)))
    if he is not None:
        for algorithm in ("lanczos", "power"):
            t_he, (vals, n_he) = timed(lambda: eigenthings_run(he, model, x, y, algorithm, 1))
            rows.append(("top-1", f"eigenthings {algorithm} defaults", n_he, t_he, rel_err(vals, exact)))

    # 3. top-5 -----------------------------------------------------------------------------
    t_ours5, (vals, n_ours5) = timed(lambda: ours_top(5, 1e-4), repeats=1)
    err5 = rel_err(vals, exact)
    rows.append(("top-5", "lscape lanczos tol=1e-4 (residual)", n_ours5, t_ours5, err5))
    ph_top5 = None
    if ph is not None:
        t_ph5, (vals, n_ph5) = timed(lambda: pyhessian_eigenvalues(ph, counter, model, x, y, 5), repeats=1)
        ph_top5 = (n_ph5, t_ph5)
        rows.append(("top-5", "pyhessian eigenvalues(top_n=5) defaults", n_ph5, t_ph5, rel_err(vals, exact)))
    if he is not None:
        for algorithm in ("lanczos", "power"):
            t_he, (vals, n_he) = timed(lambda: eigenthings_run(he, model, x, y, algorithm, 5), repeats=1)
            rows.append(("top-5", f"eigenthings {algorithm} defaults", n_he, t_he, rel_err(vals, exact)))

    # 4. trace: single estimates are noisy, so both estimators run over 10 seeds ------------
    trace_exact = float(exact.sum())
    seeds = range(10)
    budget = 99
    if ph is not None:
        ph_runs = []
        for seed in seeds:
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            value, n = pyhessian_trace(ph, counter, model, x, y, seed=seed)
            ph_runs.append((value, n, time.perf_counter() - t1))
        mean_n = round(sum(r[1] for r in ph_runs) / len(ph_runs))
        rows.append(("trace", "pyhessian trace() defaults (no error bar)", mean_n,
                     sum(r[2] for r in ph_runs) / len(ph_runs),
                     sum(abs(r[0] - trace_exact) for r in ph_runs) / len(ph_runs) / abs(trace_exact)))
        budgets = [max(6, mean_n), budget]
    else:
        budgets = [budget]
    for n in budgets:
        errors, inside, spent = [], 0, 0.0
        for seed in seeds:
            op = HessianOperator(model, loss_fn, [(x, y)])
            t1 = time.perf_counter()
            est = hutchpp(op, n, seed=seed)
            spent += time.perf_counter() - t1
            errors.append(abs(est.estimate - trace_exact))
            inside += errors[-1] <= 2 * est.stderr
        rows.append(("trace", f"lscape hutchpp n={n} ({inside}/10 within 2 stderr)", n, spent / len(seeds),
                     sum(errors) / len(errors) / abs(trace_exact)))

    print(f"\n{'task':6s} {'method':44s} {'HVPs':>6s} {'time s':>8s} {'true rel. error':>16s}"
          "   (trace rows: means over 10 seeds)")
    for task, name, n, t, err in rows:
        print(f"{task:6s} {name:44s} {n:6d} {t:8.3f} {err:16.2e}")
    checks.append((f"{labels}: top-1 true rel. error <= 1e-3: {err1:.1e}", err1 <= 1e-3))
    checks.append((f"{labels}: top-5 true rel. error <= 1e-4: {err5:.1e}", err5 <= 1e-4))
    if ph_top1 is not None:
        checks.append((f"{labels}: top-1 HVPs <= 0.5x PyHessian: {n_ours} vs {ph_top1[0]} = "
                       f"{n_ours / ph_top1[0]:.2f}x", n_ours <= 0.5 * ph_top1[0]))
        checks.append((f"{labels}: top-1 time <= 0.5x PyHessian: {t_ours:.3f}s vs {ph_top1[1]:.3f}s = "
                       f"{t_ours / ph_top1[1]:.2f}x", t_ours <= 0.5 * ph_top1[1]))
    if ph_top5 is not None:
        checks.append((f"{labels}: top-5 HVPs <= 0.5x PyHessian: {n_ours5} vs {ph_top5[0]} = "
                       f"{n_ours5 / ph_top5[0]:.2f}x", n_ours5 <= 0.5 * ph_top5[0]))

    # 5. warm-started lambda_max during training --------------------------------------------
    student = copy.deepcopy(model)
    x_m, y_m = x_train[-256:], y_train[-256:]
    state = {"v0": None, "warm": [], "cold": [], "err": []}

    def measure(step):
        op = HessianOperator(student, loss_fn, [(x_m, y_m)])
        warm = lanczos(op, k=1, tol=1e-3, v0=state["v0"])
        state["v0"] = warm.eigenvectors
        cold = lanczos(HessianOperator(student, loss_fn, [(x_m, y_m)]), k=1, tol=1e-3, seed=step)
        tight = lanczos(HessianOperator(student, loss_fn, [(x_m, y_m)]), k=1, tol=1e-7, max_iter=200)
        state["warm"].append(warm.num_products)
        state["cold"].append(cold.num_products)
        state["err"].append(rel_err(warm.eigenvalues, tight.eigenvalues))

    train(student, x_train, y_train, steps=30, lr=0.05, seed=1, on_step=measure)
    warm_after_first = state["warm"][1:]
    avg_all = sum(state["warm"]) / len(state["warm"])
    print(f"\nwarm-started λ_max during training (SGD lr 0.05 momentum 0.9, batch 64, measured after every "
          f"step on a fixed batch of 256, tol 1e-3): {len(state['warm'])} measurements; HVPs: first (cold) "
          f"{state['warm'][0]}, then mean {sum(warm_after_first) / len(warm_after_first):.2f} "
          f"(max {max(warm_after_first)}), all {avg_all:.2f}; cold starts mean "
          f"{sum(state['cold']) / len(state['cold']):.2f}; max true rel. error vs a tol=1e-7 solve "
          f"{max(state['err']):.1e}")
    checks.append((f"{labels}: warm-started λ_max <= 5 HVPs on average: {avg_all:.2f} "
                   f"(cold starts {sum(state['cold']) / len(state['cold']):.2f})", avg_all <= 5))
    return checks


if __name__ == "__main__":
    main()
