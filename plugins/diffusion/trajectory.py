"""`trajectory`: the flat parameter vector (or a seeded random projection of it) every K steps."""

from __future__ import annotations

import math

import torch

from lscape import Option, Output, Probe, hookimpl
from lscape.data import derived_seed
from lscape.params import flatten, select_parameters

from ._projection import RandomProjection

__all__ = ["Trajectory"]


class Trajectory(Probe):
    """θ_t flattened (parameters only: BatchNorm running statistics are buffers and are left
    out), with the minibatch loss L_B(θ_t), the step length ‖θ_t − θ_{t−1}‖ and the path
    length Σ‖θ_{k+1} − θ_k‖ beside it.

    Rows go through the run store's writer, which appends one compressed chunk at a time,
    so memory does not grow with the number of steps. ``every``/``schedule`` gives the
    stride in steps, ``params`` a subset of parameters by name, ``coord_stride`` keeps every
    s-th coordinate, and ``dim`` > 0 stores a seeded Johnson–Lindenstrauss projection to
    ``dim`` coordinates instead (``projection_seed`` is stored in the group's attributes).
    Step and path lengths are always measured in the full (selected) space, at every step.
    """

    name = "trajectory"
    sharded = True  # tried under --strategy fsdp (tests/test_sharded.py)
    help = "flat parameters (or a JL projection) every K steps, with minibatch loss and step length"
    schedule = "every:1"
    data = "minibatch"
    at = "after_backward"
    options = (
        Option("params", str, None, "parameter subset: comma-separated glob patterns on names"),
        Option("coord_stride", int, 1, "keep every s-th coordinate of the flat vector", minimum=1),
        Option("dim", int, 0, "random projection to this many coordinates (0: store the vector itself)", minimum=0),
        Option("projection", str, "sparse", "JL matrix: sparse (8 ±1 entries per column, fast) or gaussian (dense)",
               choices=("gaussian", "sparse")),
        Option("projection_seed", int, None, "seed of the projection (default: derived from the run seed)"),
        Option("gradient", bool, False, "also store the minibatch gradient, projected like θ"),
        Option("dtype", str, "float32", "storage dtype of θ", choices=("float32", "float64", "float16")),
    )
    outputs = (
        Output("theta", dims=("coord",), dtype="float32", long_name="flat parameters θ_t (or their projection)"),
        Output("grad", dims=("coord",), dtype="float32", long_name="minibatch gradient ∇L_B(θ_t), projected like θ"),
        Output("loss", long_name="minibatch loss L_B(θ_t)"),
        Output("step_length", long_name="step length ‖θ_t − θ_{t−1}‖"),
        Output("path_length", long_name="path length Σ_{k<t} ‖θ_{k+1} − θ_k‖ since the run started (kept across resumes)"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts.dtype != "float32":
            self.outputs = tuple(  # type: ignore[misc]
                Output(o.name, o.dims, self.opts.dtype, o.units, o.long_name) if o.dims else o for o in type(self).outputs
            )
        self._params: list[torch.Tensor] | None = None
        self._projection: RandomProjection | None = None
        self._prev: torch.Tensor | None = None
        self._path = 0.0
        self._last_length = math.nan
        self._seed: int | None = None

    def store_attrs(self):
        attrs = super().store_attrs()
        attrs["projection_seed"] = self._seed
        attrs["dimension_in"] = None if self._params is None else sum(p.numel() for p in self._params)
        return attrs

    def check(self, ctx):
        """Bad params patterns, a projection to more coordinates than θ has, and a projection
        block that does not fit in memory are refused before the store exists."""
        from lscape.limits import require_at_most, require_memory

        self._setup(ctx)
        n = math.ceil(sum(p.numel() for p in self._params) / self.opts.coord_stride)
        if self.opts.dim > 0:
            require_at_most(self.opts.dim, n, "trajectory.dim", "the number of coordinates it projects")
            width = min(n, 65536)  # RandomProjection works one block of columns at a time
            per_block = self.opts.dim * width * 4 if self.opts.projection == "gaussian" else 8 * width * 12
            require_memory(per_block + 3 * n * 4, f"trajectory's {self.opts.projection} projection to {self.opts.dim}",
                           "trajectory.dim (or -o trajectory.projection=sparse)", ctx.device)

    @hookimpl
    def on_run_start(self, ctx):
        self._setup(ctx)

    @hookimpl
    def on_after_backward(self, ctx, state):
        # every step, due or not: the step and path lengths must not depend on the stride
        self._setup(ctx)
        theta = flatten([p.detach() for p in self._params])
        self._device_prev(theta)
        if self._prev is not None and self._prev.shape == theta.shape:
            self._last_length = float(torch.linalg.vector_norm(theta - self._prev))
            self._path += self._last_length
        else:
            self._last_length = math.nan
        if self._prev is None or self._prev.shape != theta.shape:
            self._prev = theta.clone()
        else:
            self._prev.copy_(theta)
        if self.due(state):
            self.record(ctx, state.step, **self._row(theta, state))

    def run_measure(self, ctx, state):
        """Used by ``lscape measure``: one row at the given state, no gradient needed."""
        self._setup(ctx)
        theta = flatten([p.detach() for p in self._params])
        values = self._row(theta, state)
        self.record(ctx, state.step, **values)
        return values

    def _row(self, theta: torch.Tensor, state) -> dict:
        values = {"theta": self._reduce(theta), "step_length": self._last_length, "path_length": self._path}
        if state.loss is not None:
            values["loss"] = float(state.loss)
        if self.opts.gradient and all(p.grad is not None for p in self._params):
            values["grad"] = self._reduce(flatten([p.grad.detach() for p in self._params]))
        return values

    def _reduce(self, v: torch.Tensor) -> torch.Tensor:
        if self.opts.coord_stride > 1:
            v = v[:: self.opts.coord_stride]
        if self._projection is not None:
            v = self._projection(v)
        return v.to(getattr(torch, self.opts.dtype)).cpu()

    def _setup(self, ctx) -> None:
        if self._params is not None:
            return
        try:
            self._params = [p for _, p in select_parameters(ctx.model, self.opts.params)]
        except ValueError as e:
            from lscape.errors import UsageError

            raise UsageError(f"trajectory.params: {e}") from None
        n = math.ceil(sum(p.numel() for p in self._params) / self.opts.coord_stride)
        self._seed = self.opts.projection_seed
        if self._seed is None:
            self._seed = derived_seed(ctx.config.seed, "trajectory", "projection")
        if self.opts.dim > 0:
            self._projection = RandomProjection(
                n, self.opts.dim, seed=self._seed, kind=self.opts.projection, device=ctx.device
            )

    def state_dict(self):
        # θ_{t−1} is saved so that the first step after a resume has its step length and
        # the path length keeps every increment: resume is exact
        return {"path_length": self._path, "last_length": self._last_length,
                "prev": None if self._prev is None else self._prev.detach().cpu().clone()}

    def load_state_dict(self, state):
        self._path = float(state.get("path_length", 0.0))
        self._last_length = float(state.get("last_length", math.nan))
        prev = state.get("prev")
        self._prev = None if prev is None else prev.clone()

    def _device_prev(self, theta: torch.Tensor) -> None:
        if self._prev is not None and self._prev.device != theta.device:
            self._prev = self._prev.to(theta.device)


@hookimpl
def register_probes(register):
    register(Trajectory)
