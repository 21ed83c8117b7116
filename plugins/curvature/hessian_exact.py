"""`hessian-exact`: every eigenvalue of the dense Hessian of a small model, per measurement."""

from __future__ import annotations

from typing import Any

import numpy as np

from lscape import Option, Output, hookimpl
from lscape.curvature import DEFAULT_MAX_PARAMS, dense_matrix, dense_spectrum
from lscape.errors import UsageError
from lscape.limits import require_memory
from lscape.plugins.curvature.base import CURVATURE_OPTIONS, CurvatureProbe, selected_dim

__all__ = ["HessianExact", "plot_hessian_exact"]


class HessianExact(CurvatureProbe):
    """The exact dense Hessian (``dim`` products, built in blocks) and its full spectrum.

    What the entropy-sgd seed computed for its LeNet: all eigenvalues of H averaged over a
    few thousand samples, a bulk near zero, a few positive outliers and small negative ones.
    Refused above ``max_params`` parameters (use ``hessian`` with SLQ there).
    """

    name = "hessian-exact"
    help = "all eigenvalues of the dense Hessian (small models, up to max_params parameters)"
    schedule = "every:1000"
    cost_model = "dim products per measurement (one per selected parameter, applied in blocks), dim ≤ max_params"
    options = CURVATURE_OPTIONS + (
        Option("max_params", int, DEFAULT_MAX_PARAMS, "refuse models with more selected parameters", minimum=1),
    )
    outputs = (
        Output("eigenvalues", dims=("index",), long_name="all Hessian eigenvalues, ascending"),
        Output("trace", long_name="exact trace of the Hessian"),
        Output("lambda_max", long_name="largest eigenvalue"),
        Output("lambda_min", long_name="smallest eigenvalue"),
        Output("negative_fraction", long_name="fraction of eigenvalues below −1e-6·max|λ|"),
        Output("hvp_products", dtype="int64", long_name="Hessian-vector products spent"),
    )

    def planned_products(self, ctx) -> dict[str, int]:
        """One product per selected parameter."""
        return {"dense": selected_dim(self, ctx)}

    def check(self, ctx):
        super().check(ctx)
        self._check_size(ctx)

    def measure(self, ctx, state) -> dict[str, Any]:
        self._check_size(ctx)
        op = self.operator(ctx, self.batches(ctx, state))
        matrix = dense_matrix(op, max_params=self.opts.max_params)
        op.release()
        values = dense_spectrum(matrix=matrix).eigenvalues
        scale = float(values.abs().max()) or 1.0
        return {
            "eigenvalues": values.numpy(),
            "trace": float(values.sum()),
            "lambda_max": float(values[-1]),
            "lambda_min": float(values[0]),
            "negative_fraction": float((values < -1e-6 * scale).double().mean()),
            "hvp_products": int(op.num_products),
        }

    def _check_size(self, ctx) -> None:
        dim = selected_dim(self, ctx)
        if dim > self.opts.max_params:
            raise UsageError(
                f"hessian-exact: the model has {dim} selected parameters, above max_params={self.opts.max_params}; "
                f"select a subset with -o hessian-exact.params=PATTERN, raise max_params, or use the hessian probe"
            )
        # the dense matrix, its float64 copy for the eigensolver and the eigenvectors, whatever max_params says
        require_memory(3 * dim * dim * 8, f"hessian-exact: the dense Hessian of {dim} parameters",
                       "hessian-exact.params (or use the hessian probe)", ctx.device)


@hookimpl
def register_probes(register):
    register(HessianExact)


@hookimpl
def register_plots(register):
    register("hessian-exact", plot_hessian_exact)


def plot_hessian_exact(runs, out_dir):
    """The eigenvalue histogram of the last measurement, and the extreme eigenvalues over steps."""
    from lscape.plotting import figure, line, run_colours, run_labels, save

    names = dict(zip(map(id, runs), run_labels(runs)))
    colours = dict(zip(map(id, runs), run_colours(len(runs))))
    data = [(run, run.read("hessian-exact")) for run in runs]
    data = [(run, d) for run, d in data if len(d.get("step", []))]
    if not data:
        return []
    fig, ax = figure("exact Hessian spectrum (last measurement)", "eigenvalue", "count")
    for run, d in data:
        values = np.asarray(d["eigenvalues"][-1], dtype=float)
        values = values[np.isfinite(values)]
        step = int(d["step"][-1])
        counts, edges, _ = ax.hist(values, bins=100, histtype="step", color=colours[id(run)],
                                   label=f"{names[id(run)]} exact, step {step}")
        _overlay_slq(ax, run, step, values.size, edges[1] - edges[0], colours[id(run)], names[id(run)])
    ax.set_yscale("log")
    paths = [save(fig, out_dir / "hessian_exact_histogram.png", legend=ax)]
    fig, ax = figure("extreme Hessian eigenvalues", "step", "eigenvalue")
    for run, d in data:
        line(ax, d["step"], d["lambda_max"], label=f"{names[id(run)]} λ_max", color=colours[id(run)])
        line(ax, d["step"], d["lambda_min"], label=f"{names[id(run)]} λ_min", color=colours[id(run)], ls="--")
    paths.append(save(fig, out_dir / "hessian_exact_extremes.png", legend=ax))
    return paths


def _overlay_slq(ax, run, step, n, bin_width, colour, name):
    """The `hessian` probe's SLQ density at the same step, scaled to counts per bin (n·p·Δ),
    over the exact histogram: the check that the stochastic estimate sees the spectrum."""
    if not run.has("hessian/density"):
        return
    d = run.read("hessian/density")
    rows = np.flatnonzero(d["step"] == step)
    if not rows.size:
        return
    i = int(rows[-1])
    counts = np.asarray(d["density"][i], dtype=float) * n * bin_width
    ax.plot(d["grid"][i], np.maximum(counts, 1e-3), lw=1.0, ls="--", color=colour, alpha=0.8,
            label=f"{name} SLQ density × n·Δ")
