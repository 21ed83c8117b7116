"""The `grad-stats` probe: per-sample gradient statistics (variance, noise scale, GSNR, norm and
inner-product tests, stability margins)."""

from __future__ import annotations

from typing import Any

import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.curvature import HessianOperator, lanczos
from lscape.params import select_parameters

from ._nonuniformity import nonuniformity, stability_margins
from ._per_sample import per_sample_statistics

from ._common import PARAMS, SMOOTH, panels

__all__ = ["GradStats", "plot_grad_stats"]


class GradStats(Probe):
    """Per-sample gradient statistics: tr Σ, GSNR, B_simple, NormTest, InnerTest, non-uniformity."""

    name = "grad-stats"
    help = "per-sample gradient variance, GSNR, noise scale B_simple, norm/inner tests, optional non-uniformity"
    schedule = "every:10"
    data = "minibatch"
    at = "after_backward"
    options = (
        Option("chunk_size", int, 32, "per-sample gradients held at once (bounds memory)", minimum=1),
        Option("mode", str, "eval", "module mode: eval (BatchNorm needs it) or train", choices=("eval", "train")),
        Option("method", str, "auto", "per-sample gradients by torch.func vmap, a loop of backward passes, or "
               "auto (vmap, the loop where the model cannot be vmapped)", choices=("auto", "vmap", "loop")),
        Option("eps", float, 0.0, "added to each variance in GSNR", minimum=0),
        Option("nonuniformity", bool, False, "also non-uniformity, λ_max and the stability margins (costly)"),
        Option("nu_iters", int, 20, "Lanczos products at most for non-uniformity and λ_max", minimum=1),
        Option("nu_tol", float, 1e-3, "Lanczos residual tolerance (relative)", minimum=0),
        PARAMS,
        SMOOTH,
    )
    outputs = (
        Output("num_samples", dtype="int64", long_name="samples n"),
        Output("trace_cov", long_name="per-sample gradient variance tr Σ"),
        Output("grad_sq", long_name="‖g‖² of the mean gradient"),
        Output("grad_sq_unbiased", long_name="‖g‖² − tr Σ/n"),
        Output("b_simple", long_name="gradient noise scale B_simple = tr Σ/‖g‖²"),
        Output("gsnr", long_name="mean gradient signal-to-noise ratio"),
        Output("norm_test", long_name="NormTest θ"),
        Output("inner_test", long_name="InnerTest θ"),
        Output("gsnr_param", dims=("param",), long_name="mean GSNR per parameter tensor"),
        Output("trace_cov_param", dims=("param",), long_name="tr Σ per parameter tensor"),
        Output("nonuniformity", long_name="sqrt λ_max((1/n)Σ H_i² − H²)"),
        Output("sharpness", long_name="λ_max(H) by Lanczos"),
        Output("sharpness_margin", long_name="λ_max·η/2 (stable ≤ 1)"),
        Output("nonuniformity_margin", long_name="non-uniformity·η/√B (stable ≤ 1)"),
    )

    def measure(self, ctx, state):
        o = self.opts
        named = select_parameters(ctx.model, o.params)
        batches = self.batches(ctx, state)
        fallback: list[str] = []  # why method=auto used the loop, if it did
        st = per_sample_statistics(ctx.model, ctx.adapter, batches, params=named, chunk_size=o.chunk_size,
                                   mode=o.mode, eps=o.eps, method=o.method, fallback=fallback)
        writer = self.group(ctx)
        if writer is not None and "param_names" not in writer.group.attrs:
            writer.group.attrs["param_names"] = list(st.gsnr_groups)
        if writer is not None and o.method == "auto" and "method_used" not in writer.group.attrs:
            writer.group.attrs["method_used"] = "loop" if fallback else "vmap"
            if fallback:
                writer.group.attrs["method_fallback_reason"] = fallback[-1]
        values: dict[str, Any] = {
            "num_samples": st.n, "trace_cov": st.trace_cov, "grad_sq": st.grad_sq,
            "grad_sq_unbiased": st.grad_sq_unbiased, "b_simple": st.b_simple, "gsnr": st.gsnr,
            "norm_test": st.norm_test, "inner_test": st.inner_test,
            "gsnr_param": torch.tensor(list(st.gsnr_groups.values()), dtype=torch.float64),
            "trace_cov_param": torch.tensor(list(st.trace_cov_groups.values()), dtype=torch.float64),
        }
        if o.nonuniformity:
            nu = nonuniformity(ctx.model, ctx.adapter, batches, params=named, chunk_size=o.chunk_size, mode=o.mode,
                               iters=o.nu_iters, tol=o.nu_tol)
            op = HessianOperator(ctx.model, ctx.adapter, batches, params=named, mode=o.mode)
            lam = float(lanczos(op, k=1, which="LA", tol=o.nu_tol, max_iter=o.nu_iters).eigenvalues[0])
            lr = state.lr if state.lr is not None else ctx.lr
            values.update(nonuniformity=nu.value, sharpness=lam,
                          **stability_margins(lam, nu.value, lr, ctx.batch_size))
        return values



#: (title, arrays, y label); a group "train:loss" reads the training group instead
GRAD_STATS_PANELS = (
    ("variance and mean gradient", ("trace_cov", "grad_sq"), "squared norm"),
    ("gradient noise scale B_simple", ("b_simple",), "samples"),
    ("GSNR", ("gsnr",), "GSNR"),
    ("norm and inner-product tests", ("norm_test", "inner_test"), "test statistic"),
    ("stability margins (≤ 1 stable)", ("sharpness_margin", "nonuniformity_margin"), "margin"),
    ("training loss", ("train:loss",), "minibatch loss"),
)



def plot_grad_stats(runs, out_dir):
    """The grad-stats statistics against step, one panel per family (and the training loss),
    optionally smoothed."""
    return [panels(runs, out_dir, "grad-stats", GRAD_STATS_PANELS, "grad_stats.png")]


@hookimpl
def register_probes(register):
    register(GradStats)


@hookimpl
def register_plots(register):
    register("grad-stats", plot_grad_stats)
