"""`sam`: sharpness-aware minimisation (and ASAM) as a step owner around the run's optimizer.

The algorithm is :class:`lscape.optim.SAM`; this module adds the plugin: options, the
per-group ρ option, and the SAM-edge recorded next to ‖g‖ and ‖e‖.
"""

from __future__ import annotations

import math

from lscape import Option, Output, hookimpl
from lscape.errors import UsageError
from lscape.optim import SAM, sam_edge
from lscape.plugins.optim._variant import VariantStep

__all__ = ["SamStep", "SAM", "sam_edge"]


class SamStep(VariantStep):
    """Sharpness-aware minimisation (normalised, same minibatch twice; adaptive=true: ASAM)."""

    name = "sam"
    help = "SAM / ASAM around the base optimizer: gradient at θ + ρ g/‖g‖ on the same minibatch"
    options = (
        Option("rho", float, 0.05, "radius ρ of the ascent step", minimum=0.0),
        Option("adaptive", bool, False, "ASAM: scale the ascent elementwise by |θ| + eta"),
        Option("eta", float, 0.01, "η of ASAM's T = |θ| + η", minimum=0.0),
        Option("eps", float, 1e-5, "added to ‖g‖ in the normalisation", minimum=0.0),
        Option("group_rho", str, None, "ρ per optimizer param group, comma-separated in group order "
               "(default: rho for all; a group's own 'rho' entry is used too)"),
        Option("asam_bias", str, "scaled", "ASAM's T on non-weights: scaled (|θ| + η, davda54/sam) or unscaled "
               "(T = 1 for parameters whose name lacks 'weight', Kwon et al.'s code)", choices=("scaled", "unscaled")),
    )
    outputs = (
        Output("grad_norm", long_name="minibatch gradient norm ‖g‖ at θ"),
        Output("perturbation_norm", long_name="ascent step ‖e‖"),
        Output("sam_edge", units="1/lr", long_name="SAM-edge (‖g‖/2ρ)(√(1+8ρ/(η‖g‖))−1)"),
    )

    def build(self, ctx):
        o = self.opts
        if o.group_rho is not None:
            try:
                values = [float(v) for v in str(o.group_rho).split(",")]
                if not all(math.isfinite(v) and v >= 0 for v in values):
                    raise ValueError
            except ValueError:
                raise UsageError(f"bad value for sam.group_rho: '{o.group_rho}' (comma-separated numbers >= 0)") from None
            groups = ctx.optimizer.param_groups
            if len(values) != len(groups):
                raise UsageError(f"sam.group_rho gives {len(values)} values but the optimizer has {len(groups)} "
                                 "param groups")
            for group, value in zip(groups, values):
                group["rho"] = value
        return SAM(ctx.optimizer, rho=o.rho, adaptive=o.adaptive, eta=o.eta, eps=o.eps, model=ctx.model,
                   asam_bias=o.asam_bias)

    def row(self, ctx, state):
        lr = state.lr if state.lr is not None else ctx.lr
        return {**self.optim.stats, "sam_edge": sam_edge(self.optim.stats["grad_norm"], lr, self.opts.rho)}


@hookimpl
def register_step_owners(register):
    register(SamStep)
