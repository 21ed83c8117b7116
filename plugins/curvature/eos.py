"""`eos`: the edge of stability — top Hessian eigenvalues against 2/η and the SAM-edge (Long & Bartlett 2023)."""

from __future__ import annotations

from typing import Any

import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.curvature import METHODS, gradient, lanczos
from lscape.params import flat_parameters, set_flat_parameters
from lscape.optim import sam_edge
from lscape.plugins.curvature.base import RecordsProducts, WarmStart, loss_adapter, make_operator

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
               "2ε + 1e-5 (biases every eigenvalue by about −0.5% at ε = 1e-3)", choices=("default", "original")),
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
    )

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
        gn = float(torch.linalg.vector_norm(g))
        rho = self.rho(ctx)
        lr = float(state.lr if state.lr is not None else ctx.lr)
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
        }


@hookimpl
def register_probes(register):
    register(EdgeOfStability)


@hookimpl
def register_plots(register):
    register("eos", plot_eos)


def plot_eos(runs, out_dir):
    """The sam_edge seed's four figures: eigenvalues with SAM-edge and 2/η, eigenvalues with
    the SAM-edge only, alignments with the top eigenvector, and the loss, against step."""
    import numpy as np

    from lscape.plotting import eigenvalue_lines, figure, line, note, run_colours, run_labels, save

    data = [(name, colour, run.read("eos")) for run, name, colour in zip(runs, run_labels(runs), run_colours(len(runs)))]
    # with ρ = 0 the probe stores the SAM-edge's limit 2/η: there is no SAM-edge to draw
    has_sam = any(np.isfinite(np.asarray(d["sam_edge"], dtype=float)).any()
                  and not np.allclose(d["sam_edge"], d["threshold_gd"], equal_nan=True) for _, _, d in data)
    paths = []
    for filename, title, with_gd in (("eos_eigenvalues.png", "Hessian eigenvalues, SAM-edge and 2/η", True),
                                     ("eos_eigenvalues_sam_edge.png", "Hessian eigenvalues and SAM-edge", False)):
        if not with_gd and not has_sam:
            note(f"{filename} not written: the SAM-edge is undefined (rho = 0)")
            continue
        fig, ax = figure(title if has_sam else "Hessian eigenvalues and 2/η", "step", "eigenvalue")
        for name, colour, d in data:
            eigenvalue_lines(ax, d["step"], d["top_eigenvalues"], name, colour if len(data) > 1 else None)
            if has_sam:
                line(ax, d["step"], d["sam_edge"], label=f"{name} SAM-edge", color=colour, ls="--", lw=1.2)
            if with_gd:
                line(ax, d["step"], d["threshold_gd"], label=f"{name} 2/η", color=colour, ls=":", lw=1.2)
        paths.append(save(fig, out_dir / filename, legend=ax))
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


def _alignment(s: torch.Tensor, v: torch.Tensor) -> float:
    ns = float(torch.linalg.vector_norm(s))
    nv = float(torch.linalg.vector_norm(v))
    return abs(float(s @ v)) / (ns * nv) if ns > 0 and nv > 0 else 0.0
