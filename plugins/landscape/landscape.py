"""The `landscape` probe: 1-D slices and 2-D surfaces of the loss around θ (Li et al. 2018), in
filter-normalised random, PCA-of-trajectory or stored-state directions."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from lscape import Option, Output, hookimpl
from lscape.data import derived_seed
from lscape.errors import UsageError
from lscape.params import select_parameters, unflatten

from ._common import SPLIT_OPTIONS, TrainEvalProbe
from ._directions import normalize_to, random_direction, random_state_direction, state_tensors
from ._slices import displaced, evaluate, parse_range, slice_1d

__all__ = ['Landscape', 'fill_surface', 'MAX_GRID_POINTS']

#: grid points one landscape measurement may have (a 500 × 500 surface)
MAX_GRID_POINTS = 250_000


class Landscape(TrainEvalProbe):
    """1-D or 2-D slices f(α) = L(θ + αd₁), f(α, β) = L(θ + αd₁ + βd₂) of the training and
    eval loss and accuracy, along filter-normalised random directions (Li et al. 2018), the
    top Hessian eigenvector(s) or the gradient. Parameters are moved in place and restored;
    a 2-D grid goes row by row into ``landscape/surface_step<N>`` so that it can be read
    while it fills and an interrupted run resumes it at the first missing row."""

    name = "landscape"
    help = "1-D/2-D loss slices along filter-normalised random, Hessian or gradient directions"
    schedule = "epoch"
    options = SPLIT_OPTIONS + (
        Option("dims", int, 1, "1 for a curve, 2 for a surface", choices=(1, 2)),
        Option("direction", str, "random", "directions (pca: of the run's checkpoints, loss-landscape's plot_trajectory)",
               choices=("random", "hessian", "gradient", "pca")),
        Option("normalize", str, "auto", "direction scaling (auto: filter for random, unit otherwise; "
               "filter/layer/weight/dfilter/dlayer as loss-landscape's --xnorm)",
               choices=("auto", "filter", "layer", "weight", "dfilter", "dlayer", "unit", "model", "none")),
        Option("dir_type", str, "weights", "random directions over the parameters (weights) or every floating "
               "state entry, BatchNorm buffers included (states), as loss-landscape's --dir_type",
               choices=("weights", "states")),
        Option("same_dir", bool, False, "dims=2: the second direction is the first (loss-landscape's --same_dir)"),
        Option("pca_run", str, None, "direction=pca: the run store whose checkpoints make the path "
               "(default: this run, or the store being measured)"),
        Option("ignore", str, "biasbn", "random/filter directions on dim ≤ 1 tensors: zero (biasbn) or copy θ (none)",
               choices=("biasbn", "none")),
        Option("alpha", str, "-1:1:#51", "coefficients along d₁: start:stop:#num, xmin:xmax:xnum or start:stop:step"),
        Option("beta", str, None, "coefficients along d₂ (default: as alpha)"),
        Option("mode", str, "eval", "module mode while evaluating", choices=("eval", "train")),
        Option("params", str, None, "parameter subset: comma-separated glob patterns on names"),
        Option("seed", int, None, "seed of the random directions (default: derived from the run seed)"),
    )
    outputs = (
        Output("alpha", dims=("alpha",), long_name="coefficient α along d₁"),
        Output("train_loss", dims=("alpha",), long_name="training loss along the slice"),
        Output("train_accuracy", dims=("alpha",), long_name="training accuracy along the slice"),
        Output("eval_loss", dims=("alpha",), long_name="eval loss along the slice"),
        Output("eval_accuracy", dims=("alpha",), long_name="eval accuracy along the slice"),
        Output("eigenvalues", dims=("k",), long_name="Hessian eigenvalues of the directions"),
        Output("surface_rows", dtype="int64", long_name="rows of the 2-D surface written"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        try:
            self.alphas = parse_range(self.opts.alpha)
            self.betas = parse_range(self.opts.beta or self.opts.alpha)
        except ValueError as e:
            raise UsageError(f"landscape: {e}") from None
        o = self.opts
        if o.dir_type == "states" and (o.direction != "random" or o.params):
            raise UsageError("landscape.dir_type=states is for random directions over the whole state "
                             "(no direction= or params=)")
        if o.direction == "pca" and o.dims != 2:
            raise UsageError("landscape.direction=pca is a 2-D plot: add -o landscape.dims=2")
        if o.same_dir and o.dims != 2:
            raise UsageError("landscape.same_dir needs dims=2")
        if o.pca_run is not None and not os.path.isdir(o.pca_run):
            raise UsageError(f"landscape.pca_run: no such run store: {o.pca_run}")

    def directions(self, ctx, params, train) -> tuple[list[list[torch.Tensor]], dict[str, Any]]:
        """The ``dims`` directions (tensors shaped like ``params``) and extra values to record.

        Hessian eigenvectors and the gradient are scaled to unit norm by default, random
        directions filter-wise; with ``direction=gradient`` and ``dims=2`` the second
        direction is random.
        """
        seed = self.opts.seed if self.opts.seed is not None else derived_seed(ctx.config.seed, "landscape")
        gen = torch.Generator().manual_seed(int(seed))
        dims, extra, given = self.opts.dims, {}, []
        if self.opts.direction == "hessian":
            from lscape.curvature import HessianOperator, lanczos

            op = HessianOperator(ctx.model, ctx.adapter, train, params=params, mode=self.opts.mode)
            res = lanczos(op, k=dims, which="LA", tol=1e-4, seed=int(seed))
            extra["eigenvalues"] = torch.as_tensor(res.eigenvalues).reshape(-1)[:dims]
            given = [unflatten(res.eigenvectors[i].to(params[0].dtype), params) for i in range(dims)]
        elif self.opts.direction == "gradient":
            from lscape.curvature import gradient

            given = [unflatten(gradient(ctx.model, ctx.adapter, train, params=params, mode=self.opts.mode), params)]
        how = self.opts.normalize
        dirs = [normalize_to(d, params, "unit" if how == "auto" else how, self.opts.ignore) for d in given]
        while len(dirs) < dims:
            if self.opts.same_dir and dirs:
                dirs.append([t.clone() for t in dirs[0]])
                continue
            raw = random_state_direction(ctx.model, gen) if self.opts.dir_type == "states" else random_direction(params, gen)
            dirs.append(normalize_to(raw, params, "filter" if how == "auto" else how, self.opts.ignore))
        return dirs, extra

    def check(self, ctx) -> None:
        from lscape.limits import require_at_most

        points = len(self.alphas) * (len(self.betas) if self.opts.dims == 2 else 1)
        # each grid point is a forward pass over the measurement data, train and eval
        require_at_most(points, MAX_GRID_POINTS, "landscape.alpha/beta (grid points)",
                        "what one measurement should evaluate")
        if self.opts.direction == "pca" and self.opts.pca_run is not None:
            import zarr

            from ._pca import checkpoint_states

            n = len(checkpoint_states(zarr.open_group(self.opts.pca_run, mode="r")))
            if n < 3:
                raise UsageError(f"landscape.direction=pca needs at least 3 checkpoints, {self.opts.pca_run} has {n}: "
                                 "checkpoint more often (--checkpoint-schedule)")

    def displaced_tensors(self, ctx) -> tuple[list[str] | None, list[torch.Tensor]]:
        """What a direction moves: the selected parameters, or (``dir_type=states``) every
        floating-point state entry, BatchNorm running statistics included."""
        if self.opts.dir_type == "states":
            names, tensors = state_tensors(ctx.model)
            return names, tensors
        return None, self.params(ctx)

    def pca(self, ctx, params) -> tuple[list[list[torch.Tensor]], np.ndarray, np.ndarray, dict[str, Any]] | None:
        """PCA directions of the checkpoints around θ and the path's coordinates, or None when
        fewer than three checkpoints exist yet (during a run: measured once there are)."""
        import zarr

        from ._pca import checkpoint_states, pca_directions, trajectory_matrix

        source = self.opts.pca_run
        if source is None and ctx.store is not None:
            kind = ctx.store.attrs.get("kind")
            source = ctx.store.attrs.get("source") if kind == "measure" else None
            root = ctx.store.root if kind != "measure" else None
        else:
            root = None
        if root is None:
            if source is None or not os.path.isdir(str(source)):
                raise UsageError("landscape.direction=pca needs a run store with checkpoints: measure one "
                                 "(lscape measure RUN.zarr ...) or name it with -o landscape.pca_run=RUN.zarr")
            root = zarr.open_group(str(source), mode="r")
        states = checkpoint_states(root)
        names = [n for n, _ in select_parameters(ctx.model, self.opts.params)]
        if len(states) < 3:
            if ctx.store is not None and ctx.store.attrs.get("kind") != "measure" and self.opts.pca_run is None:
                return None
            raise UsageError(f"landscape.direction=pca needs at least 3 checkpoints, {source or 'the run'} has "
                             f"{len(states)}: checkpoint more often (--checkpoint-schedule)")
        try:
            matrix = trajectory_matrix([s for _, s in states], names, params, self.opts.ignore)
            dirs, ratio = pca_directions(matrix)
        except (KeyError, ValueError) as e:
            raise UsageError(f"landscape.direction=pca: {e}") from None
        coords = (matrix @ dirs.T).numpy()
        tensors = [unflatten(dirs[i].to(params[0].dtype).to(params[0].device), params) for i in range(2)]
        path = {"path_step": np.array([s for s, _ in states], dtype=np.int64), "path_x": coords[:, 0],
                "path_y": coords[:, 1], "explained_variance_ratio": ratio.numpy()}
        return tensors, *_pca_grid(coords, len(self.alphas), len(self.betas)), path

    def measure(self, ctx, state):
        names, params = self.displaced_tensors(ctx)
        data = self.split_batches(ctx, state)
        if self.opts.direction == "pca":
            found = self.pca(ctx, params)
            if found is None:
                return {}
            dirs, alphas, betas, path = found
            rows = self._surface(ctx, state.step, params, dirs, data, alphas, betas, path)
            return {"surface_rows": rows}
        dirs, extra = self.directions(ctx, params, data["train"])
        if self.opts.dims == 1:
            row: dict[str, Any] = {"alpha": self.alphas, **extra}
            for split, batches in data.items():
                res = slice_1d(ctx.model, ctx.adapter, batches, params, dirs[0], self.alphas, self.opts.mode)
                row[f"{split}_loss"], row[f"{split}_accuracy"] = res["loss"], res["accuracy"]
            return row
        rows = self._surface(ctx, state.step, params, dirs, data)
        return {"surface_rows": rows, **extra}

    def _surface(self, ctx, step, params, dirs, data, alphas=None, betas=None, path=None) -> int:
        group = None
        if ctx.store is not None and ctx.is_main:
            group = ctx.store.root.require_group(f"{self.name}/surface_step{step:09d}")
        alphas = self.alphas if alphas is None else alphas
        betas = self.betas if betas is None else betas
        spec = {"alpha": self.opts.alpha, "beta": self.opts.beta or self.opts.alpha,
                "direction": self.opts.direction, "step": int(step),
                "grid": [float(alphas[0]), float(alphas[-1]), float(betas[0]), float(betas[-1])]}
        rows = fill_surface(group, ctx.model, ctx.adapter, data, params, dirs, alphas, betas, self.opts.mode, spec)
        if group is not None and path is not None:
            # the checkpoints' path in the (α, β) plane, and how much of its variance the plane holds
            for key in ("path_step", "path_x", "path_y"):
                values = path[key]
                group.create_array(key, shape=values.shape, dtype=values.dtype, dimension_names=["checkpoint"],
                                   overwrite=True)[:] = values
            group.attrs["explained_variance_ratio"] = [float(v) for v in path["explained_variance_ratio"]]
        return rows


def _pca_grid(coords: np.ndarray, na: int, nb: int, margin: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """``na`` × ``nb`` grid coefficients covering the path's bounding box (and θ at 0) plus ``margin``."""
    out = []
    for col, n in ((coords[:, 0], na), (coords[:, 1], nb)):
        lo, hi = min(float(col.min()), 0.0), max(float(col.max()), 0.0)
        pad = margin * max(hi - lo, 1e-12)
        out.append(np.linspace(lo - pad, hi + pad, n))
    return out[0], out[1]


