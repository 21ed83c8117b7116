"""`entropy-sgd`: Entropy-SGD as a step owner around the run's optimizer, and its figure.

The algorithm is :class:`lscape.optim.EntropySGD`; this module adds the plugin: options,
one fresh minibatch per Langevin step, and the four-panel statistics figure.
"""

from __future__ import annotations

import torch

from lscape import Option, Output, hookimpl
from lscape.errors import UsageError
from lscape.optim import EntropySGD
from lscape.plugins.optim._variant import VariantStep

__all__ = ["EntropySgdStep", "EntropySGD", "plot_entropy_sgd", "ENTROPY_SGD_PANELS"]


class EntropySgdStep(VariantStep):
    """Entropy-SGD: L Langevin steps on fresh minibatches estimate the local-entropy gradient."""

    name = "entropy-sgd"
    help = "Entropy-SGD: L Langevin steps (fresh minibatches) around x, then a base step along x − μ"
    fresh_batches = True
    stats_schedule = "every:50"
    options = (
        Option("L", int, 20, "Langevin steps per update (0: the base optimizer alone)", minimum=0),
        Option("gamma", float, 1e-4, "scope γ₀ of the coupling term", minimum=0.0),
        Option("scoping", float, 1e-3, "γ_t = γ₀ (1 + scoping)^t", minimum=0.0),
        Option("noise", float, 1e-4, "Langevin temperature", minimum=0.0),
        Option("langevin_lr", float, 0.1, "learning rate η' of the Langevin loop", minimum=0.0),
        Option("beta", float, 0.75, "averaging factor of μ", minimum=0.0),
        Option("momentum", float, None, "Langevin momentum (default: the base optimizer's)", minimum=0.0),
        Option("nesterov", bool, None, "Nesterov momentum in the Langevin loop (default: the base optimizer's)"),
        Option("dampening", float, None, "Langevin momentum dampening τ: m = mom·m + (1 − τ)d (default: the base's)",
               minimum=0.0),
        Option("weight_decay", float, None, "weight decay in the Langevin loop (default: the base optimizer's)",
               minimum=0.0),
        Option("compat", str, "none", "'original': python/optim.py's outer buffer start, its dw = mdw aliasing "
               "without Nesterov and its constant γ", choices=("none", "original")),
    )
    outputs = (
        Output("grad_norm", long_name="‖∇f(x)‖ on the step's first minibatch"),
        Output("dist_mu", long_name="‖x − μ‖"),
        Output("cos", long_name="cos(∇f, x − μ)"),
        Output("noise_norm", long_name="norm of the last Langevin noise term"),
        Output("mean_dist", long_name="mean over the Langevin steps of ‖x − x'‖"),
        Output("gamma", long_name="γ_t"),
    )

    def batches_per_step(self) -> int:
        return 1 + self.opts.L  # the step's batch, then one fresh minibatch per Langevin step

    def build(self, ctx):
        o = self.opts
        if o.compat == "original" and not isinstance(ctx.optimizer, torch.optim.SGD):
            raise UsageError("entropy-sgd.compat=original reproduces the original's SGD update: use --optimizer sgd")
        return EntropySGD(ctx.optimizer, L=o.L, gamma=o.gamma, scoping=o.scoping, noise=o.noise,
                          langevin_lr=o.langevin_lr, beta=o.beta, momentum=o.momentum, nesterov=o.nesterov,
                          dampening=o.dampening, weight_decay=o.weight_decay, compat=o.compat)

    def step(self, closure, ctx, state) -> float:
        return float(super().step(closure, ctx, state))


#: the panels of the Entropy-SGD figure: title, arrays, log scale
ENTROPY_SGD_PANELS = (
    ("gradient and local-entropy gradient", ("grad_norm", "dist_mu"), True),
    ("cos(∇f, x − μ)", ("cos",), False),
    ("Langevin excursion and noise", ("mean_dist", "noise_norm"), True),
    ("scope γ_t", ("gamma",), True),
)


def plot_entropy_sgd(runs, out_dir):
    """The Entropy-SGD statistics against step (the original's verbose output as a figure)."""
    import numpy as np

    from lscape.plotting import figure, save

    fig, ax0 = figure("entropy-sgd", "", "", size=(11, 6.4))
    fig.delaxes(ax0)
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for ax, (title, keys, log) in zip(axes, ENTROPY_SGD_PANELS):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for run in runs:
            if not run.has("entropy-sgd"):
                continue
            data = run.read("entropy-sgd")
            for key in keys:
                if key not in data or not np.isfinite(data[key]).any():
                    continue
                label = key if len(runs) == 1 else f"{run.name}: {key}"
                ax.plot(data["step"], data[key], lw=0.9, marker="." if len(data["step"]) < 50 else None, label=label)
        values = [np.asarray(line.get_ydata(), float) for line in ax.lines]
        if log and values and all((v[np.isfinite(v)] > 0).all() for v in values):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return [save(fig, out_dir / "entropy_sgd.png")]


@hookimpl
def register_plots(register):
    register("entropy-sgd", plot_entropy_sgd)


@hookimpl
def register_step_owners(register):
    register(EntropySgdStep)
