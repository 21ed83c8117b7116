"""Typed plugin options and declared outputs.

An ``Option`` turns text from ``-o PLUGIN.KEY=VALUE`` or a TOML value into its type and
says what is wrong in one line when it cannot. An ``Output`` declares one stored array.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .errors import UsageError, did_you_mean

__all__ = ["Option", "Output", "resolve_options", "parse_value", "parse_key_values"]

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


@dataclass(frozen=True)
class Option:
    """A typed option with a default and help text.

    ``type`` is ``int``, ``float``, ``bool``, ``str`` or a callable that parses a string
    (raising ``ValueError`` on bad input). ``choices`` restricts the values. ``minimum``
    bounds numbers from below. A number that is NaN or infinite is bad input unless
    ``nonfinite`` says the option allows it (e.g. ``inf`` meaning "no limit").
    """

    name: str
    type: Callable[[Any], Any] = str
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None
    minimum: float | None = None
    nonfinite: bool = False

    def parse(self, value: Any, owner: str = "") -> Any:
        """Convert ``value`` (text or a TOML value) to this option's type."""
        where = f"{owner}.{self.name}" if owner else self.name
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, bool):
                    out = value
                elif str(value).strip().lower() in _TRUE:
                    out = True
                elif str(value).strip().lower() in _FALSE:
                    out = False
                else:
                    raise ValueError
            elif self.type is int:
                out = _to_int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            else:
                out = self.type(value)
        except (ValueError, TypeError, OverflowError) as e:
            kind = getattr(self.type, "__name__", "value")
            raise UsageError(f"bad value for {where}: '{value}' is not a valid {kind}") from e
        if isinstance(out, float) and not math.isfinite(out) and not self.nonfinite:
            raise UsageError(f"bad value for {where}: {value!r} is not a finite number")
        if self.choices is not None and out not in self.choices:
            raise UsageError(f"bad value for {where}: '{value}'; choose one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and out < self.minimum:
            raise UsageError(f"bad value for {where}: {out} is below the minimum {self.minimum}")
        return out


@dataclass(frozen=True)
class Output:
    """One stored array: ``name(step, *dims)``."""

    name: str
    dims: tuple[str, ...] = ()
    dtype: str = "float64"
    units: str = ""
    long_name: str = ""
    chunks: tuple[int, ...] | None = field(default=None)


def resolve_options(options: Iterable[Option], given: dict[str, Any], owner: str) -> types.SimpleNamespace:
    """Defaults overlaid with ``given`` (parsed); an unknown key is a ``UsageError``."""
    table = {o.name: o for o in options}
    unknown = sorted(set(given) - set(table))
    if unknown:
        known = ", ".join(sorted(table)) or "none"
        raise UsageError(f"unknown option '{owner}.{unknown[0]}'{did_you_mean(unknown[0], table)} "
                         f"(options of {owner}: {known})")
    values = {name: opt.default for name, opt in table.items()}
    for key, value in given.items():
        values[key] = table[key].parse(value, owner)
    return types.SimpleNamespace(**values)


def parse_value(text: str) -> Any:
    """Best-effort typing of a free-form ``key=value`` value: int, float, bool, or str."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_key_values(items: Iterable[str], what: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; a malformed item is a ``UsageError``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad {what} '{item}': expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    f = float(value)
    if not f.is_integer():
        raise ValueError
    return int(f)
