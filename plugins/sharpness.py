"""`sharpness`: the largest Hessian eigenvalue λ_max on a schedule, by warm-started Lanczos."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.curvature import HessianOperator, lanczos
from lscape.data import derived_seed
from lscape.errors import UsageError
from lscape.params import select_parameters

__all__ = ["Sharpness", "CURVATURE_OPTIONS", "make_operator", "curvature_batches", "plot_sharpness", "parse_groups",
           "check_curvature", "groups_of", "loss_adapter", "WHICH_OUTPUT"]

#: the array a selected extreme eigenvalue is stored as
WHICH_OUTPUT = {"LA": "lambda_max", "SA": "lambda_min", "LM": "lambda_abs_max"}

#: Options every curvature probe shares: which matrix, over which parameters, in which mode.
CURVATURE_OPTIONS = (
    Option("mode", str, "eval", "module mode during products (eval: running BN stats, no dropout)",
           choices=("eval", "train")),
    Option("params", str, None, "parameter subset: comma-separated glob patterns on names (default: all)"),
    Option("groups", str, None, "per-group spectra: 'blocks=PATTERN' (one group per module matching, e.g. "
           "blocks=layer*) or 'NAME=PATTERN[,PATTERN];NAME=...' (stored with a group dimension)"),
    Option("kind", str, "hessian", "matrix: the Hessian, the Gauss-Newton matrix, the Monte-Carlo Fisher "
           "(cross-entropy) or the empirical Fisher", choices=("hessian", "ggn", "fisher", "empirical-fisher")),
    Option("method", str, "auto", "Hessian-vector products (finite-difference: an explicit option)",
           choices=("auto", "double-backward", "forward-over-reverse", "finite-difference")),
    Option("chunk", int, None, "split batches into chunks of at most this many samples (memory)", minimum=1),
)


def parse_groups(spec: str | None, model: Any) -> list[tuple[str, list[str]]]:
    """``[(group name, [parameter names])]`` from a ``groups`` option (see CURVATURE_OPTIONS).

    ``blocks=PATTERN``: the parameters under each module whose dotted name matches PATTERN
    (the shortest matching prefix of each parameter name), in registration order;
    ``NAME=PATTERN,...;NAME=...``: explicit groups of glob patterns. Trainable parameters only.
    """
    if not spec:
        return []
    import fnmatch

    from lscape.params import select_parameters

    spec = spec.strip()
    names = [n for n, _ in select_parameters(model)]
    groups: dict[str, list[str]] = {}
    if spec.startswith("blocks="):
        pattern = spec[len("blocks="):].strip()
        if not pattern:
            raise UsageError("groups=blocks=PATTERN needs a pattern, e.g. groups=blocks=layer*")
        for n in names:
            parts = n.split(".")
            for d in range(1, len(parts)):
                prefix = ".".join(parts[:d])
                if fnmatch.fnmatchcase(prefix, pattern):
                    groups.setdefault(prefix, []).append(n)
                    break
        if not groups:
            raise UsageError(f"groups=blocks={pattern} matches no module holding trainable parameters")
        return list(groups.items())
    for part in spec.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"groups: {part.strip()!r} is not NAME=PATTERN (or blocks=PATTERN)")
        name, patterns = (t.strip() for t in part.split("=", 1))
        chosen = [n for n, _ in select_parameters(model, include=[p for p in patterns.split(",") if p] or None)] \
            if patterns else []
        if not name or not chosen:
            raise UsageError(f"groups: group {name or '?'} selects no trainable parameter ({patterns})")
        groups[name] = chosen
    return list(groups.items())


class WarmStart:
    """Probe mixin: keeps the eigenvectors of the previous measurement, and the next few Ritz
    vectors, so the next Lanczos starts from them (option ``warm_start``; Lanczos also adds a
    fresh random direction and verifies, so a swap or a near-tie is not hidden), and saves
    them in checkpoints so a resumed run starts where it stopped."""

    _v0: torch.Tensor | None = None

    def warm_vectors(self, op: HessianOperator, key: str | None = None) -> torch.Tensor | None:
        """The previous start block, if warm starts are on and it fits ``op``."""
        v0 = self._v0.get(key) if isinstance(self._v0, dict) else (self._v0 if key is None else None)
        return v0 if self.opts.warm_start and v0 is not None and v0.shape[-1] == op.dim else None

    def keep_vectors(self, result: Any, key: str | None = None) -> None:
        block = result.warm_start() if hasattr(result, "warm_start") else result.eigenvectors
        block = block.detach().clone()
        if key is None and not isinstance(self._v0, dict):
            self._v0 = block
            return
        if not isinstance(self._v0, dict):
            self._v0 = {} if self._v0 is None else {None: self._v0}
        self._v0[key] = block

    def state_dict(self) -> dict[str, Any]:
        return {"v0": self._v0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._v0 = state.get("v0")


def loss_adapter(ctx: Any) -> Any:
    """The run's batch→loss adapter (``ctx.adapter``), or its plain loss where there is none."""
    return getattr(ctx, "adapter", None) or ctx.loss_fn


