"""When a plugin measures: schedules parsed once from text and printed back the same way.

Forms: ``every:N`` (also ``every:N:OFFSET``), ``at:0,10,100``, ``log:START:END:COUNT``
(log-spaced integer steps), ``epoch`` (the last step of every epoch), ``time:15m``
(wall-clock interval; units s, m, h), and ``never``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import UsageError

__all__ = ["Schedule", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr|d)?\s*$")
#: a log schedule names at most this many steps (its set is built up front)
_MAX_LOG_COUNT = 100_000
_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"30m"``, ``"1.5h"``, ``"90s"`` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise UsageError(f"bad duration '{text}': use a number with s, m or h, e.g. 30m")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"bad duration '{text}': must be a positive finite number")
    return seconds


@dataclass
class Schedule:
    """A parsed schedule; ``str(schedule)`` gives back its canonical text."""

    kind: str
    every: int = 0
    offset: int = 0
    steps: frozenset[int] = field(default_factory=frozenset)
    seconds: float = 0.0
    text: str = ""
    _last_time: float | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, text: "str | Schedule") -> "Schedule":
        """Parse schedule text; raises ``UsageError`` with the accepted forms."""
        if isinstance(text, Schedule):
            return cls.parse(str(text))
        raw = str(text).strip()
        kind, _, rest = raw.partition(":")
        kind = kind.strip().lower()
        try:
            if kind == "every":
                parts = [int(p) for p in rest.split(":")]
                if not 1 <= len(parts) <= 2 or parts[0] < 1 or (len(parts) == 2 and parts[1] < 0):
                    raise ValueError
                off = parts[1] if len(parts) == 2 else 0
                return cls("every", every=parts[0], offset=off,
                           text=f"every:{parts[0]}" + (f":{off}" if off else ""))
            if kind == "at":
                steps = sorted({int(p) for p in rest.split(",") if p.strip()})
                if not steps or steps[0] < 0:
                    raise ValueError
                return cls("at", steps=frozenset(steps), text="at:" + ",".join(map(str, steps)))
            if kind == "log":
                start, end, count = (int(p) for p in rest.split(":"))
                if start < 0 or end < start or count < 1 or count > _MAX_LOG_COUNT:
                    raise ValueError
                return cls("log", steps=frozenset(_log_steps(start, end, count)),
                           text=f"log:{start}:{end}:{count}")
            if kind == "epoch" and not rest:
                return cls("epoch", text="epoch")
            if kind == "time":
                secs = parse_duration(rest)
                return cls("time", seconds=secs, text=f"time:{_format_duration(secs)}")
            if kind == "never" and not rest:
                return cls("never", text="never")
        except (ValueError, UsageError):
            pass
        raise UsageError(
            f"bad schedule '{raw}': use every:N, at:0,10,100, log:START:END:COUNT (COUNT <= {_MAX_LOG_COUNT}), "
            "epoch, time:15m or never"
        )

    @classmethod
    def every_n(cls, n: int) -> "Schedule":
        return cls.parse(f"every:{n}")

    def __str__(self) -> str:
        return self.text

    def due(self, step: int, *, epoch_end: bool = False, now: float | None = None) -> bool:
        """Whether a measurement is due at ``step`` (0-based count of updates done).

        ``epoch_end`` says the step is the last of its epoch; ``now`` is the wall clock
        (seconds) for ``time:`` schedules, which fire at their first call and then once
        the interval has passed.
        """
        if self.kind == "every":
            return step >= self.offset and (step - self.offset) % self.every == 0
        if self.kind in ("at", "log"):
            return step in self.steps
        if self.kind == "epoch":
            return epoch_end
        if self.kind == "time":
            if now is None:
                return False
            if self._last_time is None or now - self._last_time >= self.seconds:
                self._last_time = now
                return True
            return False
        return False

    @property
    def last_step(self) -> int | None:
        """The last step an ``at``/``log`` schedule names (None for open-ended ones)."""
        return max(self.steps) if self.steps else None


def _log_steps(start: int, end: int, count: int) -> list[int]:
    if count == 1:
        return [start]
    lo = math.log(max(start, 1))
    hi = math.log(max(end, 1))
    steps = {int(round(math.exp(lo + (hi - lo) * i / (count - 1)))) for i in range(count)}
    if start == 0:
        steps.add(0)
    return sorted(s for s in steps if start <= s <= end)


def _format_duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
