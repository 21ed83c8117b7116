"""`tensorboard`: every group's scalars as TensorBoard events (`pip install 'lscape[tensorboard]'`)."""

from __future__ import annotations

import os

from lscape import Option, UsageError, hookimpl
from ._forwarder import ScalarForwarder


class TensorBoard(ScalarForwarder):
    """Writes every scalar the active plugins record (`train/loss`, `sharpness/lambda_max`, ...)
    as TensorBoard scalars, step by step; `tensorboard --logdir runs/tensorboard` compares runs."""

    name = "tensorboard"
    options = (
        Option("log_dir", str, None, "event folder (default: tensorboard/RUN next to the run store)"),
        Option("every", int, 1, "send the collected scalars every N steps", minimum=1),
    )

    def check(self, ctx):
        _summary_writer()

    def open(self, ctx):
        log_dir = self.opts.log_dir or default_log_dir(ctx.store.path)
        # a resumed run replays the steps after its checkpoint: drop the events TensorBoard
        # already has from there on, so the curves do not double back
        start = resumed_step(ctx)
        self._writer = _summary_writer()(log_dir=log_dir, purge_step=start)
        self.log_dir = log_dir

    def write(self, step, scalars):
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self, ctx, status):
        self._writer.add_text("lscape/status", status)
        self._writer.flush()
        self._writer.close()


def default_log_dir(store_path: str) -> str:
    """``runs/tensorboard/NAME`` for ``runs/NAME.zarr``: one folder holds all runs' events."""
    path = str(store_path).removeprefix("file://").rstrip("/")
    if "://" in path:  # a URL store: events stay local
        return os.path.join("runs", "tensorboard", os.path.basename(path).removesuffix(".zarr"))
    return os.path.join(os.path.dirname(path) or ".", "tensorboard", os.path.basename(path).removesuffix(".zarr"))


def resumed_step(ctx) -> int | None:
    """The step a resumed run continues from (its latest checkpoint), else None."""
    if not ctx.config.resume:
        return None
    from lscape.display import latest_checkpoint

    ckpt = latest_checkpoint(ctx.store)
    return int(ckpt["step"]) if ckpt and ckpt.get("step") is not None else None


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("the tensorboard plugin needs TensorBoard: pip install 'lscape[tensorboard]'") from None
    return SummaryWriter


@hookimpl
def register_plugins(register):
    register(TensorBoard)
