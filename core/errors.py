"""Exceptions that the command line turns into one clear line."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator


class LscapeError(Exception):
    """Base class of lscape's own errors."""


class UsageError(LscapeError):
    """Bad input from the user: the CLI prints one line and exits with status 2.

    Raise it *before* anything is written, with a message that names the problem and,
    where there is one, the fix.
    """


class PluginError(LscapeError):
    """A plugin failed during a run; carries the plugin's name."""

    def __init__(self, plugin: str, error: BaseException):
        self.plugin = plugin
        self.error = error
        # one line: torch's errors run over several, and stored/printed whole they showed "\n"
        super().__init__(f"plugin '{plugin}' failed: {type(error).__name__}: {message_line(error)}")


class DivergedError(LscapeError):
    """The training loss became NaN or infinite."""


class UserCodeError(UsageError):
    """The user's own code (a model, data or loss factory, a loss, a model's forward) raised.

    Shown as one line, "your factory X raised: ..." (exit status 2, nothing written); the
    original exception is kept as ``__cause__``, whose traceback the CLI prints with
    ``LSCAPE_DEBUG=1``.
    """

    def __init__(self, what: str, error: BaseException):
        self.what = what
        self.error = error
        super().__init__(f"your {what} raised {type(error).__name__}: {message_line(error)}"
                         " (LSCAPE_DEBUG=1 shows the traceback)")


def did_you_mean(name: str, choices: "Iterable[str]") -> str:
    """``"; did you mean 'sharpness'?"`` for the choice closest to a misspelt ``name``, or ""."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def message_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), cut to
    ``limit`` characters: torch's multi-line errors become one readable line."""
    text = str(error).strip()
    if isinstance(error, KeyError) and error.args:
        text = repr(error.args[0])
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def quiet_interrupt_during_cli_imports() -> None:
    """When this process is the ``lscape`` command, Ctrl-C during its first seconds (importing
    torch, before the command line handles signals) prints one line and exits with status
    130, not an import traceback (or worse: a library that catches the interrupt and goes on
    half-imported). ``restore_interrupt()`` hands SIGINT back once the CLI runs. A program
    that merely imports lscape is left alone."""
    import os
    import signal
    import sys

    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 not in ("lscape", "lscape.exe") and list(getattr(sys, "orig_argv", [])[1:3]) != ["-m", "lscape"]:
        return
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when SIGINT is ignored
            signal.signal(signal.SIGINT, _interrupted_while_importing)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # SIGTERM too: one line, not silence
            signal.signal(signal.SIGTERM, _interrupted_while_importing)
    except ValueError:  # not the main thread
        pass


def restore_interrupt() -> None:
    """Give SIGINT back to Python (``KeyboardInterrupt``) once the imports are done; SIGTERM
    raises :class:`Terminated` from then on, so that the command
    answers it in one line while it starts (a run handles both itself once it trains)."""
    import signal

    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGTERM) is _interrupted_while_importing:
            signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        pass


class Terminated(BaseException):
    """SIGTERM while the ``lscape`` command starts (see ``restore_interrupt``); not a
    ``KeyboardInterrupt``, which click turns into "aborted"."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _interrupted_while_importing(signum, frame) -> None:
    import os
    import signal
    import sys

    sys.stderr.write("terminated while starting: nothing was written\n" if signum == signal.SIGTERM
                     else "interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # nothing is written yet: no store exists before the command runs


@contextlib.contextmanager
def warnings_held() -> Iterator[None]:
    """Warnings raised inside (torch's, a library's, user code's while the input is checked)
    are shown when the block ends, except when it ends in a ``UsageError``: bad input stays
    one line, not a line and a warning's two."""
    show = True
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except UsageError:
                show = False
                raise
    finally:
        for w in caught if show else ():
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
