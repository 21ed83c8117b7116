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

__all__ = ["Option", "Output", "Flag", "Spelling", "CLI", "PYTHON", "in_file", "resolve_options", "parse_value", "parse_key_values"]

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


@dataclass(frozen=True)
class Spelling:
    """Where a value was given, so that an error names the option in the caller's words:
    ``--momentum`` on the command line, ``momentum=`` in Python, ``exp.toml: 'momentum'``
    in a file (a TOML file or a run store's recorded configuration)."""

    kind: str  # "flag", "keyword" or "key"
    file: str = ""


#: the command line, the Python API
CLI, PYTHON = Spelling("flag"), Spelling("keyword")


def in_file(path: Any) -> Spelling:
    """The spelling of keys in the file ``path``."""
    return Spelling("key", str(path))


@dataclass(frozen=True)
class Flag:
    """How a run option appears on the command line (see ``lscape.cli``): its flag (by
    default ``--`` and the name with dashes), whether it is repeatable,
    and ``convert`` turning the repeated values (a tuple of text) into the option's value."""

    name: str | None = None
    metavar: str | None = None
    is_flag: bool = False
    multiple: bool = False
    convert: Callable[[tuple[str, ...]], Any] | None = None
    #: what the default is where it depends on other options (shown in --help)
    default_text: str | None = None


@dataclass(frozen=True)
class Option:
    """A typed option with a default and help text.

    ``type`` is ``int``, ``float``, ``bool``, ``str`` or a callable that parses a value
    (raising ``ValueError`` or ``TypeError`` on bad input). ``choices`` restricts the
    values. ``minimum`` bounds numbers from below; ``within`` is an interval such as
    ``"[0, 1)"`` for both bounds. A number that is NaN or infinite is bad input unless
    ``nonfinite`` says the option allows it (e.g. ``inf`` meaning "no limit").

    Run options (``lscape.config.RunConfig``) also have a command-line ``cli`` form
    (``None``: none) and ``what``, the words for a good value in an error message
    (``--steps must be a positive integer, got '0'``); a value of the wrong kind is named
    by the ``what`` attribute of the ``type`` function when it has one ("a number").
    """

    name: str
    type: Callable[[Any], Any] = str
    default: Any = None
    help: str = ""
    choices: Sequence[Any] | None = None
    minimum: float | None = None
    nonfinite: bool = False
    within: str | None = None
    what: str = ""
    cli: Flag | None = field(default_factory=Flag, compare=False)

    def spelled(self, source: Spelling) -> str:
        """This option's name as the caller wrote it."""
        if source.kind == "flag":
            return self.flag
        if source.kind == "keyword":
            return f"{self.name}="
        return f"{source.file}: '{self.name}'" if source.file else f"'{self.name}'"

    @property
    def flag(self) -> str:
        """The command-line flag (``--batch-size`` for ``batch_size``)."""
        return (self.cli and self.cli.name) or "--" + self.name.replace("_", "-")

    def convert(self, value: Any, source: Spelling = PYTHON) -> Any:
        """``value`` as this option's type (no range check), or a one-line ``UsageError``
        naming the option as ``source`` spells it."""
        if value is None:
            return None
        try:
            return self._convert(value)
        except UsageError as e:  # a parser's own message (a duration, a schedule)
            raise UsageError(f"{self.spelled(source).removesuffix('=')}: {e}") from None
        except (ValueError, TypeError, OverflowError) as e:
            raise UsageError(self._bad(value, e, source)) from None

    def check(self, value: Any, source: Spelling = PYTHON) -> Any:
        """``value`` converted and checked against choices and bounds: the value to use."""
        out = self.convert(value, source)
        if out is None:
            return None
        if self._problem(out) is not None:
            raise UsageError(self._bad(value, None, source))
        return out

    def parse(self, value: Any, owner: str = "") -> Any:
        """Convert ``value`` (text or a TOML value) of a plugin option ``owner.NAME``."""
        where = f"{owner}.{self.name}" if owner else self.name
        if value is None:
            return None
        try:
            out = self._convert(value)
        except (ValueError, TypeError, OverflowError) as e:
            kind = getattr(self.type, "__name__", "value")
            raise UsageError(f"bad value for {where}: '{value}' is not a valid {kind}") from e
        problem = self._problem(out)
        if problem == "nonfinite":
            raise UsageError(f"bad value for {where}: {value!r} is not a finite number")
        if problem == "choices":
            raise UsageError(f"bad value for {where}: '{value}'; choose one of {', '.join(map(str, self.choices))}")
        if problem is not None and self.within is not None:
            raise UsageError(f"bad value for {where}: {out} is outside {self.within}")
        if problem is not None:
            raise UsageError(f"bad value for {where}: {out} is below the minimum {self.minimum}")
        return out

    def _convert(self, value: Any) -> Any:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in _TRUE:
                return True
            if str(value).strip().lower() in _FALSE:
                return False
            raise ValueError(value)
        if self.type is int:
            return to_int(value)
        if self.type is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return self.type(value)

    def _problem(self, out: Any) -> str | None:
        """What is wrong with a converted value: nonfinite, choices, bounds or nothing."""
        if isinstance(out, float) and not math.isfinite(out) and not self.nonfinite:
            return "nonfinite"
        if self.choices is not None and out not in self.choices:
            return "choices"
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            if self.minimum is not None and out < self.minimum:
                return "bounds"
            if self.within is not None and not _inside(out, self.within):
                return "bounds"
        return None

    def _bad(self, value: Any, error: Exception | None, source: Spelling) -> str:
        """The one line for a bad run-option value. A parser's ``ValueError`` may carry its
        own message, with ``{option}`` where the option's name goes."""
        text = str(error.args[0]) if error is not None and error.args and isinstance(error.args[0], str) else ""
        if "{option}" in text:
            return text.replace("{option}", self.spelled(source))
        if error is not None and getattr(self.type, "what", None):  # a value of the wrong kind
            what = self.type.what
        elif self.what:
            what = self.what
        elif self.choices is not None:
            what = "one of " + ", ".join(map(str, self.choices))
        elif self.within is not None:
            what = f"in {self.within}"
        else:
            what = f"a valid {getattr(self.type, '__name__', 'value')}"
        shown = repr(value) if not isinstance(value, str) else f"'{value}'"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return f"{self.spelled(source)} must be {what}, got {shown}"


def _inside(x: float, interval: str) -> bool:
    """Whether ``x`` lies in ``interval``, written ``[lo, hi)`` (``inf`` and ``2**63`` allowed)."""
    lo_text, hi_text = interval[1:-1].split(",")
    lo, hi = _bound(lo_text), _bound(hi_text)
    above = x >= lo if interval[0] == "[" else x > lo
    below = x <= hi if interval[-1] == "]" else x < hi
    return above and below


def _bound(text: str) -> float:
    """``"0"``, ``"-inf"``, ``"2**63"``, ``"-2**63"`` as a number (exact for powers)."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    base, power, exponent = text.lstrip("-").partition("**")
    return sign * (int(base) ** int(exponent) if power else float(base))


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


def to_int(value: Any) -> int:
    """An integer from an int, an integral float or text ("3", "3.0", "1e3"); not a bool."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)  # exact, also beyond a float's 53 bits
        except ValueError:
            pass
    f = float(value)
    if not f.is_integer():
        raise ValueError
    return int(f)
