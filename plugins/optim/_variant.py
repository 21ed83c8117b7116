"""The shared shape of the optimizer-variant step owners (``sam``, ``smoothout``, ``entropy-sgd``).

A step owner builds its ``lscape.optim`` variant around the run's base optimizer
(``ctx.optimizer``), steps it, and records the variant's ``stats`` on its schedule; the
variant's counters travel in the plugin's checkpoint state as ``{"variant": {...}}``.
"""

from __future__ import annotations

from typing import Any

from lscape import Option, StepOwner
from lscape.schedule import Schedule

__all__ = ["VariantStep"]


class VariantStep(StepOwner):
    """A step owner that wraps ``ctx.optimizer`` in a variant and records its ``stats``.

    Subclasses give ``name``, ``help``, ``options``, ``outputs`` and ``build(ctx)`` (the
    variant around ``ctx.optimizer``); ``step`` and ``row`` are overridden only when the
    step needs more than ``self.optim.step(closure)`` or the row more than ``stats``.
    """

    stats_schedule = "every:10"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.schedule = Schedule.parse(self.opts.stats)
        self.optim = None
        self._pending_state: dict[str, Any] | None = None

    @classmethod
    def all_options(cls):
        own = tuple(cls.options)
        extra = () if any(o.name == "stats" for o in own) else (
            Option("stats", str, cls.stats_schedule, "when the variant's statistics are recorded (never: not at all)"),)
        return own + extra

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["schedule"] = str(self.schedule)
        return attrs

    def setup(self, ctx) -> None:
        self.optim = self.build(ctx)
        if self._pending_state is not None:
            self.optim.variant_state.update(self._pending_state)

    def build(self, ctx):  # pragma: no cover - every subclass overrides it
        """The variant around ``ctx.optimizer``."""
        raise NotImplementedError

    def step(self, closure, ctx, state):
        """One step of the variant; its statistics recorded when due. Returns the loss at θ."""
        due = self.before_step(state)
        loss = self.optim.step(closure)
        self.after_step(ctx, state, due)
        return loss

    def before_step(self, state) -> bool:
        """Whether this step's statistics are recorded (asked once: time schedules keep state)."""
        due = self.schedule.due(state.step, epoch_end=state.epoch_end, now=state.time)
        if hasattr(self.optim, "track_stats"):
            self.optim.track_stats = due  # statistics cost extra passes: only when recorded
        return due

    def after_step(self, ctx, state, due: bool) -> None:
        """Record the variant's statistics if this step is due."""
        if due and self.optim.stats:
            self.record(ctx, state.step, **self.row(ctx, state))

    def row(self, ctx, state) -> dict[str, float]:
        """The values recorded for this step."""
        return dict(self.optim.stats)

    def state_dict(self) -> dict[str, Any]:
        return {"variant": dict(self.optim.variant_state)} if self.optim is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        variant = state.get("variant")
        if variant is None:
            return
        if self.optim is None:
            self._pending_state = dict(variant)
        else:
            self.optim.variant_state.update(variant)
