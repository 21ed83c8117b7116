"""Exceptions that the command line turns into one clear line."""

from __future__ import annotations


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
        super().__init__(f"plugin '{plugin}' failed: {type(error).__name__}: {error}")


class DivergedError(LscapeError):
    """The training loss became NaN or infinite."""