def fill_surface(group, model, loss_fn, data, params, dirs, alphas, betas, mode="eval", spec=None) -> int:
    """Evaluate the surface θ + α_i d₁ + β_j d₂ row by row into zarr ``group``; returns rows done.

    ``data`` maps a split name to its batches; each split gets ``<split>_loss`` and
    ``<split>_accuracy`` arrays (α, β), one chunk per row, NaN until written. The
    group's ``rows_done`` attribute is raised after each row is stored, so a reader can
    trust the rows before it, and a second call with the same ``spec`` (a dict
    describing the grid) resumes at the first missing row. ``group`` None computes
    without storing.
    """
    A, B = len(alphas), len(betas)
    if group is not None:
        spec = dict(spec or {}, alphas=len(alphas), betas=len(betas), splits=sorted(data))
        if group.attrs.get("spec") != spec:  # a different grid: start afresh
            for key in list(group.array_keys()):
                del group[key]
            group.attrs.update({"spec": spec, "rows_done": 0})
        for key, values in (("alpha", alphas), ("beta", betas)):
            if key not in group.array_keys():
                group.create_array(key, shape=values.shape, dtype="float64", dimension_names=[key])[:] = values
        for split in data:
            for what in ("loss", "accuracy"):
                key = f"{split}_{what}"
                if key not in group.array_keys():
                    group.create_array(key, shape=(A, B), chunks=(1, B), dtype="float64", fill_value=np.nan,
                                       dimension_names=["alpha", "beta"],
                                       attributes={"long_name": f"{split} {what} on the surface"})
    start = int(group.attrs.get("rows_done", 0)) if group is not None else 0
    done = start
    # one displacement for all splits: every grid point is set once and evaluated on each
    with displaced(model, params, dirs[:2], mode) as disp:
        for i in range(start, A):
            row = {f"{s}_{w}": np.empty(B) for s in data for w in ("loss", "accuracy")}
            for j, b in enumerate(betas):
                disp.move(alphas[i], b)
                for s, batches in data.items():
                    row[f"{s}_loss"][j], row[f"{s}_accuracy"][j] = evaluate(model, loss_fn, batches)
            if group is not None:
                for key, values in row.items():
                    group[key][i] = values
                group.attrs["rows_done"] = i + 1
            done = i + 1
    return done



@hookimpl
def register_probes(register):
    register(Landscape)


@hookimpl
def register_plots(register):
    from ._plots import plot_slices, plot_surfaces

    register("landscape", plot_slices)
    register("landscape", plot_surfaces)
