"""A Lightning ``Callback`` that runs lscape's plugins in ``Trainer.fit``: ``LscapeCallback``.

::

    from lscape.integrations.lightning import LscapeCallback
    trainer = lightning.Trainer(max_epochs=3, callbacks=[LscapeCallback(plugins=["grad-norm", "sharpness"],
                                                                        loss_fn=F.cross_entropy, out="runs/pl.zarr")])
    trainer.fit(module, train_loader)

Built on :func:`lscape.attach`: the session starts at ``on_train_start`` with the
LightningModule, the trainer's first optimizer and its training DataLoader (the data probes
sample beyond the current batch), fires ``on_step_start``/``on_after_backward`` from
``on_before_optimizer_step`` (after backward, gradient clipping not yet applied, θ_t),
``on_step_end`` from ``on_train_batch_end`` (θ_{t+1}), ``on_epoch_end`` at the epoch's end,
``on_evaluate`` with the trainer's validation metrics, and closes the store at
``on_train_end`` (``failed`` on an exception, ``interrupted`` on Ctrl-C). Probes that need
the loss as a function of the batch use ``loss_fn(module(x), y)`` (or ``adapter``); with
gradient accumulation a step is one optimizer step and its batch the last micro-batch.
Under a multi-GPU strategy every rank measures and rank 0 writes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lscape.integrations._common import AttachOptions, numeric

__all__ = ["LscapeCallback"]


class LscapeCallback(pl.Callback):
    """lscape's plugins inside ``Trainer.fit``; arguments as :func:`lscape.attach` (``plugins``,
    ``out``, ``plugin_options``, ``loss_fn``, ``adapter``, ``train_data``, ``eval_data``,
    ``seed``, ``progress``, ...). ``session`` is the running :class:`lscape.Session`."""

    def __init__(self, plugins=(), out: str | None = None, **kwargs: Any):
        super().__init__()
        self.options = AttachOptions(plugins=plugins, out=out, **kwargs)
        self.session = None
        self._batch = None
        self._loss = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from lscape import attach

        kwargs = dict(self.options.kwargs)
        if kwargs.get("train_data") is None:
            kwargs["train_data"] = trainer.train_dataloader
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            try:
                total = int(trainer.estimated_stepping_batches)
            except (TypeError, ValueError, OverflowError):
                total = None
        kwargs.setdefault("total_steps", total)
        batches = trainer.num_training_batches
        if isinstance(batches, int) and trainer.accumulate_grad_batches == 1:
            kwargs.setdefault("steps_per_epoch", batches)
        self.session = attach(pl_module, optimizer, **kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._loss = loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        session = self.session
        # a closure optimizer (lscape.optim.SAM) runs the closure more than once per step:
        # the step's probes run at its first call, at θ_t
        if session is not None and not session.in_step:
            session.after_backward(self._batch, self._loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.session is not None and self.session.in_step:
            self.session.step_end()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.session is not None:
            self.session.epoch_end()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.session is None or trainer.sanity_checking:
            return
        metrics = numeric(trainer.callback_metrics)
        if metrics:
            self.session.evaluate(metrics)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.session is not None:
            self.session.close("completed")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.session is not None:
            self.session.__exit__(type(exception), exception, exception.__traceback__)
