"""`hessian`: top-k Hessian eigenpairs, the trace with its standard error and the spectral density, each on its own schedule."""

from __future__ import annotations

from typing import Any

import numpy as np

from lscape import Option, Output, hookimpl
from lscape.curvature import hutchinson, hutchpp, lanczos, slq_density
from lscape.errors import UsageError
from lscape.plugins.curvature.base import (
    CURVATURE_OPTIONS,
    FD_OPTIONS,
    LANCZOS_OPTIONS,
    CurvatureProbe,
    WarmStart,
    lanczos_memory,
    memory_attrs,
    selected_dim,
)
from lscape.schedule import Schedule

__all__ = ["Hessian", "plot_hessian", "plan_products", "DEFAULT_BUDGET"]

#: products per measurement (and per parameter group) when ``budget`` is not given
DEFAULT_BUDGET = 150
#: how the budget left after explicit sizes is shared among the parts switched on
SHARES = {"top": 2, "trace": 1, "density": 1}

COST_MODEL = (
    "at most budget products per measurement (default 150), and as many again per parameter group "
    "(groups=): top-k ≤ min(max_iter + k, its share) (Lanczos search + k final residual products); "
    "trace = trace_samples (default: its share); density = density_runs × density_steps (off unless "
    "density_schedule is given; default sizes: its share, runs = share/40 within 1..8, steps = share/runs "
    "within 2..80). The budget left after explicit sizes is shared top-k 2 : trace 1 : density 1 among the "
    "parts switched on, top-k first, what it cannot use going to the others; defaults: top-k ≤100, "
    "trace 50, density off. Sizes that do not fit the budget are refused before the run."
)


