"""`eos`: the edge of stability — top Hessian eigenvalues against the optimizer's threshold (2/η for GD,
(2 + 2β)/η for heavy ball, 38/η for Adam in the preconditioned λ_max), the SAM-edge (Long & Bartlett 2023)
and, optionally, batch sharpness (Andreyev & Beneventano 2024)."""

from __future__ import annotations

from typing import Any

import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.curvature import (METHODS, PreconditionedHessian, batch_sharpness, edge_threshold,
                              gradient, lanczos, preconditioner, preconditioner_rule)
from lscape.data import derived_seed, fixed_batches, shard
from lscape.errors import UsageError
from lscape.params import flat_parameters, set_flat_parameters
from lscape.optim import sam_edge
from lscape.plugins.curvature.base import RecordsProducts, WarmStart, check_curvature, loss_adapter, make_operator

__all__ = ["EdgeOfStability", "plot_eos"]


class EdgeOfStability(WarmStart, RecordsProducts, Probe):
    """λ_max (top-k) of the training loss's Hessian with the stability thresholds 2/η and SAM-edge.

    On the step's minibatch (the full batch under ``--batch-size full``), at θ_step with
    exact Hessian-vector products and Lanczos: ``top_eigenvalues`` and ``lambda_max``,
    ``hessian_norm`` ‖H‖ = largest |λ| (what the sam_edge seed reports; option ``norm``),
    ``threshold_gd`` = 2/η, ``grad_norm`` ‖g‖, ``sam_edge`` from ‖g‖ (2/η when ρ = 0), the
    alignments |⟨s, v₁⟩|/‖s‖ of the gradient s = g and of the SAM gradient s = ∇L(θ + ρ
    g/(‖g‖ + 1e-5)) with the top eigenvector v₁, the loss, and the wall-clock ``time``.
    ρ is the option ``rho``, or the active ``sam`` plugin's, or 0.

    The optimizer's own threshold (:func:`lscape.curvature.edge_threshold`) is ``threshold``:
    2/η for GD/SGD, (2 + 2β)/η for heavy-ball momentum β, (2 + 2β₁)/((1 − β₁)η) for Adam/AdamW
    (38/η at β₁ = 0.9), with ``threshold_name``/``threshold_formula`` in the attrs (NaN and
    the reason for an optimizer without a rule). It applies to λ_max of the preconditioned
    Hessian P^{-1/2} H P^{-1/2} (P from the optimizer's state, rule in ``preconditioner_rule``):
    ``lambda_max_preconditioned`` (by Lanczos for an adaptive optimizer, option
    ``preconditioned``; λ_max/c when P = c·I, as for SGD: no extra products; NaN before the
    optimizer's first update) and ``preconditioned_ratio`` = lambda_max_preconditioned / threshold.
    With ``batch_sharpness=N`` also the batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] (the mean of the
    per-batch quotients, Andreyev & Beneventano's default estimator) over N mini-batches of
    the training batch size, drawn as the training sampler draws them (disjoint batches of a
    seeded shuffle, a further shuffle when N batches exceed one epoch; a fresh draw at every
    measurement, the training stream untouched), to compare with 2/η (``threshold_gd``).
    """

    name = "eos"
    help = "λ_max and top-k Hessian eigenvalues vs 2/η and the SAM-edge, gradient/SAM-gradient alignment"
    schedule = "every:10"
    data = "minibatch"
    at = "after_backward"
    options = (
        Option("k", int, 1, "number of top eigenvalues", minimum=1),
        Option("rho", float, None, "SAM radius (default: the active sam plugin's rho, else 0)", minimum=0.0),
        Option("tol", float, 1e-3, "Lanczos tolerance on residual/|λ|", minimum=0.0),
        Option("max_iter", int, 100, "Lanczos Hessian-vector products at most", minimum=1),
        Option("mode", str, "train", "module mode for gradients and products", choices=("train", "eval")),
        Option("warm_start", bool, True, "start Lanczos from the previous measurement's eigenvectors"),
        Option("norm", bool, True, "also measure ‖H‖ = largest |λ| (the sam_edge seed's number) by Lanczos LM"),
        Option("method", str, "auto", "Hessian-vector products: auto (double backward, checked against finite "
               "differences on the first product), or forced; finite-difference with fd_eps is the seed's",
               choices=METHODS),
        Option("fd_eps", float, 1e-3, "finite-difference step ε (method=finite-difference)", minimum=0.0),
        Option("compat", str, "default", "original: the sam_edge seed's finite-difference HVP, divided by "
               "2ε + 1e-5 (on smooth networks every eigenvalue ×2ε/(2ε + 1e-5), −0.5% at ε = 1e-3; "
               "on ReLU networks the differences cross kinks: see docs/plugins/eos.md)",
               choices=("default", "original")),
        Option("preconditioned", bool, True, "with an adaptive optimizer (Adam, RMSprop, Adagrad...) also measure "
               "λ_max of P^-1/2 H P^-1/2, P from the optimizer's state, against its threshold (38/η for Adam)"),
        Option("batch_sharpness", int, 0, "batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] over this many mini-batches of "
               "the training batch size (one gradient and one product each; 0: off)", minimum=0),
    )
    outputs = (
        Output("lambda_max", long_name="largest Hessian eigenvalue λ₁"),
        Output("hessian_norm", long_name="‖H‖ = largest |λ| (what the sam_edge seed reports)"),
        Output("norm_products", dtype="int64", long_name="Hessian-vector products for ‖H‖"),
        Output("top_eigenvalues", dims=("k",), long_name="top-k Hessian eigenvalues"),
        Output("residuals", dims=("k",), long_name="Lanczos residuals ‖Hv − λv‖"),
        Output("threshold_gd", units="1/lr", long_name="gradient-descent stability threshold 2/η"),
        Output("sam_edge", units="1/lr", long_name="SAM-edge (‖g‖/2ρ)(√(1+8ρ/(η‖g‖))−1)"),
        Output("grad_norm", long_name="gradient norm ‖g‖ on the measured batch"),
        Output("loss", long_name="loss on the measured batch"),
        Output("grad_alignment", long_name="|cos(g, v₁)|"),
        Output("sam_grad_alignment", long_name="|cos(∇L(θ+ρg/‖g‖), v₁)|"),
        Output("time", units="s", long_name="wall-clock time since the run started"),
        Output("hvp_products", dtype="int64", long_name="Hessian-vector products spent"),
        Output("threshold", units="1/lr", long_name="the optimizer's stability threshold (attrs threshold_formula)"),
        Output("lambda_max_preconditioned", long_name="largest eigenvalue of P^-1/2 H P^-1/2 (= of P⁻¹H)"),
        Output("preconditioned_ratio", long_name="lambda_max_preconditioned / threshold"),
        Output("preconditioned_products", dtype="int64", long_name="Hessian-vector products for the preconditioned λ_max"),
        Output("batch_sharpness", long_name="batch sharpness: mean over mini-batches of g_BᵀH_Bg_B/‖g_B‖²"),
        Output("batch_sharpness_stderr", long_name="standard error of the batch sharpness"),
        Output("batch_sharpness_products", dtype="int64", long_name="Hessian-vector products for the batch sharpness"),
    )

    _edge_attrs: dict[str, Any] | None = None
    _rule: Any = None

    def check(self, ctx) -> None:
        """k within the parameters and memory (as every curvature probe); read the optimizer's rule
        and threshold once (attrs); batch sharpness needs a sized data set."""
        check_curvature(self, ctx)
        optimizer = getattr(ctx, "optimizer", None)
        try:
            rule = preconditioner_rule(optimizer) if optimizer is not None else None
            if rule is None:
                raise ValueError("no optimizer")
            edge = edge_threshold(optimizer)
        except ValueError as err:
            self._rule = None
            self._edge_attrs = {"threshold_name": "none", "threshold_formula": f"no threshold: {err}"}
        else:
            self._rule = rule
            self._edge_attrs = {"threshold_name": edge.name, "threshold_formula": edge.formula,
                                "preconditioner_rule": rule.name, "preconditioner_formula": rule.formula,
                                "matrix_preconditioned": PreconditionedHessian.describe_matrix(optimizer)["matrix"]}
        if self.opts.batch_sharpness and not hasattr(ctx.train_set, "__len__"):
            raise UsageError(f"{self.name}.batch_sharpness needs a training set with a length (mini-batches are "
                             f"drawn from it), not an iterable data set")

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs.update(self._edge_attrs or {})
        return attrs

    cost_model = ("at most max_iter + k products (top-k); with norm, max_iter + 1 more (‖H‖); with preconditioned "
                  "and an adaptive optimizer, max_iter + 1 more (P⁻¹H); with batch_sharpness=N, N more; plus gradients")

    def planned_products(self, ctx) -> dict[str, int]:
        """Products per measurement at most, by part (see ``cost_model``)."""
        o = self.opts
        plan = {"top-k": max(o.max_iter, o.k) + o.k, "norm": o.max_iter + 1 if o.norm else 0,
                "preconditioned": o.max_iter + 1 if o.preconditioned and self._rule is not None else 0,
                "batch sharpness": int(o.batch_sharpness or 0)}
        return {part: n for part, n in plan.items() if n}

    def rho(self, ctx) -> float:
        """ρ used for the SAM-edge and the SAM gradient."""
        if self.opts.rho is not None:
            return float(self.opts.rho)
        owner = getattr(ctx, "step_owner", None)
        if owner is not None and getattr(owner, "name", None) == "sam":
            return float(owner.opts.rho)
        return 0.0

    def measure(self, ctx, state) -> dict[str, Any]:
        batches = self.batches(ctx, state)
        mode = self.opts.mode
        original = self.opts.compat == "original"
        method = "finite-difference" if original else self.opts.method
        op = make_operator(self, ctx, batches, method=method, fd_eps=self.opts.fd_eps or 1e-3,
                           fd_offset=1e-5 if original else 0.0, seed=0)
        g = op.gradient()
        loss = op.loss()
        k = min(self.opts.k, op.dim)
        res = lanczos(op, k=k, which="LA", tol=self.opts.tol, max_iter=max(self.opts.max_iter, k),
                      v0=self.warm_vectors(op))
        norm, norm_products = float("nan"), 0
        if self.opts.norm:
            # ‖H‖ = max(λ_max, |λ_min|): the largest-magnitude end, warm-started on its own.
            before = op.num_products
            lm = lanczos(op, k=1, which="LM", tol=self.opts.tol, max_iter=self.opts.max_iter,
                         v0=self.warm_vectors(op, "LM"))
            self.keep_vectors(lm, "LM")
            norm = max(abs(float(lm.eigenvalues[0])), float(res.eigenvalues[0]))
            norm_products = op.num_products - before
        op.release()
        v1 = res.eigenvectors[0].to(g.dtype)
        self.keep_vectors(res)
        lr = float(state.lr if state.lr is not None else ctx.lr)
        lam = float(res.eigenvalues[0])
        edge = self._edge(ctx, batches, op, lam, lr, method, original)
        if self.opts.batch_sharpness:
            edge.update(self._batch_sharpness(ctx, state, method, original))
        gn = float(torch.linalg.vector_norm(g))
        rho = self.rho(ctx)
        if rho > 0 and gn > 0:
            theta = flat_parameters(op.params)
            set_flat_parameters(op.params, theta + rho * g / (gn + 1e-5))
            try:
                s = gradient(ctx.model, loss_adapter(ctx), batches, params=op.params, mode=mode)
            finally:
                set_flat_parameters(op.params, theta)
        else:
            s = g
        return {
            "lambda_max": float(res.eigenvalues[0]),
            "hessian_norm": norm,
            "norm_products": int(norm_products),
            "top_eigenvalues": res.eigenvalues.detach().cpu(),
            "residuals": res.residuals.detach().cpu(),
            "threshold_gd": 2.0 / lr,
            "sam_edge": sam_edge(gn, lr, rho),
            "grad_norm": gn,
            "loss": loss,
            "grad_alignment": _alignment(g, v1),
            "sam_grad_alignment": _alignment(s, v1),
            "time": float(state.time),
            "hvp_products": int(res.num_products),
            **edge,
        }

    def _edge(self, ctx, batches, op, lam: float, lr: float, method: str, original: bool) -> dict[str, Any]:
        """The optimizer's threshold and λ_max of P^-1/2 H P^-1/2 with their ratio."""
        nan = float("nan")
        if self._rule is None:
            return {"threshold": nan, "lambda_max_preconditioned": nan, "preconditioned_ratio": nan,
                    "preconditioned_products": 0}
        threshold = edge_threshold(ctx.optimizer, lr=lr).value
        pre, products = nan, 0
        try:
            p = preconditioner(ctx.optimizer, op.params, lr)
        except ValueError:  # before the first update there is no P (NotSteppedError), or a
            p = None        # parameter never updated has none: eos measures the rest regardless
        if p is not None:
            first = p.diag.reshape(-1)[0]
            if p.sign > 0 and bool((p.diag == first).all()):  # P = c·I (SGD): λ(P⁻¹H) = λ(H)/c
                pre = lam / float(first)
            elif self.opts.preconditioned:
                pop = make_operator(self, ctx, batches, kind="preconditioned", method=method,
                                    fd_eps=self.opts.fd_eps or 1e-3, fd_offset=1e-5 if original else 0.0, seed=0)
                rp = lanczos(pop, k=1, which="LA", tol=self.opts.tol, max_iter=self.opts.max_iter,
                             v0=self.warm_vectors(pop, "preconditioned"))
                pop.release()
                self.keep_vectors(rp, "preconditioned")
                pre, products = float(rp.eigenvalues[0]), int(rp.num_products)
        return {"threshold": threshold, "lambda_max_preconditioned": pre,
                "preconditioned_ratio": pre / threshold if threshold > 0 else nan,
                "preconditioned_products": products}

    def _batch_sharpness(self, ctx, state, method: str, original: bool) -> dict[str, Any]:
        """Batch sharpness over ``batch_sharpness`` fresh mini-batches of the training batch size."""
        # as the training sampler draws them: disjoint batches of a fresh shuffle, one more
        # shuffle ("epoch") whenever the data holds fewer than the batches asked for
        wanted, size = int(self.opts.batch_sharpness), min(ctx.batch_size, len(ctx.train_set))
        per_epoch = max(1, len(ctx.train_set) // size)
        drawn: list[Any] = []
        for epoch in range(-(-wanted // per_epoch)):
            seed = derived_seed(ctx.config.seed, "batch-sharpness", int(state.step), epoch)
            drawn += fixed_batches(ctx.train_set, size, min(per_epoch, wanted - len(drawn)), seed, ctx.device,
                                   workers=ctx.cache.get("workers", 0))
        drawn = [shard(b, ctx.rank, ctx.world_size) for b in drawn]

        def one_batch(model, loss_fn, batch, params=None, mode=None):
            return make_operator(self, ctx, batch, kind="hessian", mode=mode, method=method,
                                 fd_eps=self.opts.fd_eps or 1e-3, fd_offset=1e-5 if original else 0.0, seed=0)

        try:
            bs = batch_sharpness(ctx.model, loss_adapter(ctx), drawn, mode=self.opts.mode, operator=one_batch)
        except ValueError:  # every drawn batch has a zero gradient: undefined
            return {"batch_sharpness": float("nan"), "batch_sharpness_stderr": float("nan"),
                    "batch_sharpness_products": 0}
        return {"batch_sharpness": bs.value, "batch_sharpness_stderr": bs.stderr,
                "batch_sharpness_products": int(bs.num_products)}


@hookimpl
def register_probes(register):
    register(EdgeOfStability)


@hookimpl
def register_plots(register):
    register("eos", plot_eos)


def plot_eos(runs, out_dir):
    """The sam_edge seed's four figures: eigenvalues with SAM-edge and 2/η (and the optimizer's
    own threshold when it differs, e.g. (2 + 2β)/η, and the batch sharpness when recorded),
    eigenvalues with the SAM-edge only, alignments with the top eigenvector, and the loss,
    against step; with an adaptive optimizer also ``eos_preconditioned.png``, λ_max(P⁻¹H)
    against its threshold (38/η for Adam) beside the raw λ_max."""
    import numpy as np

    from lscape.plotting import eigenvalue_lines, figure, line, note, run_colours, run_labels, save

    data = [(name, colour, run.read("eos")) for run, name, colour in zip(runs, run_labels(runs), run_colours(len(runs)))]
    formulas = {name: run.group_attrs("eos").get("threshold_formula", "threshold")
                for run, name in zip(runs, run_labels(runs))}
    # with ρ = 0 the probe stores the SAM-edge's limit 2/η: there is no SAM-edge to draw
    has_sam = any(np.isfinite(np.asarray(d["sam_edge"], dtype=float)).any()
                  and not np.allclose(d["sam_edge"], d["threshold_gd"], equal_nan=True) for _, _, d in data)
    paths = []
    for filename, title, with_gd in (("eos_eigenvalues.png", "Hessian eigenvalues, SAM-edge and 2/η", True),
                                     ("eos_eigenvalues_sam_edge.png", "Hessian eigenvalues and SAM-edge", False)):
        if not with_gd and not has_sam:
            note(f"{filename} not written: the SAM-edge is undefined (rho = 0)")
            continue
        own = with_gd and any(_differs(d, "threshold", "threshold_gd")
                              and not _finite(d, "lambda_max_preconditioned", "lambda_max") for _, _, d in data)
        fig, ax = figure(title if has_sam else "Hessian eigenvalues, 2/η and the optimizer's threshold" if own
                         else "Hessian eigenvalues and 2/η", "step", "eigenvalue")
        for name, colour, d in data:
            eigenvalue_lines(ax, d["step"], d["top_eigenvalues"], name, colour if len(data) > 1 else None)
            if has_sam:
                line(ax, d["step"], d["sam_edge"], label=f"{name} SAM-edge", color=colour, ls="--", lw=1.2)
            if with_gd:
                line(ax, d["step"], d["threshold_gd"], label=f"{name} 2/η", color=colour, ls=":", lw=1.2)
                if _differs(d, "threshold", "threshold_gd") and not _finite(d, "lambda_max_preconditioned", "lambda_max"):
                    # heavy ball: the optimizer's own threshold for the raw λ_max
                    line(ax, d["step"], d["threshold"], label=f"{name} {formulas[name]}", color=colour, ls="-.", lw=1.2)
                if _finite(d, "batch_sharpness"):
                    line(ax, d["step"], d["batch_sharpness"], label=f"{name} batch sharpness", color=colour,
                         ls="--", lw=1.0, marker=".")
        paths.append(save(fig, out_dir / filename, legend=ax))
    adaptive = [(name, colour, d) for name, colour, d in data if _finite(d, "lambda_max_preconditioned", "lambda_max")]
    if adaptive:  # the preconditioned λ_max against the optimizer's threshold (38/η for Adam)
        fig, ax = figure("preconditioned λ_max against the optimizer's threshold", "step", "eigenvalue")
        for name, colour, d in adaptive:
            line(ax, d["step"], d["lambda_max_preconditioned"], label=f"{name} λ_max(P⁻¹H)", color=colour)
            line(ax, d["step"], d["threshold"], label=f"{name} {formulas[name]}", color=colour, ls=":", lw=1.2)
            line(ax, d["step"], d["lambda_max"], label=f"{name} λ_max(H)", color=colour, ls="--", lw=1.0)
        paths.append(save(fig, out_dir / "eos_preconditioned.png", legend=ax))
    fig, ax = figure("alignment with the top eigenvector", "step", "|cos|")
    for name, colour, d in data:
        line(ax, d["step"], d["grad_alignment"], label=f"{name} gradient", color=colour)
        line(ax, d["step"], d["sam_grad_alignment"], label=f"{name} SAM gradient", color=colour, ls="--")
    paths.append(save(fig, out_dir / "eos_alignment.png", legend=ax, auto_log=False))
    fig, ax = figure("training loss (measured batch)", "step", "loss")
    for name, colour, d in data:
        line(ax, d["step"], d["loss"], label=name, color=colour)
    ax.set_yscale("log")
    paths.append(save(fig, out_dir / "eos_loss.png", legend=ax))
    # The seed's x-axis is wall-clock time: the same eigenvalue and loss figures against it.
    timed = [(name, colour, d) for name, colour, d in data if "time" in d and np.isfinite(np.asarray(d["time"], dtype=float)).any()]
    if timed:
        fig, ax = figure("Hessian eigenvalues and thresholds against wall-clock time", "time (s)", "eigenvalue")
        for name, colour, d in timed:
            eigenvalue_lines(ax, d["time"], d["top_eigenvalues"], name, colour if len(timed) > 1 else None)
            if "hessian_norm" in d and np.isfinite(np.asarray(d["hessian_norm"], dtype=float)).any():
                line(ax, d["time"], d["hessian_norm"], label=f"{name} ‖H‖", color=colour, ls="-.", lw=1.0)
            if has_sam:
                line(ax, d["time"], d["sam_edge"], label=f"{name} SAM-edge", color=colour, ls="--", lw=1.2)
            line(ax, d["time"], d["threshold_gd"], label=f"{name} 2/η", color=colour, ls=":", lw=1.2)
        paths.append(save(fig, out_dir / "eos_eigenvalues_time.png", legend=ax))
        fig, ax = figure("training loss (measured batch) against wall-clock time", "time (s)", "loss")
        for name, colour, d in timed:
            line(ax, d["time"], d["loss"], label=name, color=colour)
        ax.set_yscale("log")
        paths.append(save(fig, out_dir / "eos_loss_time.png", legend=ax))
    return paths


def _finite(d: dict, name: str, unlike: str | None = None) -> bool:
    """Whether array ``name`` was recorded with a finite value (and differs from ``unlike``)."""
    import numpy as np

    if name not in d or not np.isfinite(np.asarray(d[name], dtype=float)).any():
        return False
    return unlike is None or _differs(d, name, unlike)


def _differs(d: dict, name: str, other: str) -> bool:
    import numpy as np

    if name not in d or other not in d:
        return False
    a, b = np.asarray(d[name], dtype=float), np.asarray(d[other], dtype=float)
    return bool(np.isfinite(a).any()) and not np.allclose(a, b, equal_nan=True, rtol=1e-9)


def _alignment(s: torch.Tensor, v: torch.Tensor) -> float:
    ns = float(torch.linalg.vector_norm(s))
    nv = float(torch.linalg.vector_norm(v))
    return abs(float(s @ v)) / (ns * nv) if ns > 0 and nv > 0 else 0.0
