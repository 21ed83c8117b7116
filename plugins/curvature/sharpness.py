"""`sharpness`: the largest Hessian eigenvalue λ_max on a schedule, by warm-started Lanczos."""

from __future__ import annotations

from typing import Any

import numpy as np

from lscape import Option, Output, hookimpl
from lscape.curvature import lanczos
from lscape.curvature.tracking import Tracker
from lscape.plugins.curvature.base import (
    CURVATURE_OPTIONS,
    FD_OPTIONS,
    LANCZOS_OPTIONS,
    WHICH_OUTPUT,
    CurvatureProbe,
    WarmStart,
    lanczos_memory,
    memory_attrs,
)

__all__ = ["Sharpness", "plot_sharpness"]


class Sharpness(WarmStart, CurvatureProbe):
    """The extreme Hessian eigenvalue (λ_max by default) with its residual and cost.

    Lanczos with full reorthogonalisation on exact Hessian-vector products, stopped when
    ‖Hv − λv‖ ≤ ``tol``·|λ|, started from the previous measurement's eigenvector and next
    Ritz vectors plus one fresh random direction (verified, so a near-tie that swapped is
    not hidden), so that a slowly changing λ costs a few products per measurement.
    ``which`` LA stores ``lambda_max``, SA ``lambda_min``, LM ``lambda_abs_max`` (= ‖H‖, the
    largest |λ|); ``eigenvalue`` is the selected one, signed, in every case. With
    ``groups`` the same is measured per parameter group (subgroup ``sharpness/groups``,
    arrays with a ``group`` dimension, group names in the attrs). Measured by default on
    a fixed subset of training batches (``data=subset``), so successive values differ only
    because θ moved.

    ``track=true`` measures the whole-model eigenvalue by warm-started tracking
    (:mod:`lscape.curvature.tracking`): a few Lanczos steps from the previous eigenvector,
    accepted on a residual bound, with a cold verified solve every ``verify_every``-th
    measurement; arrays ``tracked``, ``track_products``, ``track_gap``, ``track_disagree``.
    """

    name = "sharpness"
    help = "λ_max (or λ_min, ‖H‖) of the Hessian by warm-started Lanczos, with residual ‖Hv−λv‖ and HVP count"
    schedule = "every:10"
    #: runs under --strategy fsdp: finite differences of the model's gradients on sharded
    #: vectors (lscape.curvature.sharded), chosen automatically and recorded in hvp_method
    sharded = True
    cost_model = ("at most max_iter + 1 products per measurement (default 101: the Lanczos search and one final "
                  "residual product), as many again per parameter group (groups=); a warm-started measurement of a "
                  "slowly moving λ usually stops after a few; with track=true a few (the warm search, at most "
                  "track_max_iter, then max_iter + 1 if it falls back) plus, every verify_every-th measurement, a cold "
                  "verified solve of the top two (at most max_iter + 2)")
    options = CURVATURE_OPTIONS + LANCZOS_OPTIONS + FD_OPTIONS + (
        Option("which", str, "LA", "LA largest (λ_max), SA smallest (λ_min), LM largest magnitude (‖H‖)",
               choices=("LA", "SA", "LM")),
        Option("tol", float, 1e-3, "stop when the residual ‖Hv − λv‖ ≤ tol·|λ|", minimum=0.0),
        Option("max_iter", int, 100, "Hessian-vector products at most per measurement", minimum=1),
        Option("warm_start", bool, True, "start from the previous measurement's eigenvector (plus a fresh direction)"),
        Option("track", bool, False, "track λ by a few warm Lanczos steps from the previous eigenvector, accepted on "
               "a residual bound (a full solve when not), with a cold verified solve every verify_every-th measurement"),
        Option("verify_every", int, 10, "with track: every N-th measurement (the first included) is also a cold, "
               "verified solve; a tracked value that disagrees with it is recorded (track_disagree)", minimum=1),
        Option("track_max_iter", int, 12, "with track: products of the warm search before it falls back to a "
               "full solve", minimum=1),
    )
    outputs = (
        Output("lambda_max", long_name="largest Hessian eigenvalue λ_max (which=LA)"),
        Output("lambda_min", long_name="smallest Hessian eigenvalue λ_min (which=SA)"),
        Output("lambda_abs_max", long_name="largest |λ| = ‖H‖ (which=LM)"),
        Output("eigenvalue", long_name="the selected extreme eigenvalue, signed"),
        Output("residual", long_name="Lanczos residual ‖Hv − λv‖ of the returned pair"),
        Output("converged", dtype="bool", long_name="residual within tol·|λ| and verified"),
        Output("iterations", dtype="int64", long_name="Lanczos basis vectors"),
        Output("hvp_products", dtype="int64", long_name="Hessian-vector products spent"),
        Output("loss", long_name="loss on the measured batches"),
        Output("group_eigenvalue", dims=("group",), long_name="the selected eigenvalue per parameter group"),
        Output("group_residual", dims=("group",), long_name="residual per parameter group"),
        Output("group_converged", dims=("group",), dtype="bool", long_name="converged per parameter group"),
        Output("group_hvp_products", dims=("group",), dtype="int64", long_name="products per parameter group"),
        Output("tracked", dtype="bool", long_name="track: the value is the accepted warm-started search's"),
        Output("track_products", dtype="int64", long_name="track: products of the warm search (and its fallback)"),
        Output("track_gap", long_name="track: |tracked − cold| / |cold| at a cold verified solve (NaN elsewhere)"),
        Output("track_disagree", dtype="bool", long_name="track: tracked and cold values differ by more than 2·tol"),
    )

    _tracker: Tracker | None = None

    def tracker(self) -> Tracker:
        """The tracking state (option ``track``), made at first use."""
        if self._tracker is None:
            self._tracker = Tracker(verify_every=self.opts.verify_every, max_iter=self.opts.track_max_iter)
        return self._tracker

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.opts.track:
            state["track"] = self.tracker().state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.opts.track:
            self.tracker().load_state_dict(state.get("track"))

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["groups"] = self.group_names()
        attrs["stored_as"] = WHICH_OUTPUT[self.opts.which]
        return attrs

    def planned_products(self, ctx) -> dict[str, int]:
        """Products per measurement at most: the Lanczos search and its final product, per group again."""
        per = {"lambda": self.opts.max_iter + 1}
        if self.opts.track:  # the warm search, its fallback, and the cold solve (k = 2) when due
            per = {"track": self.opts.track_max_iter, "lambda": self.opts.max_iter + 1, "verify": self.opts.max_iter + 2}
        groups = len(self.groups(ctx))
        if groups:
            per["groups"] = groups * per["lambda"]
        return per

    def _solve(self, op, state, key=None):
        result = lanczos(op, k=1, which=self.opts.which, tol=self.opts.tol, max_iter=self.opts.max_iter,
                         v0=self.warm_vectors(op, key), seed=int(state.step), **lanczos_memory(self))
        self.keep_vectors(result, key)
        return result

    def measure(self, ctx, state) -> dict[str, Any]:
        batches = self.batches(ctx, state)
        op = self.operator(ctx, batches)
        track = None
        if self.opts.track:
            result, track = self.tracker().measure(op, which=self.opts.which, tol=self.opts.tol,
                                                   fallback_iter=self.opts.max_iter, seed=int(state.step),
                                                   **lanczos_memory(self))
        else:
            result = self._solve(op, state)
        op.release()
        if self.measure_attrs is not None and result.memory is not None:  # a tracked pair holds no basis
            self.measure_attrs["lanczos_memory"] = memory_attrs(result, op)
        value = float(result.eigenvalues[0])
        values = {
            WHICH_OUTPUT[self.opts.which]: abs(value) if self.opts.which == "LM" else value,
            "eigenvalue": value,
            "residual": float(result.residuals[0]),
            "converged": bool(result.converged[0]),
            "iterations": int(result.iterations),
            "hvp_products": int(result.num_products),
            "loss": op.loss(),
        }
        if track is not None:
            values.update(hvp_products=track["track_products"] + track["cold_products"], tracked=track["tracked"],
                          track_products=track["track_products"], track_gap=track["track_gap"],
                          track_disagree=track["track_disagree"])
            if self.measure_attrs is not None:
                self.measure_attrs["track_disagreements"] = self.tracker().disagreements
        groups = self.groups(ctx)
        if groups:
            per = []
            for name, names in groups:
                gop = self.operator(ctx, batches, params=names)
                per.append(self._solve(gop, state, key=name))
                gop.release()
            values.update(
                group_eigenvalue=np.array([float(r.eigenvalues[0]) for r in per]),
                group_residual=np.array([float(r.residuals[0]) for r in per]),
                group_converged=np.array([bool(r.converged[0]) for r in per]),
                group_hvp_products=np.array([int(r.num_products) for r in per], dtype=np.int64),
            )
        return values


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
        stored = run.group_attrs("sharpness").get("stored_as", "lambda_max")
        if stored != "lambda_max":  # which=SA or LM: the selected eigenvalue, no 2/η line
            line(ax, d["step"], d[stored], label=f"{name} {stored}", color=colour)
            continue
        matrix = run.group_attrs("sharpness").get("matrix")  # a derived kind (preconditioned): 2/η is not its edge
        line(ax, d["step"], d["lambda_max"], label=f"{name} λ_max" + (f" of {matrix}" if matrix else ""), color=colour)
        if "track_disagree" in d and np.asarray(d["track_disagree"]).any():  # track=true: where a cold verify disagreed
            bad = np.asarray(d["track_disagree"], dtype=bool)
            ax.plot(np.asarray(d["step"])[bad], np.asarray(d["lambda_max"])[bad], "x", color="red", ms=7,
                    label=f"{name} tracked ≠ cold verify")
        if run.has("train") and not matrix:
            train = run.read("train")
            if "lr" in train and len(train["lr"]) and len(d["lambda_max"]):
                lr = np.asarray(train["lr"], dtype=float)
                with np.errstate(divide="ignore"):
                    threshold = np.where(lr > 0, 2.0 / lr, np.nan)
                # 2/η far above λ_max would flatten the curve that matters; show it when near.
                if np.nanmin(threshold) < 5 * np.nanmax(d["lambda_max"]):
                    ax.plot(train["step"], threshold, ":", lw=1.0, color=colour, label=f"{name} 2/η")
    paths = [save(fig, out_dir / "sharpness_lambda_max.png", legend=ax)]
    grouped = []
    for run in runs:
        d = run.read("sharpness")
        names = run.group_attrs("sharpness").get("groups") or []
        if names and "group_eigenvalue" in d and len(d["step"]):
            grouped.append((run, d, names))
    if grouped:
        fig, ax = figure("per-group extreme eigenvalue (side by side)", "step", "eigenvalue")
        for run, d, names in grouped:
            eig = np.asarray(d["group_eigenvalue"], dtype=float).reshape(len(d["step"]), -1)
            for j, name in enumerate(names[: eig.shape[1]]):
                ax.plot(d["step"], eig[:, j], lw=0.9, marker="." if len(d["step"]) < 3 else None,
                        label=f"{run.name} {name}" if len(grouped) > 1 else str(name))
        paths.append(save(fig, out_dir / "sharpness_groups.png", legend=ax))
    return paths
