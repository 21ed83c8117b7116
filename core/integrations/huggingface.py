"""A ``transformers.TrainerCallback`` that runs lscape's plugins in ``Trainer.train``.

::

    from lscape.integrations.huggingface import LscapeTrainerCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LscapeTrainerCallback(plugins=["grad-norm"], out="runs/hf.zarr")])
    trainer.train()

Built on :func:`lscape.attach`. The Trainer gives callbacks neither the batch nor the loss,
so the callback reads them from the model's forward pass (a forward hook while training:
the keyword inputs are the batch, ``output.loss`` the loss; with gradient accumulation the
step's batch is its last micro-batch and its loss the mean over micro-batches). The loss is
the model's own (``output.loss``) unless ``loss_fn`` is given. Events: ``on_step_start`` and
``on_after_backward`` from ``on_pre_optimizer_step`` (θ_t, gradients after the Trainer's
clipping), ``on_step_end`` from ``on_step_end`` (θ_{t+1}), ``on_epoch_end``, ``on_evaluate``
with the Trainer's evaluation metrics (group ``eval``), and the store is closed at
``on_train_end``. Probes that sample training data take it from the Trainer's training
DataLoader unless ``train_data`` is given, in batches of ``per_device_train_batch_size``
unless ``batch_size`` is given; the run's length (``max_steps``) gives the progress its ETA.
Under DDP every rank measures and rank 0 writes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from lscape.integrations._common import AttachOptions, numeric

__all__ = ["LscapeTrainerCallback"]


class LscapeTrainerCallback(TrainerCallback):
    """lscape's plugins inside ``Trainer.train``; arguments as :func:`lscape.attach`.
    ``session`` is the running :class:`lscape.Session`."""

    def __init__(self, plugins=(), out: str | None = None, **kwargs: Any):
        self.options = AttachOptions(plugins=plugins, out=out, **kwargs)
        self.session = None
        self._handle = None
        self._batch = None
        self._losses: list[torch.Tensor] = []

    # -- reading the batch and loss off the forward pass ----------------------------------

    def _forward_hook(self, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, or a probe's own forward passes
        if self.session is not None and self.session.in_step:
            return  # inside the step's probes
        self._batch = dict(kwargs) if kwargs else (args[0] if len(args) == 1 else tuple(args))
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            self._losses.append(loss.detach())

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        from lscape import attach

        options = dict(self.options.kwargs)
        if options.get("train_data") is None:
            options["train_data"] = train_dataloader
        if options.get("batch_size") is None:
            # the Trainer's loader has a batch sampler, not a batch size: the step's batch is one
            # device's micro-batch (see above), of per_device_train_batch_size samples
            options["batch_size"] = getattr(args, "per_device_train_batch_size", None)
        options.setdefault("total_steps", state.max_steps if state.max_steps and state.max_steps > 0 else None)
        if args.gradient_accumulation_steps == 1 and train_dataloader is not None:
            try:
                options.setdefault("steps_per_epoch", len(train_dataloader))
            except TypeError:
                pass
        self.session = attach(model, optimizer, **options)
        self._handle = model.register_forward_hook(self._forward_hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._losses = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.session is None or self._batch is None:
            return
        loss = torch.stack(self._losses).mean() if self._losses else None
        self.session.after_backward(self._batch, loss)

    def on_step_end(self, args, state, control, **kwargs):
        if self.session is not None and self.session.in_step:
            self.session.step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.session is not None:
            self.session.epoch_end()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.session is not None and metrics:
            values = numeric(metrics)
            if values:
                self.session.evaluate(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.session is not None:
            self.session.close("completed")
