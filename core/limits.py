"""Limits refused up front: what a plugin's ``check()`` calls so that a setup too big for the
machine is one line naming the option, before the store exists, not an out-of-memory kill an
hour in; and the log line that says how long a probe's measurements will take.

    from lscape.limits import require_memory, require_at_most
    require_memory(n * n * 8, "the dense Hessian", "hessian-exact.params (or a smaller model)", ctx.device)
    require_at_most(self.opts.k, n, "hessian.k", "the number of parameters")
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .errors import UsageError

__all__ = ["available_memory", "require_memory", "require_at_most", "human_bytes", "parse_size", "sample_bytes",
           "ProbeTimer", "ProbeBudget"]

#: share of the available memory one allocation may claim before it is refused
MEMORY_FRACTION = 0.8


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (free memory on a CUDA device,
    MemAvailable on Linux, free physical pages elsewhere); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver, a device index that does not exist
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: float, what: str, option: str, device: Any = "cpu", *,
                   available: int | None = None) -> None:
    """Refuse (``UsageError``, one line naming ``option``) when ``what`` needs more than
    ``MEMORY_FRACTION`` of the memory ``device`` has available. Unknown availability passes."""
    free = available_memory(device) if available is None else available
    if free is None or nbytes <= MEMORY_FRACTION * free:
        return
    raise UsageError(f"{what} needs about {human_bytes(nbytes)} but {torch.device(device).type} has "
                     f"{human_bytes(free)} available; lower {option}")


def sample_bytes(dataset: Any) -> int:
    """Bytes of one sample of a map-style ``dataset`` (its tensors and arrays); 0 when it cannot
    be told (an iterable data set, or samples that are not tensors)."""
    try:
        sample = dataset[0]
    except Exception:
        return 0

    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if hasattr(x, "nbytes"):
            return int(x.nbytes)
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (tuple, list)):
            return sum(size(v) for v in x)
        return 8 if isinstance(x, (int, float)) else 0

    return size(sample)


def require_at_most(value: float, limit: float, option: str, what: str) -> None:
    """Refuse ``option = value`` when it exceeds ``limit`` (``what`` says what the limit is)."""
    if value > limit:
        raise UsageError(f"bad value for {option}: {value} is more than {what} ({limit})")


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style text."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from ``2GB`` (10⁹), ``2GiB`` or ``2G`` (2³⁰), ``512MB``, ``1.5MiB``, ``4096`` or a
    number; ``ValueError`` for anything else (negative sizes included)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        number, unit = float(digits), text[len(digits):]
    if unit not in _UNITS or not number >= 0 or number == float("inf"):
        raise ValueError(value)
    return int(number * _UNITS[unit])


class ProbeTimer:
    """Says how long a probe will take: at its first product, what one measurement will cost
    (:meth:`cost`, always, once per probe); after its first measurement, that measurement's
    time times the measurements its schedule still has in the run, logged once when it is
    long (over ``threshold`` seconds)."""

    def __init__(self, threshold: float = 60.0):
        self.threshold = threshold
        self.done: set[str] = set()
        self.costed: set[str] = set()

    def announced(self, name: str) -> bool:
        """Whether :meth:`cost` has spoken for the probe ``name``."""
        return name in self.costed

    def cost(self, name: str, planned: dict[str, int] | None, seconds_per_product: float,
             setup: float | None = None) -> str:
        """Log (to stderr) and return, once per probe, the products one measurement of ``name``
        spends at most (``planned``: by part; None when not known ahead) and the time that
        takes: ``setup`` seconds for the first product (which builds what later ones reuse)
        and ``seconds_per_product`` for each further one (measured on the first products)."""
        self.costed.add(name)
        per = _duration_precise(seconds_per_product)
        first = f" after a first of {_duration_precise(setup)} (setup)" if setup is not None else ""
        if planned:
            total = sum(planned.values())
            seconds = total * seconds_per_product if setup is None else setup + (total - 1) * seconds_per_product
            parts = ", ".join(f"{part} ≤{n}" for part, n in planned.items() if n) if len(planned) > 1 else ""
            line = (f"[lscape] {name}: ~{total} products per measurement at most"
                    f"{' (' + parts + ')' if parts else ''} (~{_duration_precise(seconds)} at this model size, "
                    f"measured on the first products: {per} each{first})")
        else:
            line = (f"[lscape] {name}: ~{per} per product at this model size (measured on the first product"
                    f"{first})")
        print(line, file=sys.stderr)
        return line

    def first(self, probe: Any, ctx: Any, step: int, seconds: float) -> str | None:
        """Log (to stderr) and return the estimate after ``probe``'s first measurement, or None."""
        if probe.name in self.done:
            return None
        self.done.add(probe.name)
        remaining = _remaining(getattr(probe, "schedule", None), step, getattr(ctx, "total_steps", None),
                               getattr(ctx, "steps_per_epoch", None))
        if remaining is None:
            return None
        estimate = seconds * remaining
        if estimate < self.threshold:
            return None
        line = (f"[lscape] {probe.name}: the first measurement took {seconds:.1f}s; {remaining} more are scheduled, "
                f"about {_duration(estimate)} in all (its schedule or options make it cheaper)")
        print(line, file=sys.stderr)
        return line


