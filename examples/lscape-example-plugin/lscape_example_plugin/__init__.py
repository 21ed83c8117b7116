"""An example third-party lscape plugin: the norm of every layer's weights, on a schedule."""

from __future__ import annotations

import torch

from lscape import Option, Output, Probe, hookimpl

__version__ = "0.1.0"


class LayerNorms(Probe):
    """‖W_l‖ for every parameter tensor whose name matches `match` (default: weights)."""

    name = "layer-norms"
    schedule = "every:10"
    at = "step_end"
    options = (Option("match", str, "weight", "substring a parameter name must contain"),)
    outputs = (Output("norms", dims=("layer",), long_name="Frobenius norm of each matching tensor"),)

    def measure(self, ctx, state):
        norms = [p.detach().norm() for n, p in ctx.model.named_parameters() if self.opts.match in n]
        return {"norms": torch.stack(norms)}


@hookimpl
def register_probes(register):
    register(LayerNorms)
