"""The pieces of a training step the engine composes: the precision (autocast, GradScaler),
the learning-rate schedule and ``--regime``, the NaN check, and the ``--until-loss`` stop."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .batch import batch_size_of
from .config import RunConfig, parse_step_schedule
from .context import RunContext
from .data import derived_seed, fixed_subset

__all__ = ["Precision", "UntilLoss", "UNTIL_LOSS_SAMPLES", "set_lr", "apply_regime", "finite", "NULL_CONTEXT",
           "never_negative"]

#: samples of the fixed training subset that ``--until-loss`` evaluates
UNTIL_LOSS_SAMPLES = 1024

#: a context manager that does nothing (made once: the per-step path enters it often)
NULL_CONTEXT = contextlib.nullcontext()


def finite(value: Any) -> bool:
    """Whether a loss (float or tensor) is finite; a host sync for a device tensor."""
    return math.isfinite(float(value))


class Precision:
    """Training precision: ``fp32``, or autocast to ``bf16``/``fp16`` (fp16 with a GradScaler,
    whose state is checkpointed). Probes run outside it, in the parameters' dtype. A sharded
    model (``--strategy fsdp``) gets no autocast: its FSDP policy computes in bf16."""

    def __init__(self, name: str, device: torch.device, sharded: bool = False):
        self.name = name
        self.device = device
        # a sharded model computes in its FSDP mixed-precision policy's dtype (lscape.sharding), not under autocast
        self.dtype = None if sharded else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> Any:
        if self.dtype is None:
            return NULL_CONTEXT
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def set_lr(cfg: RunConfig, optimizer: torch.optim.Optimizer, step: int, epoch: int, total_steps: int | None) -> float:
    """Set ``--lr-schedule``'s learning rate for ``step`` of ``epoch`` on every parameter
    group (``constant`` leaves the groups alone); returns it."""
    kind = cfg.lr_schedule.split(":", 1)[0]
    if kind == "constant":
        return float(optimizer.param_groups[0]["lr"])
    if kind == "step":
        milestones, gamma = parse_step_schedule(cfg.lr_schedule)
        lr = cfg.lr * gamma ** sum(epoch >= m for m in milestones)
    else:  # cosine over the whole run
        total = max(1, total_steps or 1)
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, total) / total))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def apply_regime(regime: dict[str, dict[str, Any]] | None, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """``--regime`` at the start of ``epoch``: every entry with key <= epoch applies, in
    order; settings are sticky."""
    if not regime:
        return
    for key, settings in regime.items():
        if int(key) <= epoch:
            for group in optimizer.param_groups:
                for name, value in settings.items():
                    if name in group:
                        group[name] = value


class UntilLoss:
    """``--until-loss``: the training loss on a fixed subset (``UNTIL_LOSS_SAMPLES`` samples,
    eval mode, no gradients), recorded in group ``until-loss``."""

    def __init__(self) -> None:
        self.batches: list[Any] | None = None  # drawn at the first check
        #: the last check: ``(step, loss)``; whether the target was reached
        self.last: tuple[int, float] | None = None
        self.hit = False

    def reached(self, ctx: RunContext, step: int) -> bool:
        """The check after ``step``: True once the loss is at or below the target (the
        reason goes into the root attributes)."""
        cfg = ctx.config
        if self.batches is None:
            size = int(cfg.micro_batch_size or max(ctx.batch_size, 256))
            self.batches = fixed_subset(ctx.train_set, UNTIL_LOSS_SAMPLES, size, derived_seed(cfg.seed, "until-loss"),
                                        ctx.device)
        modes = [(m, m.training) for m in ctx.model.modules()]
        ctx.model.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self.batches:
                    k = batch_size_of(batch)
                    total += float(ctx.adapter.loss(ctx.model, batch)) * k
                    n += k
        finally:
            for m, training in modes:
                m.training = training
        loss = total / max(n, 1)
        self.last = (step, loss)
        if ctx.store is not None:
            ctx.store.group("until-loss").append(step, loss=loss)
        if loss > cfg.until_loss:
            return False
        self.hit = True
        if ctx.store is not None:
            ctx.store.update_attrs(stopped_by={"until_loss": cfg.until_loss, "loss": loss, "step": step, "samples": n},
                                   until_loss_reached=True)
        return True

    def capped(self, ctx: RunContext, step: int, cap: str) -> str | None:
        """The run ended by its ``cap`` (``--steps 500``, ...) after ``step``: check the loss
        there once more; when the target is still not reached, record that the cap came first
        (root attributes ``until_loss_reached`` false and ``stopped_by`` with ``cap``) and
        return the line that says so (None: reached after all)."""
        cfg = ctx.config
        if self.last is None or self.last[0] != step:
            if self.reached(ctx, step):
                return None
        at, loss = self.last if self.last is not None else (step, float("nan"))
        if ctx.store is not None:
            ctx.store.update_attrs(stopped_by={"cap": cap, "until_loss": cfg.until_loss, "loss": loss, "step": at},
                                   until_loss_reached=False)
        return (f"the cap ({cap}) came before --until-loss {cfg.until_loss:g}: the loss was {loss:.4g} at step {at}; "
                "raise the cap (--steps/--epochs/--time-limit) to reach the target")


#: torch losses whose value is never below zero (a target below it is never reached)
_NON_NEGATIVE = ("CrossEntropyLoss", "NLLLoss", "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss",
                 "BCEWithLogitsLoss", "KLDivLoss", "MultiMarginLoss", "HingeEmbeddingLoss")


def never_negative(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is a loss known never to be negative: lscape's ce and mse, torch's
    usual losses. A user's own loss may be anything (a negative log-density can be < 0)."""
    if loss_fn is None:
        return False
    if getattr(loss_fn, "ce_like", None) is not None:
        return True
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return type(loss_fn).__name__ in _NON_NEGATIVE or name in ("ce", "mse", "cross_entropy", "mse_loss")