def _remaining(schedule: Any, step: int, total: int | None, per_epoch: int | None) -> int | None:
    """Measurements a schedule still has after ``step`` in a run of ``total`` steps; None
    when it cannot be counted ahead (no length, wall-clock schedules, which keep state)."""
    kind = getattr(schedule, "kind", None)
    if not total:
        return None
    if kind == "every":
        first = max(step + 1, schedule.offset)
        if first >= total:
            return 0
        k0 = -(-(first - schedule.offset) // schedule.every)
        return max(0, (total - 1 - schedule.offset) // schedule.every - k0 + 1)
    if kind in ("at", "log"):
        return sum(1 for s in schedule.steps if step < s < total)
    if kind == "epoch" and per_epoch:
        return max(0, total // per_epoch - (step + 1) // per_epoch)
    return None


def _duration_precise(seconds: float) -> str:
    """A duration with sensible precision, short ones included (0.012 s, 3.4 s, 12 min)."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    return _duration(seconds).replace("s", " s") if seconds < 120 else _duration(seconds)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProbeBudget:
    """A run-level budget for probes (``--probe-budget F``): the share of training wall time
    that scheduled measurements may take.

    The engine times each step (:meth:`add_step`, probes included) and :meth:`Probe.run_measure`
    times each measurement (:meth:`charge`); training time is step time less the probe time
    spent inside steps. A scheduled firing is allowed when the probe time so far plus the
    probe's mean measured cost stays within ``F`` × the training time so far (a probe's first
    firing is always allowed: its cost is not known yet, so a run too short to pay for one
    measurement ends over budget, by what ``probe_overhead`` says); otherwise it is skipped
    and counted (:attr:`skipped`), so an expensive probe's measurements are spaced out as
    training time accumulates. The realised overhead, probe time / training time, is :attr:`overhead`.
    :meth:`state_dict`/:meth:`load_state_dict` carry it across checkpoints (``--resume``)."""

    def __init__(self, fraction: float):
        self.fraction = float(fraction)
        self.probe_seconds = 0.0  # every measurement's time
        self.step_seconds = 0.0  # every step's time, the probes inside it included
        self.inside_seconds = 0.0  # measurement time inside steps
        self.spent: dict[str, float] = {}  # each probe's measurement time, in all
        self.first: dict[str, float] = {}  # and its first measurement's
        self.fired: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self._in_step = False

    @property
    def train_seconds(self) -> float:
        return max(self.step_seconds - self.inside_seconds, 0.0)

    @property
    def overhead(self) -> float:
        """Probe time / training time so far (NaN before any training time)."""
        train = self.train_seconds
        return self.probe_seconds / train if train > 0 else float("nan")

    def allows(self, name: str) -> bool:
        """Whether the probe ``name`` may measure now (counted as skipped when not)."""
        if name not in self.fired:
            return True
        cost = self.cost(name)
        if self.probe_seconds + cost <= self.fraction * self.train_seconds:
            return True
        self.skipped[name] = self.skipped.get(name, 0) + 1
        return False

    def cost(self, name: str) -> float:
        """The expected time of ``name``'s next measurement: the mean of its measurements after
        the first (which also pays one-time setup: the measurement subset, the product method's
        check), or the first while there is no other. A mean, not the last: a tracked
        ``sharpness`` alternates cheap tracked measurements and a cold solve every N-th."""
        fired = self.fired.get(name, 0)
        if fired >= 2:
            return (self.spent[name] - self.first[name]) / (fired - 1)
        return self.spent.get(name, 0.0)

    def charge(self, name: str, seconds: float) -> None:
        """A measurement of ``name`` took ``seconds``."""
        self.probe_seconds += seconds
        if self._in_step:
            self.inside_seconds += seconds
        self.spent[name] = self.spent.get(name, 0.0) + seconds
        self.first.setdefault(name, seconds)
        self.fired[name] = self.fired.get(name, 0) + 1

    def begin_step(self) -> None:
        self._in_step = True

    def add_step(self, seconds: float) -> None:
        """A training step took ``seconds`` of wall time (its measurements included)."""
        self._in_step = False
        self.step_seconds += seconds

    def attrs(self) -> dict[str, Any]:
        """What the store's root attributes record (``probe_overhead`` and the counts)."""
        overhead = self.overhead
        return {"probe_budget": self.fraction, "probe_overhead": None if overhead != overhead else overhead,
                "probe_seconds": self.probe_seconds, "train_seconds": self.train_seconds,
                "probe_fired": dict(self.fired), "probe_skipped": dict(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"probe_seconds": self.probe_seconds, "step_seconds": self.step_seconds,
                "inside_seconds": self.inside_seconds, "spent": dict(self.spent), "first": dict(self.first),
                "fired": dict(self.fired),
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
        self.step_seconds = float(state.get("step_seconds", 0.0))
        self.inside_seconds = float(state.get("inside_seconds", 0.0))
        self.spent = {str(k): float(v) for k, v in (state.get("spent") or {}).items()}
        self.first = {str(k): float(v) for k, v in (state.get("first") or {}).items()}
        self.fired = {str(k): int(v) for k, v in (state.get("fired") or {}).items()}
        self.skipped = {str(k): int(v) for k, v in (state.get("skipped") or {}).items()}
