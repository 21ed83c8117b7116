"""The `interpolate` probe: the loss along the straight path from θ to another state (Goodfellow et al. 2015)."""

from __future__ import annotations

import os

import torch
from lscape import Option, Output, hookimpl
from lscape.errors import UsageError

from ._common import SPLIT_OPTIONS, TrainEvalProbe, load_model_state, require_matching_state
from ._interpolation import interpolation_curve
from ._slices import parse_range

__all__ = ['Interpolate']

class Interpolate(TrainEvalProbe):
    """The linear path θ(α) = αθ_B + (1 − α)θ_A between the model (A) and another one (B:
    a run store's checkpoint or a ``.pt`` state dict), over every state entry including
    BatchNorm buffers, as in SmoothOut's visualize; loss and accuracy on train and eval data."""

    name = "interpolate"
    help = "loss and accuracy on the straight line between the model and another checkpoint or run"
    schedule = "at:0"
    options = SPLIT_OPTIONS + (
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

    def check(self, ctx) -> None:
        # before the store exists: the other model must load and fit this one
        self._other = load_model_state(self.opts.other, self.opts.checkpoint, ctx.device)
        require_matching_state(f"interpolate.other ({self.opts.other})", self._other, ctx.model)

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


@hookimpl
def register_probes(register):
    register(Interpolate)


@hookimpl
def register_plots(register):
    from ._plots import plot_interpolation

    register("interpolate", plot_interpolation)