def make_operator(probe: Probe, ctx: Any, batches: list[Any], params: Any = None) -> HessianOperator:
    """The curvature operator a probe's options describe, on ``batches`` at the current θ
    (over ``params`` when given: one group of a per-group measurement)."""
    opts = probe.opts
    chosen = params if params is not None else opts.params
    return HessianOperator(ctx.model, loss_adapter(ctx), batches, params=chosen, mode=opts.mode,
                           method=opts.method, kind=opts.kind, chunk=getattr(opts, "chunk", None),
                           seed=derived_seed(getattr(getattr(ctx, "config", None), "seed", 0), "curvature", probe.name) % (2**31))


def curvature_batches(probe: Probe, ctx: Any, state: Any) -> list[Any]:
    """The probe's batches; with ``data=subset`` one fixed subset shared by all curvature probes.

    ``sharpness``, ``hessian`` and ``hessian-exact`` then describe the same matrix, so their
    numbers can be compared (λ_max from Lanczos against the dense spectrum, say).
    """
    if probe.opts.data != "subset":
        return Probe.batches(probe, ctx, state)
    return probe.measurement_subset(ctx, purpose="curvature")


def check_curvature(probe: Probe, ctx: Any) -> None:
    """Bad curvature options are bad input before the store exists (groups, kind vs loss)."""
    probe._groups = parse_groups(getattr(probe.opts, "groups", None), ctx.model)
    k = getattr(probe.opts, "k", None)
    if k is not None:
        from lscape.limits import require_at_most

        from lscape.limits import require_memory

        dim = sum(p.numel() for _, p in select_parameters(ctx.model, probe.opts.params))
        require_at_most(k, dim, f"{probe.name}.k", "the number of selected parameters")
        # the Lanczos basis: about 3k vectors of the parameters' size (block, spare, restarts)
        require_memory(3 * k * dim * 4, f"{probe.name}: a Lanczos basis for k={k} over {dim} parameters",
                       f"{probe.name}.k", ctx.device)
    adapter = loss_adapter(ctx)
    if probe.opts.kind != "hessian" and not getattr(adapter, "separable", True):
        raise UsageError(f"{probe.name}: kind={probe.opts.kind} needs a loss of the model's output (a separable "
                         f"loss); name a loss (--loss ce) instead of --loss model, or use kind=hessian")


def groups_of(probe: Probe, ctx: Any) -> list[tuple[str, list[str]]]:
    if getattr(probe, "_groups", None) is None:
        probe._groups = parse_groups(getattr(probe.opts, "groups", None), ctx.model)
    return probe._groups


class Sharpness(WarmStart, Probe):
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
    """

    name = "sharpness"
    help = "λ_max (or λ_min, ‖H‖) of the Hessian by warm-started Lanczos, with residual ‖Hv−λv‖ and HVP count"
    schedule = "every:10"
    data = "subset"
    at = "after_backward"
    options = CURVATURE_OPTIONS + (
        Option("which", str, "LA", "LA largest (λ_max), SA smallest (λ_min), LM largest magnitude (‖H‖)",
               choices=("LA", "SA", "LM")),
        Option("tol", float, 1e-3, "stop when the residual ‖Hv − λv‖ ≤ tol·|λ|", minimum=0.0),
        Option("max_iter", int, 100, "Hessian-vector products at most per measurement", minimum=1),
        Option("warm_start", bool, True, "start from the previous measurement's eigenvector (plus a fresh direction)"),
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
    )

    def check(self, ctx):
        check_curvature(self, ctx)

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["groups"] = [name for name, _ in (getattr(self, "_groups", None) or [])]
        attrs["stored_as"] = WHICH_OUTPUT[self.opts.which]
        return attrs

    def batches(self, ctx, state) -> list[Any]:
        return curvature_batches(self, ctx, state)

    def _solve(self, op, state, key=None):
        result = lanczos(op, k=1, which=self.opts.which, tol=self.opts.tol, max_iter=self.opts.max_iter,
                         v0=self.warm_vectors(op, key), seed=int(state.step))
        self.keep_vectors(result, key)
        return result

    def measure(self, ctx, state) -> dict[str, Any]:
        batches = self.batches(ctx, state)
        op = make_operator(self, ctx, batches)
        result = self._solve(op, state)
        op.release()
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
        groups = groups_of(self, ctx)
        if groups:
            per = []
            for name, names in groups:
                gop = make_operator(self, ctx, batches, params=names)
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
