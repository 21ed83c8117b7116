"""`critical-sharpness`: the curvature along the optimizer's actual update from forward passes only (Kalra et al. 2026)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lscape import Option, Output, hookimpl
from lscape.curvature import critical_sharpness
from lscape.params import select_parameters
from lscape.plugins.curvature.base import CURVATURE_OPTIONS, CurvatureProbe

__all__ = ["CriticalSharpnessProbe", "plot_critical_sharpness"]

#: the shared curvature options that apply to a forward-only measurement
_SHARED = tuple(o for o in CURVATURE_OPTIONS if o.name in ("mode", "params", "chunk"))


class CriticalSharpnessProbe(CurvatureProbe):
    """Critical sharpness λ_c = 2/η_c along the step the optimizer actually took.

    With u = (θ_{t+1} − θ_t)/η the update per unit learning rate (any optimizer: −g for SGD,
    −P⁻¹m for Adam, the SAM step under ``sam``; weight decay included), η_c is the smallest
    learning rate at which θ_t + η u increases the loss over L(θ_t) (Kalra et al. 2026,
    :func:`lscape.curvature.critical_sharpness`): found by a line search on forward passes
    from the three-point quadratic guess uᵀHu/(−gᵀu), then bracketing and bisection to a
    relative width of 2⁻⁴, within ``max_loss_evals`` loss evaluations (no Hessian-vector
    product). θ_t is kept at the backward pass of a due step (only then: one copy of the
    selected parameters) and the measurement is taken at the end of that step, on the step's
    minibatch by default (``data``), at θ_t.

    ``critical_sharpness`` is the middle of the bracket (NaN when it did not close: then one
    bound is infinite), ``critical_sharpness_lower``/``upper`` bound it,
    ``critical_sharpness_quadratic`` is the second-order value, ``critical_forwards`` the
    forward passes spent; compare with ``threshold_gd`` = 2/η: λ_c > 2/η means the step taken
    overshot (η > η_c). λ_c is +inf when the update is not a descent direction.
    """

    name = "critical-sharpness"
    help = "critical sharpness 2/η_c along the actual update, from ≤ 10 forward passes (no HVP)"
    schedule = "every:10"
    data = "minibatch"
    at = "step_end"
    options = _SHARED + (
        Option("max_loss_evals", int, 10, "loss evaluations at most per measurement (each one forward pass "
               "per measured batch)", minimum=3),
        Option("rtol", float, 1 / 16, "stop bisecting when 1 − η_lo/η_hi ≤ rtol", minimum=0.0),
    )
    outputs = (
        Output("critical_sharpness", units="1/lr", long_name="critical sharpness 2/η_c (middle of the bracket)"),
        Output("critical_sharpness_lower", units="1/lr", long_name="lower bound on 2/η_c"),
        Output("critical_sharpness_upper", units="1/lr", long_name="upper bound on 2/η_c"),
        Output("critical_sharpness_quadratic", units="1/lr", long_name="quadratic model uᵀHu/(−gᵀu)"),
        Output("critical_converged", dtype="bool", long_name="bracket within rtol inside the budget"),
        Output("critical_loss_evals", dtype="int64", long_name="loss evaluations spent"),
        Output("critical_forwards", dtype="int64", long_name="forward passes spent"),
        Output("threshold_gd", units="1/lr", long_name="2/η of the step measured"),
        Output("update_norm", long_name="‖θ_{t+1} − θ_t‖ of the step measured"),
        Output("loss", long_name="loss at θ_t on the measured batches"),
    )

    _before: tuple[int, list[torch.Tensor]] | None = None

    def check(self, ctx) -> None:
        if self.opts.rtol is not None and not 0 < self.opts.rtol < 1:
            from lscape.errors import UsageError

            raise UsageError(f"bad value for {self.name}.rtol: must be in (0, 1), not {self.opts.rtol}")
        super().check(ctx)

    def _params(self, ctx) -> list[torch.Tensor]:
        return [p for _, p in select_parameters(ctx.model, self.opts.params)]

    @hookimpl
    def on_after_backward(self, ctx, state) -> None:
        # θ_t, kept only for a due step; measured once the step has moved θ
        if self.due(state):
            self._before = (int(state.step), [p.detach().clone() for p in self._params(ctx)])

    @hookimpl
    def on_step_end(self, ctx, state) -> None:
        if self._before is not None and self._before[0] == int(state.step):
            try:
                self.fire(ctx, state)
            finally:
                self._before = None

    def measure(self, ctx, state) -> dict[str, Any]:
        if self._before is None:  # lscape measure: no step taken here, no update to measure along
            return {}
        params = self._params(ctx)
        lr = float(state.lr if state.lr is not None else ctx.lr)
        with torch.no_grad():
            delta = torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(params, self._before[1])])
            for p, p0 in zip(params, self._before[1]):
                p.copy_(p0)  # back to θ_t (the probe's state is restored after the measurement)
        op = self.operator(ctx, self.batches(ctx, state), kind="hessian")
        passes = sum(1 for _ in op.iter_batches())
        nan = float("nan")
        values = {"threshold_gd": 2.0 / lr, "update_norm": float(torch.linalg.vector_norm(delta))}
        if not bool(torch.isfinite(delta).all()) or float(delta.abs().max()) == 0.0:
            # no step taken (a skipped non-finite step): no direction to measure along
            return {**values, "loss": op.loss(), "critical_sharpness": nan, "critical_sharpness_lower": nan,
                    "critical_sharpness_upper": nan, "critical_sharpness_quadratic": nan,
                    "critical_converged": False, "critical_loss_evals": 1, "critical_forwards": passes}
        update = delta / lr
        budget = int(self.opts.max_loss_evals)
        try:
            cs = critical_sharpness(op, update, max_loss_evals=budget, rtol=self.opts.rtol)
            spent = cs.num_loss_evals
        except ValueError as err:
            if "not a descent direction" in str(err):  # the loss rises for every η: η_c = 0
                inf = math.inf
                return {**values, "loss": op.loss(), "critical_sharpness": inf, "critical_sharpness_lower": inf,
                        "critical_sharpness_upper": inf, "critical_sharpness_quadratic": nan,
                        "critical_converged": True, "critical_loss_evals": 4, "critical_forwards": 4 * passes}
            # concave along u: no quadratic guess; search from the η of the step with what is left
            spent = 3
            cs = critical_sharpness(op, update, lr_guess=lr, max_loss_evals=max(3, budget - spent), rtol=self.opts.rtol)
            spent += cs.num_loss_evals
        return {**values, "loss": cs.losses[0][1], "critical_sharpness": cs.value, "critical_sharpness_lower": cs.lower,
                "critical_sharpness_upper": cs.upper, "critical_sharpness_quadratic": cs.quadratic,
                "critical_converged": bool(cs.converged), "critical_loss_evals": int(spent),
                "critical_forwards": int(spent) * passes}


@hookimpl
def register_probes(register):
    register(CriticalSharpnessProbe)


@hookimpl
def register_plots(register):
    register("critical-sharpness", plot_critical_sharpness)


def plot_critical_sharpness(runs, out_dir):
    """Critical sharpness (with its bracket) against step, with 2/η."""
    import numpy as np

    from lscape.plotting import figure, line, run_colours, run_labels, save

    fig, ax = figure("critical sharpness 2/η_c along the update", "step", "1/lr")
    for run, name, colour in zip(runs, run_labels(runs), run_colours(len(runs))):
        d = run.read("critical-sharpness")
        value = np.asarray(d["critical_sharpness"], dtype=float)
        line(ax, d["step"], np.where(np.isfinite(value), value, np.nan), label=f"{name} λ_c", color=colour)
        lower = np.asarray(d["critical_sharpness_lower"], dtype=float)
        upper = np.asarray(d["critical_sharpness_upper"], dtype=float)
        ok = np.isfinite(lower) & np.isfinite(upper)
        if ok.any():
            ax.fill_between(np.asarray(d["step"])[ok], lower[ok], upper[ok], color=colour, alpha=0.2, lw=0)
        line(ax, d["step"], d["threshold_gd"], label=f"{name} 2/η", color=colour, ls=":", lw=1.2)
    return [save(fig, out_dir / "critical_sharpness.png", legend=ax)]
