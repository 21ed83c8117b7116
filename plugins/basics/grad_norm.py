"""`grad-norm`: gradient norm, update size, parameter norm and distance from initialisation."""

from __future__ import annotations

import torch

from lscape.batch import batch_size_of
from lscape import Option, Output, Probe, hookimpl
from lscape.params import flatten, select_parameters


class GradNorm(Probe):
    """‖∇L_B‖ on the step's minibatch, the update size ‖θ_{t+1} − θ_t‖, ‖θ‖ and ‖θ − θ_0‖."""

    name = "grad-norm"
    sharded = True  # tried under --strategy fsdp (tests/test_sharded.py)
    schedule = "every:1"
    at = "after_backward"
    options = (Option("params", str, None, "parameter subset: comma-separated glob patterns on names"),)
    outputs = (
        Output("grad_norm", long_name="minibatch gradient norm ‖∇L_B(θ_t)‖"),
        Output("param_norm", long_name="parameter norm ‖θ_t‖"),
        Output("dist_from_init", long_name="distance from initialisation ‖θ_t − θ_0‖"),
        Output("update_size", long_name="size of the previous update ‖θ_t − θ_{t−1}‖"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self._init: torch.Tensor | None = None
        self._prev: torch.Tensor | None = None

    @hookimpl
    def on_run_start(self, ctx):
        if self._init is None:  # a resumed run keeps θ_0 from its checkpoint
            self._init = self._flat(ctx).clone()

    def measure(self, ctx, state):
        params = [p for _, p in select_parameters(ctx.model, self.opts.params)]
        if all(p.grad is None for p in params):
            # outside training (lscape measure): compute the minibatch gradient here
            batches = self.batches(ctx, state)
            loss = sum(ctx.adapter.loss(ctx.model, b) * batch_size_of(b) for b in batches)
            grads = torch.autograd.grad(loss / sum(batch_size_of(b) for b in batches), params, allow_unused=True)
        else:
            grads = [p.grad for p in params]
        theta = self._flat(ctx)
        if self._init is None:
            self._init = theta.clone()
        values = {
            "grad_norm": torch.linalg.vector_norm(flatten(grads, like=params)),
            "param_norm": torch.linalg.vector_norm(theta),
            "dist_from_init": torch.linalg.vector_norm(theta - self._init),
        }
        if self._prev is not None:
            values["update_size"] = torch.linalg.vector_norm(theta - self._prev)
        self._prev = theta.clone()
        return values

    def _flat(self, ctx):
        return flatten([p.detach() for _, p in select_parameters(ctx.model, self.opts.params)])

    def state_dict(self):
        return {"init": self._init, "prev": self._prev}

    def load_state_dict(self, state):
        self._init, self._prev = state.get("init"), state.get("prev")


@hookimpl
def register_probes(register):
    register(GradNorm)


@hookimpl
def register_plots(register):
    register("grad-norm", plot_grad_norm)


def plot_grad_norm(runs, out_dir):
    """Gradient norm and distance from initialisation against step, one colour per run."""
    from lscape.plotting import figure, line, run_colours, run_labels, save

    labels, colours = run_labels(runs), run_colours(len(runs))
    paths = []
    for key, title, ylabel in (("grad_norm", "gradient norm", "‖∇L‖"),
                               ("dist_from_init", "distance from initialisation", "‖θ − θ₀‖")):
        fig, ax = figure(title, "step", ylabel)
        for label, colour, run in zip(labels, colours, runs):
            d = run.read("grad-norm")
            if key in d:
                line(ax, d["step"], d[key], label=label, color=colour)
        paths.append(save(fig, out_dir / f"grad_norm_{key}.png", legend=ax))
    return paths
