"""A plugin module loaded by import path in tests (`--plugin helpers_plugins`)."""

from lscape import Option, Output, Probe, hookimpl

EVENTS = []


class Failing(Probe):
    """Raises at a chosen step, to check that failures name the plugin."""

    name = "failing"
    options = (Option("at_step", int, 2, "step at which to raise"),)
    outputs = (Output("value"),)

    def measure(self, ctx, state):
        if state.step == self.opts.at_step:
            raise RuntimeError("boom")
        return {"value": float(state.step)}


class Meddler(Probe):
    """Changes everything a probe must not change, to check that the engine restores it."""

    name = "meddler"
    outputs = (Output("touched"),)

    def measure(self, ctx, state):
        import torch

        for p in ctx.model.parameters():
            p.data.add_(1.0)
            if p.grad is not None:
                p.grad.mul_(3.0)
        ctx.model.eval()
        torch.rand(100)  # advance the global RNG
        return {"touched": 1.0}


@hookimpl
def register_probes(register):
    register(Failing)
    register(Meddler)


@hookimpl
def on_run_start(ctx):
    EVENTS.append("run_start")


@hookimpl
def on_run_end(ctx, status):
    EVENTS.append(f"run_end:{status}")
