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


# -- round two: held-out-style workloads ------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def make_resnet() -> nn.Module:
    """A BatchNorm ResNet-style CNN with in-place ReLUs (torchvision style) for 8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         ResBlock(8), nn.MaxPool2d(2), ResBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


class CharTransformer(nn.Module):
    """One pre-LayerNorm causal attention block over characters, predicting the next one."""

    def __init__(self, vocab=16, d=16, heads=2, length=12):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(length, d))
        self.block = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids):
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.block(h, src_mask=self.mask[: ids.shape[1], : ids.shape[1]], is_causal=True)
        return self.head(self.norm(h)).reshape(-1, self.head.out_features)


def digits_tensors(n=512, seed=0):
    from lscape.plugins.workloads.defaults import digits

    data = digits(flat=False)["train"]
    x, y = data.tensors if hasattr(data, "tensors") else (data.x, data.y)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx].float().reshape(-1, 1, 8, 8), y[idx]


def r2_workloads():
    """(name, model, x, y, loss, description) of the held-out-style workloads, each trained a little."""
    out = []
    torch.manual_seed(0)
    x, y = digits_tensors(512)
    model = make_resnet()
    train(model, x, y, steps=60, lr=0.05)
    model.eval()
    out.append(("bn-resnet", model, x[:256], y[:256], loss_fn,
                "BatchNorm ResNet-style CNN, in-place ReLU, digits 8x8, eval mode"))
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 16, (2000,), generator=g)
    text = (text + torch.arange(2000) % 4) % 16  # some structure to learn
    starts = torch.randint(0, 2000 - 13, (256,), generator=g)
    seqs = torch.stack([text[s_: s_ + 13] for s_ in starts])
    torch.manual_seed(0)
    tr = CharTransformer()
    opt = torch.optim.Adam(tr.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        loss_fn(tr(seqs[:, :-1]), seqs[:, 1:].reshape(-1)).backward()
        opt.step()
    out.append(("transformer", tr, seqs[:128, :-1], seqs[:128, 1:].reshape(-1), loss_fn,
                "char Transformer (pre-LN attention block, LayerNorm), next-character CE"))
    torch.manual_seed(0)
    saddle = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
    with torch.no_grad():
        for p in saddle.parameters():
            p.mul_(0.05)  # near the saddle at 0 of a two-layer net: large negative curvature
    xs = torch.randn(256, 12, generator=g)
    ys = xs[:, :6] @ torch.randn(6, 6, generator=g) * 3
    out.append(("saddle", saddle, xs, ys, nn.functional.mse_loss, "tanh MLP near the saddle at 0, MSE"))
    return out


def counted(op):
    class Counted:
        dim, dtype, device = op.dim, op.dtype, op.device

        def __init__(self):
            self.n = 0

        def matvec(self, v):
            self.n += 1
            return op.matvec(v)

    return Counted()


def pyhessian_top(ph, counter, model, x, y, lf, top_n=1):
    counter["n"] = 0
    m = copy.deepcopy(model)
    torch.manual_seed(0)
    h = ph.hessian(m, lf, data=(x, y), cuda=False)
    values, _ = h.eigenvalues(top_n=top_n)
    return values, counter["n"]


def round_two(ph, counter, he) -> list[tuple[str, bool]]:
    import numpy as np
    import scipy.sparse.linalg as sla

    checks = []
    print("\n==== round two: held-out-style workloads (float32 models, truth from the dense float64 Hessian) ====")
    for name, model, x, y, lf, desc in r2_workloads():
        dim = sum(p.numel() for p in model.parameters())
        model64 = copy.deepcopy(model).double()
        x64 = x.double() if x.is_floating_point() else x
        y64 = y.double() if y.is_floating_point() else y
        t0 = time.perf_counter()
        exact = torch.linalg.eigvalsh(dense_matrix(HessianOperator(model64, lf, [(x64, y64)])))
        print(f"\n--- {name}: {desc}; {dim} parameters, batch {len(x)}; dense truth in {time.perf_counter() - t0:.1f}s; "
              f"λ_max {float(exact[-1]):.5g}, λ_min {float(exact[0]):.5g}")
        lm_true = float(exact[exact.abs().argmax()])
        rows = []
        for which, truth in (("LA", float(exact[-1])), ("SA", float(exact[0])), ("LM", lm_true)):
            op = HessianOperator(model, lf, [(x, y)])
            t1 = time.perf_counter()
            r = lanczos(op, k=1, which=which, tol=1e-3)
            rows.append((f"λ {which}", "lscape lanczos tol=1e-3", r.num_products, time.perf_counter() - t1,
                         abs(float(r.eigenvalues[0]) - truth) / abs(truth), bool(r.converged[0])))
        if ph is not None and name != "transformer":
            try:
                t1 = time.perf_counter()
                values, n = pyhessian_top(ph, counter, model, x, y, lf)
                # PyHessian's power iteration converges to the largest |λ|: compare with LM (and LA)
                rows.append(("λ LM", "pyhessian eigenvalues() defaults", n, time.perf_counter() - t1,
                             abs(float(values[0]) - lm_true) / abs(lm_true), None))
            except Exception as e:  # noqa: BLE001
                print(f"pyhessian failed on {name}: {type(e).__name__}: {e}")
        if he is not None:
            try:
                m = copy.deepcopy(model)
                hop = CountingOperator(he.HessianOperator(m, [(x, y)], he.supervised_loss(lf), full_dataset=True))
                t1 = time.perf_counter()
                res = he.deflated_power_iteration(hop, k=1, seed=0)
                rows.append(("λ LM", "eigenthings power defaults", hop.n, time.perf_counter() - t1,
                             abs(float(res.eigenvalues[0]) - lm_true) / abs(lm_true), None))
            except Exception as e:  # noqa: BLE001
                print(f"hessian-eigenthings failed on {name}: {type(e).__name__}: {e}")
        # top-20: lscape at a few tolerances against scipy eigsh (ARPACK) with a product budget
        top_true = exact.flip(0)[:20]
        for tol in (1e-3, 1e-4, 1e-5):
            op = HessianOperator(model, lf, [(x, y)])
            t1 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # tol=1e-5 is below float32's floor: said in the row
                r = lanczos(op, k=20, tol=tol)
            err = float(((r.eigenvalues - top_true).abs() / top_true.abs()).max())
            rows.append(("top-20", f"lscape lanczos k=20 tol={tol:g}", r.num_products, time.perf_counter() - t1, err,
                         bool(r.all_converged)))
        op = counted(HessianOperator(model, lf, [(x, y)]))
        lin = sla.LinearOperator((dim, dim), matvec=lambda v: op.matvec(torch.as_tensor(np.asarray(v).ravel(),
                                                                                     dtype=torch.float32)).double().numpy(),
                                 dtype=np.float64)
        t1 = time.perf_counter()
        vals = np.sort(sla.eigsh(lin, k=20, which="LA", tol=1e-5, v0=np.ones(dim), return_eigenvectors=False))[::-1]
        rows.append(("top-20", "scipy eigsh k=20 tol=1e-5", op.n, time.perf_counter() - t1,
                     float(np.max(np.abs(vals - top_true.numpy()) / np.abs(top_true.numpy()))), None))
        print(f"{'task':7s} {'method':40s} {'HVPs':>5s} {'time s':>7s} {'true rel. err':>14s} converged")
        for task, meth, n, t, err, conv in rows:
            print(f"{task:7s} {meth:40s} {n:5d} {t:7.3f} {err:14.2e} {'' if conv is None else conv}")
        ours = [r_ for r_ in rows if r_[1] == "lscape lanczos tol=1e-3" and r_[0] == "λ LA"][0]
        theirs = [r_ for r_ in rows if r_[1].startswith("pyhessian")]
        if theirs:
            checks.append((f"{name}: λ_max at 1e-3 in <= 0.5x PyHessian's products: {ours[2]} vs {theirs[0][2]} "
                           f"(errors {ours[4]:.1e} vs {theirs[0][4]:.1e})",
                           ours[4] <= 1e-3 and ours[2] <= 0.5 * theirs[0][2]))
        best = min((r_ for r_ in rows if r_[0] == "top-20" and r_[1].startswith("lscape") and r_[4] <= 1e-5),
                   key=lambda r_: r_[2], default=None)
        checks.append((f"{name}: top-20 at 1e-5 in <= 64 products: "
                       + (f"{best[2]} products ({best[1]}, error {best[4]:.1e})" if best else "not reached"),
                       best is not None and best[2] <= 64))
    checks += ggn_memory()
    return checks


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_during(fn) -> int:
    """Peak resident memory above the level before ``fn`` runs, sampled every 0.5 ms by a thread
    (large blocks are mmapped and returned on free, so RSS follows live memory)."""
    import threading

    base, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        out = fn()
        peak[0] = max(peak[0], _rss())
    finally:
        done.set()
        t.join()
    del out
    return peak[0] - base


def _peak_rss_child(kind: str, vocab: int, chunk: int, queue) -> None:
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from lscape.batch import BatchAdapter
    from lscape.plugins.workloads.defaults import cross_entropy

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    params = "lm_head.*"
    if kind == "forward":
        op = HessianOperator(model, BatchAdapter(cross_entropy), [batch], params=params)

        def forward():
            with torch.enable_grad():
                return op.adapter.loss(model, batch)  # one forward with its graph (activations kept)

        queue.put(_peak_during(forward))
        return
    loss = cross_entropy if kind == "ggn-analytic" else (lambda o, t: cross_entropy(o, t) * 1.0)
    op = HessianOperator(model, BatchAdapter(loss), [batch], params=params, kind="ggn", chunk=chunk or None)
    v = torch.randn(op.dim)
    op.matvec(v)  # warm-up (lazy initialisations)
    queue.put(_peak_during(lambda: op.matvec(v)))


def ggn_memory() -> list[tuple[str, bool]]:
    """Peak resident memory added by one forward pass vs one GGN product on a 32k-vocabulary LM
    (a fresh process per measurement; RSS, so allocator slack is included)."""
    import multiprocessing as mp

    try:
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"transformers unavailable ({e}); GGN memory rows skipped")
        return []
    import os

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the children return freed large blocks to the OS
    ctx = mp.get_context("spawn")
    results = {}
    for kind, chunk in (("forward", 0), ("ggn-analytic", 0), ("ggn-analytic", 2), ("ggn-autograd", 0)):
        q = ctx.Queue()
        proc = ctx.Process(target=_peak_rss_child, args=(kind, 32000, chunk, q))
        proc.start()
        results[(kind, chunk)] = q.get()
        proc.join()
    fwd = results[("forward", 0)]
    print("\n--- GGN product memory: GPT-2 (1 layer, d=32, vocab 32,000, untied lm_head), batch 8 x 63 tokens, "
          "GGN over lm_head (1.0M parameters); peak RSS above the level before, sampled, fresh process each")
    print(f"one forward with its graph (the activations)      : {fwd / 2**20:7.1f} MiB")
    fwd = max(fwd, 1)
    for (kind, chunk), b in results.items():
        if kind != "forward":
            print(f"one GGN product, {kind:12s} chunk={chunk or 'none':4} : {b / 2**20:7.1f} MiB = {b / fwd:4.2f} x forward")
    ratio = results[("ggn-analytic", 0)] / fwd
    return [(f"GGN product peak memory on a 32k-vocab LM <= 1.5x one forward: {ratio:.2f}x "
             f"(chunk=2: {results[('ggn-analytic', 2)] / fwd:.2f}x; autograd GGN {results[('ggn-autograd', 0)] / fwd:.2f}x)",
             ratio <= 1.5)]


if __name__ == "__main__":
    if "--round2" in sys.argv:  # only the held-out-style workloads of round two
        print(f"lscape curvature benchmark, round two: torch {torch.__version__}, python {platform.python_version()}, "
              f"{platform.machine()}, 1 thread")
        ph, counter = load_pyhessian()
        he = load_eigenthings()
        results = round_two(ph, counter, he)
        print("\ntargets (workload: check)")
        for text, ok in results:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
    else:
        main()
