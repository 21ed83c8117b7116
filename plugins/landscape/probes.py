"""The `landscape`, `interpolate` and `eps-sharpness` probes: slices, paths and sharpness of a model."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lscape import Option, Output, Probe
from lscape.data import derived_seed, fixed_batches
from lscape.errors import UsageError
from lscape.params import select_parameters, unflatten

from .directions import normalize_to, random_direction, state_tensors
from .interpolation import interpolation_curve
from .sharpness import eps_sharpness_repeated, model_objective
from .slices import displaced, evaluate, parse_range, slice_1d

__all__ = ["Landscape", "Interpolate", "EpsSharpness", "fill_surface", "load_model_state"]

_SPLIT_OPTIONS = (
    Option("eval_batches", int, None, "fixed eval batches (default: as many as train batches; 0: none; -1: all)"),
)


#: grid points one landscape measurement may have (a 500 × 500 surface)
MAX_GRID_POINTS = 250_000


class _TrainEvalProbe(Probe):
    """A probe that evaluates on fixed training batches (its ``data``) and fixed eval batches."""

    data = "subset"
    at = "step_end"

    def split_batches(self, ctx, state) -> dict[str, list]:
        out = {"train": list(self.batches(ctx, state))}
        n = self.opts.eval_batches
        if ctx.eval_set is None or n == 0:
            return out
        if n is None:  # the same kind of data as the training side
            out["eval"] = self.measurement_full(ctx, ctx.eval_set) if self.opts.data != "subset" \
                else self.measurement_subset(ctx, ctx.eval_set, purpose=f"{self.name}-eval")
        elif n < 0:
            out["eval"] = self.measurement_full(ctx, ctx.eval_set)
        else:
            size = self.measure_batch_size(ctx)
            key = f"{self.name}:eval:{n}:{size}"
            if key not in ctx.cache:
                seed = derived_seed(ctx.config.seed, "eval-subset", self.name)
                ctx.cache[key] = fixed_batches(ctx.eval_set, size, n, seed, ctx.device)
            out["eval"] = ctx.cache[key]
        return out

    def params(self, ctx) -> list[torch.Tensor]:
        try:
            return [p for _, p in select_parameters(ctx.model, self.opts.params)]
        except ValueError as e:
            raise UsageError(f"{self.name}.params: {e}") from None


class Landscape(_TrainEvalProbe):
    """1-D or 2-D slices f(α) = L(θ + αd₁), f(α, β) = L(θ + αd₁ + βd₂) of the training and
    eval loss and accuracy, along filter-normalised random directions (Li et al. 2018), the
    top Hessian eigenvector(s) or the gradient. Parameters are moved in place and restored;
    a 2-D grid goes row by row into ``landscape/surface_step<N>`` so that it can be read
    while it fills and an interrupted run resumes it at the first missing row."""

    name = "landscape"
    help = "1-D/2-D loss slices along filter-normalised random, Hessian or gradient directions"
    schedule = "epoch"
    options = _SPLIT_OPTIONS + (
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
            raw = random_direction(params, gen)
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

            from .pca import checkpoint_states

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

        from .pca import checkpoint_states, pca_directions, trajectory_matrix

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


class Interpolate(_TrainEvalProbe):
    """The linear path θ(α) = αθ_B + (1 − α)θ_A between the model (A) and another one (B:
    a run store's checkpoint or a ``.pt`` state dict), over every state entry including
    BatchNorm buffers, as in SmoothOut's visualize; loss and accuracy on train and eval data."""

    name = "interpolate"
    help = "loss and accuracy on the straight line between the model and another checkpoint or run"
    schedule = "at:0"
    options = _SPLIT_OPTIONS + (
        Option("other", str, None, "model B: a run store (its latest checkpoint) or a .pt state dict"),
        Option("checkpoint", str, "latest", "which checkpoint of a run store: latest or a step number"),
        Option("alpha", str, "-1:2:0.1", "coefficients: start:stop:step, start:stop:#num or xmin:xmax:xnum"),
    )
    outputs = (
        Output("alpha", dims=("alpha",), long_name="interpolation coefficient α (0: this model, 1: other)"),
        Output("train_loss", dims=("alpha",), long_name="training loss along the path"),
        Output("train_accuracy", dims=("alpha",), long_name="training accuracy along the path"),
        Output("eval_loss", dims=("alpha",), long_name="eval loss along the path"),
        Output("eval_accuracy", dims=("alpha",), long_name="eval accuracy along the path"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        if not self.opts.other:
            raise UsageError("interpolate needs the other model: -o interpolate.other=RUN.zarr or MODEL.pt")
        if not os.path.exists(self.opts.other):
            raise UsageError(f"interpolate.other: no such run store or file: {self.opts.other}")
        try:
            self.alphas = parse_range(self.opts.alpha)
        except ValueError as e:
            raise UsageError(f"interpolate: {e}") from None
        self._other: dict[str, torch.Tensor] | None = None

    def measure(self, ctx, state):
        if self._other is None:
            self._other = load_model_state(self.opts.other, self.opts.checkpoint, ctx.device)
        here = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        try:
            curve = interpolation_curve(ctx.model, ctx.adapter, self.split_batches(ctx, state), here, self._other,
                                        self.alphas)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"interpolate: the two models do not match: {e}") from None
        return curve


class EpsSharpness(Probe):
    """Keskar et al. (2017) ε-sharpness φ = [max_{y∈C_ε} L(θ + Ay) − L(θ)] / (1 + L(θ)) × 100 over
    the box |y_i| ≤ ε(|(A⁺θ)_i| + 1), in full space (A = I) or a random p-dimensional
    subspace, maximised by L-BFGS-B or projected gradient ascent, repeated with mean ± std."""

    name = "eps-sharpness"
    help = "Keskar ε-sharpness: largest loss rise in a box around θ (full space or random subspace)"
    schedule = "epoch"
    data = "subset"
    at = "step_end"
    options = (
        Option("eps", float, 5e-4, "box size ε", minimum=0.0),
        Option("subspace", int, 0, "dimension p of a random subspace (0: full space)", minimum=0),
        Option("subspace_matrix", str, "smoothout",
               "random subspace: smoothout (A⁺ U(−1,1), unit rows, A = pinv(A⁺), as the seed) or gaussian (A N(0,1))",
               choices=("smoothout", "gaussian")),
        Option("split", str, "train", "measure on training batches, or on the eval set as the SmoothOut code does",
               choices=("train", "eval")),
        Option("method", str, "pga", "maximiser: projected gradient ascent, or scipy's L-BFGS-B",
               choices=("pga", "lbfgsb")),
        Option("iters", int, 10, "iterations of the maximiser", minimum=1),
        Option("repeats", int, 5, "independent maximisations (random starts and subspaces)", minimum=1),
        Option("init", str, "random", "start of each maximisation", choices=("random", "zero")),
        Option("mode", str, "eval", "module mode while evaluating", choices=("eval", "train")),
        Option("params", str, None, "parameter subset: comma-separated glob patterns on names"),
        Option("seed", int, None, "seed of starts and subspaces (default: derived from the run seed)"),
    )
    outputs = (
        Output("eps_sharpness", units="%", long_name="ε-sharpness, mean over repeats"),
        Output("eps_sharpness_std", units="%", long_name="ε-sharpness, standard deviation over repeats"),
        Output("values", dims=("repeat",), units="%", long_name="ε-sharpness of each repeat"),
        Output("loss", long_name="loss at θ on the measurement data"),
    )

    def check(self, ctx):
        if self.opts.split == "eval" and getattr(ctx, "eval_set", None) is None:
            raise UsageError("eps-sharpness.split=eval needs an eval set (the data gives none)")
        if self.opts.method == "lbfgsb":
            try:
                import scipy.optimize  # noqa: F401
            except ImportError:
                raise UsageError("eps-sharpness.method=lbfgsb needs scipy: pip install scipy, "
                                 "or use method=pga") from None

    def measure(self, ctx, state):
        params = [p for _, p in select_parameters(ctx.model, self.opts.params)]
        ctx.model.train(self.opts.mode == "train")
        fun, x0, restore = model_objective(ctx.model, ctx.adapter, self._measure_batches(ctx, state), params)
        seed = self.opts.seed if self.opts.seed is not None else derived_seed(ctx.config.seed, "eps-sharpness")
        try:
            res = eps_sharpness_repeated(
                fun, x0, repeats=self.opts.repeats, seed=int(seed) + int(state.step), eps=self.opts.eps,
                subspace=self.opts.subspace or None, method=self.opts.method, iters=self.opts.iters, init=self.opts.init,
                subspace_matrix=self.opts.subspace_matrix,
            )
            f0 = fun(x0)[0]
        finally:
            restore()
        return {"eps_sharpness": res["mean"], "eps_sharpness_std": res["std"], "values": res["values"], "loss": f0}

    def _measure_batches(self, ctx, state) -> list:
        """The probe's ``data`` batches of the training set, or with ``split=eval`` of the eval set
        (``data=full``: all of it; otherwise ``batches`` fixed batches; seeded, drawn once)."""
        if self.opts.split == "train":
            return self.batches(ctx, state)
        if ctx.eval_set is None:
            raise UsageError("eps-sharpness.split=eval needs an eval set (the data gives none)")
        if self.opts.data == "full":
            return self.measurement_full(ctx, ctx.eval_set)
        return self.measurement_subset(ctx, ctx.eval_set, purpose=f"{self.name}-eval")


def load_model_state(path: str, checkpoint: str = "latest", device: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a run store's checkpoint (``latest`` or a step) or of a ``.pt`` file."""
    if os.path.isdir(path):
        import zarr

        from lscape.checkpoint import load_checkpoint

        root = zarr.open_group(path, mode="r")
        name = None
        if checkpoint != "latest":
            name = f"step_{int(checkpoint):09d}"
        state = load_checkpoint(root, name)
        if state is None:
            raise UsageError(f"{path} has no checkpoint {checkpoint}")
        sd = state["model"]
    else:
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise UsageError(f"cannot load {path} as a state dict: {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
    return {k: v.to(device) for k, v in sd.items()}
