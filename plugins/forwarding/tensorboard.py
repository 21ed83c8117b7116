"""`tensorboard`: every group's scalars as TensorBoard events (`pip install 'lscape[tensorboard]'`)."""

from __future__ import annotations

import os

from lscape import Option, UsageError, hookimpl
from ._forwarder import ScalarForwarder, require_writable_folder


class TensorBoard(ScalarForwarder):
    """Writes every scalar the active plugins record (`train/loss`, `sharpness/lambda_max`, ...)
    as TensorBoard scalars, step by step, into the run store's own folder (``RUN.zarr/tensorboard``)
    unless ``log_dir`` says otherwise; `tensorboard --logdir runs` compares every run under ``runs``."""

    name = "tensorboard"
    options = (
        Option("log_dir", str, None, "event folder (default: tensorboard/ inside the run store's folder)"),
        Option("every", int, 1, "send the collected scalars every N steps", minimum=1),
    )

    def check(self, ctx):
        _summary_writer()
        if self.opts.log_dir:
            require_writable_folder(self.opts.log_dir, "tensorboard.log_dir")

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
    """``runs/NAME.zarr/tensorboard`` for ``runs/NAME.zarr``: the events travel with the store (zarr
    ignores a folder without zarr metadata). A URL store's events stay local, in
    ``runs/tensorboard/NAME``."""
    path = str(store_path).removeprefix("file://").rstrip("/")
    if "://" in path:
        return os.path.join("runs", "tensorboard", os.path.basename(path).removesuffix(".zarr"))
    return os.path.join(path, "tensorboard")


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