def plan_products(opts: Any, on: dict[str, bool]) -> dict[str, int]:
    """How a ``hessian`` measurement spends its ``budget`` (see :data:`COST_MODEL`): products
    at most for each part switched on in ``on`` (``top``, ``trace``, ``density``) and the
    sizes that give them (``max_iter``, ``trace_samples``, ``density_runs``,
    ``density_steps``). Sizes that do not fit are :class:`UsageError`, naming the options."""
    budget, k = int(opts.budget), int(opts.k)
    idle = {"trace": ("trace_samples", "trace_schedule=every:N (or leave it at the main schedule)"),
            "density": ("density_runs", "density_steps", "density_schedule=every:N")}
    for part, names in idle.items():
        given = [f"hessian.{p}={getattr(opts, p)}" for p in names[:-1] if getattr(opts, p) is not None]
        if given and not on[part]:
            raise UsageError(f"hessian: {', '.join(given)} sizes the {part}, which is off; switch it on with "
                             f"-o hessian.{names[-1]}, or drop the size")
    minimum = {"top": 2 * k, "trace": 6 if opts.trace_method == "hutchpp" else 2,
               "density": (opts.density_runs or 1) * max(opts.density_steps or 2, 2)}
    if opts.trace_samples is not None and opts.trace_samples < minimum["trace"]:
        raise UsageError(f"bad value for hessian.trace_samples: trace_method={opts.trace_method} needs at least "
                         f"{minimum['trace']} products, not {opts.trace_samples}")
    fixed: dict[str, int] = {}
    if on["trace"] and opts.trace_samples is not None:
        fixed["trace"] = int(opts.trace_samples)
    if on["density"] and opts.density_runs is not None and opts.density_steps is not None:
        fixed["density"] = int(opts.density_runs) * int(opts.density_steps)
    sized = [part for part in ("top", "trace", "density") if on[part] and part not in fixed]
    need = sum(fixed.values()) + sum(minimum[part] for part in sized)
    if need > budget:
        asked = [f"hessian.{p}={getattr(opts, p)}" for p in ("k", "trace_samples", "density_runs", "density_steps")
                 if getattr(opts, p) is not None and (p == "k" and on["top"] or p.startswith("trace") and on["trace"]
                                                       or p.startswith("density") and on["density"])]
        raise UsageError(f"hessian: the parts switched on need at least {need} products per measurement "
                         f"({', '.join(asked) or 'their minimum sizes'}), more than budget={budget}; raise "
                         f"-o hessian.budget={need} or more, or lower them")
    left = budget - sum(fixed.values())
    plan = {part: 0 for part in ("top", "trace", "density")}
    plan.update(fixed)
    if "top" in sized:
        share = left * SHARES["top"] // sum(SHARES[p] for p in sized)
        share = max(share, minimum["top"]) if len(sized) == 1 else share
        plan["top"] = max(min(int(opts.max_iter) + k, share, left - sum(minimum[p] for p in sized if p != "top")),
                          minimum["top"])
        left -= plan["top"]
    rest = [part for part in sized if part != "top"]
    for i, part in enumerate(rest):
        plan[part] = left // (len(rest) - i)
        left -= plan[part]
    runs = steps = 0
    if on["density"]:
        runs = int(opts.density_runs or min(max(plan["density"] // 40, 1), 8))
        steps = int(opts.density_steps or min(max(plan["density"] // runs, 2), 80))
        plan["density"] = runs * steps
    plan.update(max_iter=max(plan["top"] - k, k) if on["top"] else 0, trace_samples=plan["trace"],
                density_runs=runs, density_steps=steps)
    return plan


class Hessian(WarmStart, CurvatureProbe):
    """The Hessian spectrum of the training loss with exact Hessian-vector products.

    - top-k (on ``schedule``): Lanczos with full reorthogonalisation, warm-started,
      ``top_eigenvalues``, ``residuals`` ‖Hv − λv‖, ``converged``, optional ``eigenvectors``;
    - trace (on ``trace_schedule``, subgroup ``hessian/trace``): Hutch++ or Hutchinson with
      Rademacher probes, ``trace`` and ``trace_stderr``;
    - density (on ``density_schedule``, subgroup ``hessian/density``): stochastic Lanczos
      quadrature smoothed by a Gaussian, ``density`` on ``grid`` (integrates to 1), and the
      quadrature ``nodes``/``weights`` for re-smoothing later.

    Every measurement spends at most ``budget`` products (default 150; again per parameter
    group): the trace samples and the density's runs and steps are sized to it unless given,
    and the density is off unless ``density_schedule`` is given (see ``cost_model``).
    The trace sub-schedule left empty follows ``schedule``; ``never`` switches a part off.
    ``which`` selects the end of the spectrum (LA top, SA bottom, LM largest magnitude);
    ``kind`` the matrix (Hessian, GGN, Monte-Carlo or empirical Fisher). With ``groups``
    (e.g. ``groups=blocks=layer*``) every due part is also measured per parameter group in
    the subgroup ``hessian/groups``: ``group_top_eigenvalues`` (step, group, k),
    ``group_trace``/``group_trace_stderr`` (step, group), ``group_grid``/``group_density``
    (step, group, point); the group names are the attribute ``groups``.
    ``lscape measure`` computes every part that is switched on.
    """

    name = "hessian"
    help = "top-k Hessian eigenvalues (Lanczos), trace (Hutch++) and spectral density (SLQ), within a product budget"
    schedule = "every:100"
    #: runs under --strategy fsdp: finite differences of the model's gradients on sharded
    #: vectors (lscape.curvature.sharded), chosen automatically and recorded in hvp_method
    sharded = True
    cost_model = COST_MODEL
    options = CURVATURE_OPTIONS + LANCZOS_OPTIONS + FD_OPTIONS + (
        Option("budget", int, DEFAULT_BUDGET, "Hessian-vector products at most per measurement (and per group); "
               "sizes the trace and density unless given", minimum=1),
        Option("k", int, 5, "number of top eigenvalues", minimum=1),
        Option("which", str, "LA", "LA largest, LM largest magnitude, SA smallest", choices=("LA", "LM", "SA")),
        Option("tol", float, 1e-4, "Lanczos: stop when every residual ‖Hv − λv‖ ≤ tol·|λ|", minimum=0.0),
        Option("max_iter", int, 300, "Lanczos products at most per measurement (also capped by budget)", minimum=1),
        Option("warm_start", bool, True, "start Lanczos from the previous eigenvectors"),
        Option("eigenvectors", bool, False, "also store the k eigenvectors (step, k, param), chunked"),
        Option("trace_schedule", str, None, "when to estimate the trace (default: schedule; never: off)"),
        Option("trace_method", str, "hutchpp", "trace estimator", choices=("hutchpp", "hutchinson")),
        Option("trace_samples", int, None, "products per trace estimate (default: its share of budget)", minimum=2),
        Option("density_schedule", str, None, "when to estimate the spectral density (default: never; e.g. every:100)"),
        Option("density_runs", int, None, "SLQ runs (random start vectors; default: sized to budget)", minimum=1),
        Option("density_steps", int, None, "Lanczos steps per SLQ run (default: sized to budget)", minimum=2),
        Option("density_points", int, 512, "grid points of the stored density", minimum=8),
        Option("density_sigma", float, 0.01, "Gaussian width relative to the spectral range", minimum=0.0),
        Option("seed", int, 0, "seed of the random probe vectors"),
    )
    outputs = (
        Output("top_eigenvalues", dims=("k",), long_name="top-k Hessian eigenvalues"),
        Output("residuals", dims=("k",), long_name="Lanczos residuals ‖Hv − λv‖"),
        Output("converged", dims=("k",), dtype="bool", long_name="residual within tolerance"),
        Output("hvp_products", dtype="int64", long_name="Hessian-vector products for the eigenpairs"),
        Output("eigenvectors", dims=("k", "param"), dtype="float32", long_name="top-k unit eigenvectors"),
        Output("trace", long_name="Hessian trace estimate"),
        Output("trace_stderr", long_name="standard error of the trace estimate"),
        Output("trace_products", dtype="int64", long_name="Hessian-vector products for the trace"),
        Output("grid", dims=("point",), long_name="eigenvalue grid of the density"),
        Output("density", dims=("point",), long_name="smoothed eigenvalue density (integrates to 1)"),
        Output("nodes", dims=("run", "node"), long_name="SLQ quadrature nodes (Ritz values)"),
        Output("weights", dims=("run", "node"), long_name="SLQ quadrature weights"),
        Output("sigma", long_name="Gaussian smoothing width"),
        Output("density_products", dtype="int64", long_name="Hessian-vector products for the density"),
        Output("group_top_eigenvalues", dims=("group", "k"), long_name="top-k eigenvalues per parameter group"),
        Output("group_converged", dims=("group", "k"), dtype="bool", long_name="converged per parameter group"),
        Output("group_trace", dims=("group",), long_name="trace per parameter group"),
        Output("group_trace_stderr", dims=("group",), long_name="trace standard error per parameter group"),
        Output("group_grid", dims=("group", "point"), long_name="density grid per parameter group"),
        Output("group_density", dims=("group", "point"), long_name="spectral density per parameter group"),
        Output("group_products", dims=("group",), dtype="int64", long_name="products per parameter group"),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        main = str(self.schedule)
        self.trace_schedule = Schedule.parse(self.opts.trace_schedule or main)
        self.density_schedule = Schedule.parse(self.opts.density_schedule or "never")
        self._due: tuple[int, dict[str, bool]] | None = None
        self.plan = plan_products(self.opts, self.switched_on())

    def check(self, ctx) -> None:
        """Besides every curvature probe's checks: the vectors the trace and density hold at once,
        and the density's grid, fit in memory (refused before the store exists)."""
        super().check(ctx)
        from lscape.limits import require_memory

        dim, size = selected_dim(self, ctx), 4
        if self.plan["trace"]:
            n = self.plan["trace"]  # Hutch++: S, HS, Q (float64 QR), HQ, G, HG; Hutchinson: a block
            need = (2 * n * size + n // 3 * 8) * dim if self.opts.trace_method == "hutchpp" else 32 * size * dim
            require_memory(need, f"hessian: the trace's {n} probe vectors of {dim} parameters",
                           "hessian.trace_samples (or hessian.budget)", ctx.device)
        if self.plan["density"]:
            points = int(self.opts.density_points)
            # a run's Lanczos basis, and the Gaussian kernel evaluated on the grid 2048 nodes at a time
            need = self.plan["density_steps"] * dim * size + 3 * 8 * points * min(2048, self.plan["density"])
            require_memory(need, f"hessian: the density ({self.plan['density_steps']} Lanczos vectors of {dim} "
                           f"parameters, {points} grid points)", "hessian.density_points (or density_steps, "
                           "hessian.budget)", ctx.device)

    def sharded_refusal(self) -> str | None:
        """Besides every curvature probe's refusals: stored eigenvectors would be full vectors."""
        if self.opts.eigenvectors:
            return "hessian.eigenvectors=true (every eigenvector would be gathered whole on rank 0)"
        return super().sharded_refusal()

    def switched_on(self) -> dict[str, bool]:
        """The parts whose schedule is not ``never``."""
        return {"top": self.schedule.kind != "never", "trace": self.trace_schedule.kind != "never",
                "density": self.density_schedule.kind != "never"}

    def planned_products(self, ctx) -> dict[str, int]:
        """Products per measurement at most, by part (``top-k``, ``trace``, ``density``; per group again)."""
        per = {"top-k": self.plan["top"], "trace": self.plan["trace"], "density": self.plan["density"]}
        groups = len(self.groups(ctx))
        if groups:
            per["groups"] = groups * sum(per.values())
        return {name: n for name, n in per.items() if n}

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["groups"] = self.group_names()
        attrs["trace_schedule"] = str(self.trace_schedule)
        attrs["density_schedule"] = str(self.density_schedule)
        attrs["budget"] = int(self.opts.budget)
        attrs["budget_plan"] = dict(self.plan)
        return attrs

    def due(self, state) -> bool:
        """Due when any part is; which parts are due is kept for ``measure`` (time schedules tick once)."""
        when = dict(epoch_end=state.epoch_end, now=state.time)
        parts = {
            "top": self.schedule.due(state.step, **when),
            "trace": self.trace_schedule.due(state.step, **when),
            "density": self.density_schedule.due(state.step, **when),
        }
        self._due = (state.step, parts)
        return any(parts.values())

    def measure(self, ctx, state) -> dict[str, Any]:
        if self._due is not None and self._due[0] == state.step:
            parts = self._due[1]
        else:  # lscape measure: every part that is not switched off
            parts = self.switched_on()
        self._due = None
        batches = self.batches(ctx, state)
        op = self.operator(ctx, batches)
        seed = self.opts.seed + int(state.step)
        values: dict[str, Any] = {}
        spent = {"top": 0, "trace": 0, "density": 0}
        if parts["top"]:
            values = self._top(op, seed)
            spent["top"] = op.num_products
        if parts["trace"]:
            before = op.num_products
            estimate, stderr = self._trace(op, seed)
            spent["trace"] = op.num_products - before
            self.record(ctx, state.step, group="trace", trace=estimate, trace_stderr=stderr,
                        trace_products=spent["trace"])
        if parts["density"]:
            density = self._density(op, seed)
            spent["density"] = density.num_products
            self.record(ctx, state.step, group="density", grid=density.grid, density=density.density,
                        nodes=density.nodes, weights=density.weights, sigma=density.sigma,
                        density_products=density.num_products)
        op.release()
        groups = self.groups(ctx)
        if groups:
            per_group = self._per_group(ctx, batches, groups, parts, seed)
            spent["groups"] = int(per_group["group_products"].sum())
            self.record(ctx, state.step, group="groups", **per_group)
        if self.measure_attrs is not None:
            self.measure_attrs["products_spent"] = spent  # the last measurement's, by part
        return values

    def _trace(self, op, seed: int):
        estimator = hutchpp if self.opts.trace_method == "hutchpp" else hutchinson
        return estimator(op, self.plan["trace_samples"], seed=seed)

    def _density(self, op, seed: int):
        return slq_density(op, num_runs=self.plan["density_runs"], num_steps=self.plan["density_steps"],
                           num_points=self.opts.density_points, relative_sigma=self.opts.density_sigma, seed=seed)

    def _per_group(self, ctx, batches, groups, parts, seed: int) -> dict[str, Any]:
        """Every due part on each parameter group's own (diagonal-block) operator."""
        k = self.opts.k
        n = len(groups)
        out: dict[str, Any] = {"group_products": np.zeros(n, dtype=np.int64)}
        if parts["top"]:
            out["group_top_eigenvalues"] = np.full((n, k), np.nan)
            out["group_converged"] = np.zeros((n, k), dtype=bool)
        if parts["trace"]:
            out["group_trace"], out["group_trace_stderr"] = np.full(n, np.nan), np.full(n, np.nan)
        if parts["density"]:
            out["group_grid"] = np.full((n, self.opts.density_points), np.nan)
            out["group_density"] = np.full((n, self.opts.density_points), np.nan)
        for g, (name, names) in enumerate(groups):
            op = self.operator(ctx, batches, params=names)
            if parts["top"]:
                kk = min(k, op.dim)
                result = lanczos(op, k=kk, which=self.opts.which, tol=self.opts.tol,
                                 max_iter=max(self.plan["max_iter"], kk), v0=self.warm_vectors(op, name), seed=seed,
                                 **lanczos_memory(self))
                self.keep_vectors(result, name)
                out["group_top_eigenvalues"][g, :kk] = result.eigenvalues.numpy()
                out["group_converged"][g, :kk] = result.converged.numpy()
            if parts["trace"]:
                if op.dim >= 6:
                    out["group_trace"][g], out["group_trace_stderr"][g] = self._trace(op, seed)
            if parts["density"]:
                density = self._density(op, seed)
                out["group_grid"][g] = density.grid.numpy()
                out["group_density"][g] = density.density.numpy()
            out["group_products"][g] = op.num_products
            op.release()
        return out

    def _top(self, op, seed: int) -> dict[str, Any]:
        k_asked = self.opts.k
        k = min(k_asked, int(getattr(op, "global_dim", op.dim)))  # sharded: op.dim is a slice
        result = lanczos(op, k=k, which=self.opts.which, tol=self.opts.tol,
                         max_iter=max(self.plan["max_iter"], k), v0=self.warm_vectors(op), seed=seed,
                         **lanczos_memory(self))
        self.keep_vectors(result)
        if self.measure_attrs is not None:
            self.measure_attrs["lanczos_memory"] = memory_attrs(result, op)
        values = {
            "top_eigenvalues": _pad(result.eigenvalues.numpy(), k_asked, np.nan),
            "residuals": _pad(result.residuals.numpy(), k_asked, np.nan),
            "converged": _pad(result.converged.numpy(), k_asked, False),
            "hvp_products": int(result.num_products),
        }
        if self.opts.eigenvectors:
            vectors = np.full((k_asked, op.dim), np.nan, dtype=np.float32)
            vectors[:k] = result.eigenvectors.detach().cpu().float().numpy()
            values["eigenvectors"] = vectors
        return values


def _pad(values: np.ndarray, size: int, fill: Any) -> np.ndarray:
    if len(values) >= size:
        return values[:size]
    out = np.full(size, fill, dtype=values.dtype if values.dtype != np.float32 else np.float64)
    out[: len(values)] = values
    return out


@hookimpl
def register_probes(register):
    register(Hessian)


@hookimpl
def register_plots(register):
    register("hessian", plot_hessian)


def plot_hessian(runs, out_dir):
    """Top-k eigenvalues over steps, the trace with ±2 standard errors, and the spectral density."""
    from lscape.plotting import eigenvalue_lines, figure, run_colours, run_labels, save

    names = dict(zip(map(id, runs), run_labels(runs)))
    colours = dict(zip(map(id, runs), run_colours(len(runs))))
    paths = []
    with_top = [(run, run.read("hessian")) for run in runs if run.has("hessian")]
    with_top = [(run, d) for run, d in with_top if "top_eigenvalues" in d and len(d["step"])]
    if with_top:
        fig, ax = figure("top Hessian eigenvalues", "step", "eigenvalue")
        for run, d in with_top:
            eigenvalue_lines(ax, d["step"], d["top_eigenvalues"], names[id(run)],
                             colours[id(run)] if len(with_top) > 1 else None)
        paths.append(save(fig, out_dir / "hessian_top_eigenvalues.png", legend=ax))
    traced = [(run, run.read("hessian/trace")) for run in runs if run.has("hessian/trace")]
    if traced:
        fig, ax = figure("Hessian trace (±2 standard errors)", "step", "tr H")
        for run, d in traced:
            ax.errorbar(d["step"], d["trace"], yerr=2 * d["trace_stderr"], lw=0.8, capsize=3, marker="o", ms=4,
                        color=colours[id(run)], label=names[id(run)])
        paths.append(save(fig, out_dir / "hessian_trace.png", legend=ax))
    densities = [(run, run.read("hessian/density")) for run in runs if run.has("hessian/density")]
    if densities:
        import matplotlib

        fig, ax = figure("Hessian spectral density (SLQ)", "eigenvalue", "density")
        for run, d in densities:
            steps = d["step"]
            # At most six measurements per run, coloured from early (light) to late (dark).
            chosen = np.unique(np.linspace(0, len(steps) - 1, min(6, len(steps))).astype(int))
            cmap = matplotlib.colormaps["viridis"]
            for n, i in enumerate(chosen):
                colour = cmap(0.15 + 0.7 * n / max(len(chosen) - 1, 1))
                ax.plot(d["grid"][i], np.maximum(d["density"][i], 1e-12), lw=0.9, color=colour,
                        label=f"{names[id(run)]} step {int(steps[i])}")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        paths.append(save(fig, out_dir / "hessian_density.png", legend=ax))
    grouped = [(run, run.read("hessian/groups"), run.group_attrs("hessian").get("groups") or [])
               for run in runs if run.has("hessian/groups")]
    grouped = [(run, d, names) for run, d, names in grouped if len(d.get("step", [])) and names]
    if grouped:
        fig, ax = figure("per-group λ_1 (side by side)", "step", "eigenvalue")
        for run, d, names in grouped:
            if "group_top_eigenvalues" not in d:
                continue
            top = np.asarray(d["group_top_eigenvalues"], dtype=float).reshape(len(d["step"]), len(names), -1)
            for j, name in enumerate(names):
                ax.plot(d["step"], top[:, j, 0], lw=0.9, marker="." if len(d["step"]) < 3 else None,
                        label=f"{run.name} {name}" if len(grouped) > 1 else str(name))
        paths.append(save(fig, out_dir / "hessian_groups_top.png", legend=ax))
        with_density = [(run, d, names) for run, d, names in grouped if "group_density" in d]
        if with_density:
            fig, ax = figure("per-group spectral density (last measurement)", "eigenvalue", "density")
            for run, d, names in with_density:
                dens = np.asarray(d["group_density"], dtype=float).reshape(len(d["step"]), len(names), -1)
                grid = np.asarray(d["group_grid"], dtype=float).reshape(len(d["step"]), len(names), -1)
                rows = [i for i in range(len(d["step"])) if np.isfinite(dens[i]).any()]
                if not rows:
                    continue
                i = rows[-1]
                for j, name in enumerate(names):
                    ax.plot(grid[i, j], np.maximum(dens[i, j], 1e-12), lw=0.9,
                            label=f"{run.name} {name}" if len(with_density) > 1 else str(name))
            ax.set_yscale("log")
            ax.set_ylim(bottom=1e-6)
            paths.append(save(fig, out_dir / "hessian_groups_density.png", legend=ax))
    return paths
