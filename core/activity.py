"""What the run is doing right now, for displays: which probe is measuring, and how far it is.

Long computations report their units of work here (``tick()``: a Hessian-vector product, a
grid point); a display (the ``progress`` plugin) listens with ``listen()``. With no listener
a report costs one list check, so the curvature toolkit can report every product.

>>> with activity.doing("hessian"):      # the engine side: a probe measures
...     activity.tick(1, total=40)        # the work side: one unit of 40 done

A stop (``stop()``: the run's first Ctrl-C/SIGTERM) abandons the work in progress: from then
on ``tick()`` inside an activity raises :class:`Stopped`, so a long measurement ends within
one unit of work instead of running to its end (work that reports no units runs to its end).
The probe whose measurement is abandoned records nothing for that step (``Probe.run_measure``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

__all__ = ["Activity", "Stopped", "doing", "tick", "listen", "current", "stop", "stopping", "resume"]


@dataclass
class Activity:
    """One thing being done: its name, units done, units expected (None: unknown), start."""

    name: str
    done: int = 0
    total: int | None = None
    unit: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        """``hessian: 35/80 HVPs, 4.1 s``."""
        count = ""
        if self.done or self.total:
            count = f" {self.done}/{self.total}" if self.total else f" {self.done}"
            count += f" {self.unit}" if self.unit else ""
            count += ","
        return f"{self.name}:{count} {self.elapsed:.1f} s"


class Stopped(BaseException):
    """The run is stopping (``stop()``): the activity in progress is abandoned. A
    ``BaseException``, so that code catching ``Exception`` around its work lets it through."""


_stack: list[Activity] = []
_listeners: list[Callable[[Activity | None], None]] = []
_stopping = False


def stop() -> None:
    """Abandon the activity in progress and every later one (safe in a signal handler)."""
    global _stopping
    _stopping = True


def stopping() -> bool:
    """Whether ``stop()`` was called (and not ``resume()`` since)."""
    return _stopping


def resume() -> None:
    """Activities run to their end again (a new run in the same process)."""
    global _stopping
    _stopping = False


def current() -> Activity | None:
    """The innermost activity, or None."""
    return _stack[-1] if _stack else None


@contextlib.contextmanager
def doing(name: str, total: int | None = None, unit: str = "") -> Iterator[Activity]:
    """Within the block, ``name`` is what the run is doing."""
    act = Activity(name, total=total, unit=unit)
    _stack.append(act)
    _notify(act)
    try:
        yield act
    finally:
        _stack.remove(act)
        _notify(current())


def tick(n: int = 1, total: int | None = None, unit: str | None = None) -> None:
    """``n`` more units of the current activity are done (``total``/``unit`` update it);
    raises ``Stopped`` when the run is stopping."""
    if not _stack:
        return
    if _stopping:
        raise Stopped(_stack[-1].name)
    act = _stack[-1]
    act.done += n
    if total is not None:
        act.total = total
    if unit is not None and not act.unit:
        act.unit = unit
    if _listeners:
        _notify(act)


def listen(callback: Callable[[Activity | None], None]) -> Callable[[], None]:
    """Call ``callback(activity)`` on every change (None: idle again); returns the function
    that stops it."""
    _listeners.append(callback)

    def stop() -> None:
        if callback in _listeners:
            _listeners.remove(callback)

    return stop


def _notify(act: Activity | None) -> None:
    for callback in list(_listeners):
        callback(act)
