"""Always-on: the training record — step, loss, lr, epoch, wall time, eval metrics — in `train`."""

from __future__ import annotations

from lscape import Output, Plugin, hookimpl


class TrainMetrics(Plugin):
    """Records the minibatch loss, learning rate, epoch, wall time and eval metrics per step."""

    name = "train-metrics"
    sharded = True  # tried under --strategy fsdp (tests/test_sharded.py)
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
    """Loss (train solid, eval dashed, one colour per run), eval accuracy and the learning
    rate against step; runs overlaid."""
    from lscape.plotting import figure, line, run_colours, run_labels, save

    labels, colours = run_labels(runs), run_colours(len(runs))
    data = [run.read("train") for run in runs]
    paths = []
    fig, ax = figure("training loss", "step", "loss")
    for label, colour, d in zip(labels, colours, data):
        line(ax, d["step"], d["loss"], label=f"{label} train", color=colour)
        if "eval_loss" in d:
            mask = ~_isnan(d["eval_loss"])
            line(ax, d["step"][mask], d["eval_loss"][mask], label=f"{label} eval", color=colour, ls="--",
                 marker="o", ms=3, smooth=1)
    paths.append(save(fig, out_dir / "train_loss.png", legend=ax))
    with_acc = [(label, colour, d) for label, colour, d in zip(labels, colours, data) if "eval_accuracy" in d]
    if with_acc:
        fig, ax = figure("held-out accuracy", "step", "accuracy")
        for label, colour, d in with_acc:
            mask = ~_isnan(d["eval_accuracy"])
            line(ax, d["step"][mask], d["eval_accuracy"][mask], label=label, color=colour, marker="o", ms=3, smooth=1)
        paths.append(save(fig, out_dir / "train_accuracy.png", legend=ax, auto_log=False,
                          empty="no evaluation was recorded"))
    fig, ax = figure("learning rate", "step", "lr")
    for label, colour, d in zip(labels, colours, data):
        line(ax, d["step"], d["lr"], label=label, color=colour, smooth=1)
    paths.append(save(fig, out_dir / "train_lr.png", legend=ax))
    return paths


def _isnan(a):
    import numpy as np

    return np.isnan(a.astype(float))
