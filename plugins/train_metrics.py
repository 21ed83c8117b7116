"""Always-on: the training record — step, loss, lr, epoch, wall time, eval metrics — in `train`."""

from __future__ import annotations

from lscape import Output, Plugin, hookimpl


class TrainMetrics(Plugin):
    """Records the minibatch loss, learning rate, epoch, wall time and eval metrics per step."""

    name = "train-metrics"
    group_name = "train"
    always_on = True
    outputs = (
        Output("loss", units="", long_name="minibatch loss at θ_step"),
        Output("lr", long_name="learning rate"),
        Output("epoch", dtype="int64", long_name="epoch"),
        Output("time", units="s", long_name="wall-clock time since the run started"),
        Output("eval_loss", long_name="held-out loss after the step"),
        Output("eval_accuracy", long_name="held-out accuracy after the step"),
    )

    @hookimpl
    def on_step_end(self, ctx, state):
        extras = {k: state.extras[k] for k in ("eval_loss", "eval_accuracy") if k in state.extras}
        self.record(ctx, state.step, loss=state.loss, lr=state.lr, epoch=state.epoch, time=state.time, **extras)


@hookimpl
def register_plugins(register):
    register(TrainMetrics)


@hookimpl
def register_plots(register):
    register("train", plot_training)


def plot_training(runs, out_dir):
    """Loss (log scale), learning rate and eval accuracy against step; runs overlaid."""
    from lscape.plotting import figure, save

    paths = []
    fig, ax = figure("training loss", "step", "minibatch loss")
    for run in runs:
        d = run.read("train")
        ax.plot(d["step"], d["loss"], label=run.name, lw=0.8)
        if "eval_loss" in d:
            mask = ~_isnan(d["eval_loss"])
            ax.plot(d["step"][mask], d["eval_loss"][mask], "o--", ms=3, label=f"{run.name} (eval)")
    ax.set_yscale("log")
    paths.append(save(fig, out_dir / "train_loss.png", legend=ax))
    with_acc = [r for r in runs if "eval_accuracy" in r.read("train")]
    if with_acc:
        fig, ax = figure("held-out accuracy", "step", "accuracy")
        for run in with_acc:
            d = run.read("train")
            mask = ~_isnan(d["eval_accuracy"])
            ax.plot(d["step"][mask], d["eval_accuracy"][mask], "o-", ms=3, label=run.name)
        paths.append(save(fig, out_dir / "train_accuracy.png", legend=ax))
    fig, ax = figure("learning rate", "step", "lr")
    for run in runs:
        d = run.read("train")
        ax.plot(d["step"], d["lr"], label=run.name)
    paths.append(save(fig, out_dir / "train_lr.png", legend=ax))
    return paths


def _isnan(a):
    import numpy as np

    return np.isnan(a.astype(float))
