"""`sharpness`: the largest Hessian eigenvalue λ_max on a schedule, by warm-started Lanczos."""

from __future__ import annotations

from typing import Any

import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.curvature import HessianOperator, lanczos
from lscape.data import derived_seed, fixed_batches

__all__ = ["Sharpness", "CURVATURE_OPTIONS", "make_operator", "curvature_batches", "plot_sharpness"]

#: Options every curvature probe shares: which matrix, over which parameters, in which mode.
CURVATURE_OPTIONS = (
    Option("mode", str, "eval", "module mode during products (eval: running BN stats, no dropout)",
           choices=("eval", "train")),
    Option("params", str, None, "parameter subset: comma-separated glob patterns on names (default: all)"),
    Option("kind", str, "hessian", "matrix: the Hessian or the Gauss-Newton matrix", choices=("hessian", "ggn")),
    Option("method", str, "auto", "Hessian-vector products",
           choices=("auto", "double-backward", "forward-over-reverse")),
)


class WarmStart:
    """Probe mixin: keeps the eigenvectors of the previous measurement so the next Lanczos
    starts from them (option ``warm_start``), and saves them in checkpoints so a resumed
    run starts where it stopped."""

    _v0: torch.Tensor | None = None

    def warm_vectors(self, op: HessianOperator) -> torch.Tensor | None:
        """The previous eigenvectors, if warm starts are on and they fit ``op``."""
        v0 = self._v0
        return v0 if self.opts.warm_start and v0 is not None and v0.shape[-1] == op.dim else None

    def keep_vectors(self, result: Any) -> None:
        self._v0 = result.eigenvectors.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"v0": self._v0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._v0 = state.get("v0")


def make_operator(probe: Probe, ctx: Any, batches: list[Any]) -> HessianOperator:
    """The curvature operator a probe's options describe, on ``batches`` at the current θ."""
    opts = probe.opts
    return HessianOperator(ctx.model, ctx.adapter, batches, params=opts.params, mode=opts.mode,
                           method=opts.method, kind=opts.kind)


def curvature_batches(probe: Probe, ctx: Any, state: Any) -> list[Any]:
    """The probe's batches; with ``data=subset`` one fixed subset shared by all curvature probes.

    ``sharpness``, ``hessian`` and ``hessian-exact`` then describe the same matrix, so their
    numbers can be compared (λ_max from Lanczos against the dense spectrum, say).
    """
    if probe.opts.data != "subset":
        return Probe.batches(probe, ctx, state)
    return probe.measurement_subset(ctx, purpose="curvature")


class Sharpness(WarmStart, Probe):
    """λ_max of the loss Hessian (largest algebraic eigenvalue) with its residual and cost.

    Lanczos with full reorthogonalisation on exact Hessian-vector products, stopped when
    ‖Hv − λv‖ ≤ ``tol``·|λ|, started from the previous measurement's eigenvector so that a
    slowly changing λ_max costs a few products per measurement. Measured by default on a
    fixed subset of training batches (``data=subset``), so successive values differ only
    because θ moved.
    """

    name = "sharpness"
    help = "λ_max of the Hessian by warm-started Lanczos, with residual ‖Hv−λv‖ and HVP count"
    schedule = "every:10"
    data = "subset"
    at = "after_backward"
    options = CURVATURE_OPTIONS + (
        Option("tol", float, 1e-3, "stop when the residual ‖Hv − λv‖ ≤ tol·|λ|", minimum=0.0),
        Option("max_iter", int, 100, "Hessian-vector products at most per measurement", minimum=1),
        Option("warm_start", bool, True, "start from the previous measurement's eigenvector"),
    )
    outputs = (
        Output("lambda_max", long_name="largest Hessian eigenvalue λ_max"),
        Output("residual", long_name="Lanczos residual ‖Hv − λv‖ of the returned pair"),
        Output("converged", dtype="bool", long_name="residual within tol·|λ|"),
        Output("iterations", dtype="int64", long_name="Lanczos iterations"),
        Output("hvp_products", dtype="int64", long_name="Hessian-vector products spent"),
        Output("loss", long_name="loss on the measured batches"),
    )

    def batches(self, ctx, state) -> list[Any]:
        return curvature_batches(self, ctx, state)

    def measure(self, ctx, state) -> dict[str, Any]:
        op = make_operator(self, ctx, self.batches(ctx, state))
        result = lanczos(op, k=1, which="LA", tol=self.opts.tol, max_iter=self.opts.max_iter,
                         v0=self.warm_vectors(op), seed=int(state.step))
        op.release()
        self.keep_vectors(result)
        return {
            "lambda_max": float(result.eigenvalues[0]),
            "residual": float(result.residuals[0]),
            "converged": bool(result.converged[0]),
            "iterations": int(result.iterations),
            "hvp_products": int(result.num_products),
            "loss": op.loss(),
        }


@hookimpl
def register_probes(register):
    register(Sharpness)


@hookimpl
def register_plots(register):
    register("sharpness", plot_sharpness)


def plot_sharpness(runs, out_dir):
    """λ_max against step, with the gradient-descent stability threshold 2/η where recorded."""
    import numpy as np

    from lscape.plotting import figure, line, run_colours, run_labels, save

    fig, ax = figure("sharpness λ_max", "step", "λ_max")
    for run, name, colour in zip(runs, run_labels(runs), run_colours(len(runs))):
        d = run.read("sharpness")
        line(ax, d["step"], d["lambda_max"], label=f"{name} λ_max", color=colour)
        if run.has("train"):
            train = run.read("train")
            if "lr" in train and len(train["lr"]) and len(d["lambda_max"]):
                lr = np.asarray(train["lr"], dtype=float)
                with np.errstate(divide="ignore"):
                    threshold = np.where(lr > 0, 2.0 / lr, np.nan)
                # 2/η far above λ_max would flatten the curve that matters; show it when near.
                if np.nanmin(threshold) < 5 * np.nanmax(d["lambda_max"]):
                    ax.plot(train["step"], threshold, ":", lw=1.0, color=colour, label=f"{name} 2/η")
    return [save(fig, out_dir / "sharpness_lambda_max.png", legend=ax)]
