"""Forwarding every group's scalars to an experiment tracker, the base of the `tensorboard` and
`wandb` plugins.

``ScalarForwarder`` is an ordinary plugin on the public hooks: at ``on_run_start`` it wraps the
run store's ``group()`` (before any other plugin opens a writer), so that every row a plugin
records is also collected; after each step (``trylast``, when the step's probes have
recorded) the scalar values of the collected rows go to ``write(step, scalars)`` as
``{"GROUP/ARRAY": value}``. Vectors and non-finite values (a sparse ``eval_loss`` between
evaluations) are left out; the run store stays the record, the tracker a view of it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lscape import Plugin, hookimpl
from lscape.errors import UsageError

__all__ = ["ScalarForwarder", "scalar", "require_writable_folder"]


def scalar(value: Any) -> float | None:
    """``value`` as a finite float if it is a number or a one-element tensor/array, else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        size = getattr(value, "numel", None)
        size = size() if callable(size) else getattr(value, "size", None)
        if size != 1:
            return None
        try:
            out = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            return None
    return out if math.isfinite(out) else None


class ScalarForwarder(Plugin):
    """Collects the scalars every plugin records and hands them to ``write()`` once per step."""

    #: forward at most once every this many steps (rows in between are kept and sent together)
    every_option = "every"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._pending: list[tuple[int, str, dict[str, Any]]] = []
        self._store = None
        self._wrapped_group = None
        self._last_sent = -1

    # -- subclasses ------------------------------------------------------------------------

    def open(self, ctx) -> None:
        """Start the tracker (the store exists, the model is built)."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Send the scalars of one step, tagged ``GROUP/ARRAY``."""
        raise NotImplementedError

    def close(self, ctx, status: str) -> None:
        """Flush and stop the tracker."""

    # -- hooks -----------------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def on_run_start(self, ctx):
        if ctx.store is None or not ctx.is_main:
            return
        store, original = ctx.store, ctx.store.group
        pending = self._pending
        wrapped: set[int] = set()  # writers whose append this forwarder already sees

        def group(name, *args, **kwargs):
            writer = original(name, *args, **kwargs)
            if id(writer) not in wrapped:
                append = writer.append

                def forwarding_append(step, **values):
                    append(step, **values)
                    pending.append((int(step), name, values))

                writer.append = forwarding_append
                wrapped.add(id(writer))
            return writer

        store.group = group
        self._store, self._wrapped_group = store, original
        self.open(ctx)

    @hookimpl(trylast=True)
    def on_step_end(self, ctx, state):
        if self._store is not None and (state.step + 1) % max(1, int(self.opts.every)) == 0:
            self._send()

    @hookimpl(trylast=True)
    def on_run_end(self, ctx, status):
        if self._store is None:
            return
        self._send()
        self._store.group = self._wrapped_group
        self._store = None
        self.close(ctx, status)

    def _send(self) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for step, group, values in self._pending:
            for name, value in values.items():
                number = scalar(value)
                if number is not None:
                    by_step.setdefault(step, {})[f"{group}/{name}"] = number
        self._pending.clear()
        for step in sorted(by_step):
            self.write(step, by_step[step])
            self._last_sent = step


def require_writable_folder(path: str, option: str) -> None:
    """Refuse, before the store exists, a folder a tracker could not write into: a file in its
    place, a parent that is a file, or no write permission where it would be created."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a file, not a folder")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{option}: cannot create {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: cannot write into {probe} (permission denied)")
