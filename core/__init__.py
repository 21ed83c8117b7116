"""lscape: measure the loss landscape and the dynamics of training, one plugin at a time."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import quiet_interrupt_during_cli_imports  # noqa: E402  (first: torch takes seconds to import)

quiet_interrupt_during_cli_imports()

from .hookspecs import hookimpl, hookspec  # noqa: E402
from .options import Option, Output  # noqa: E402
from .errors import UsageError, PluginError  # noqa: E402
from .schedule import Schedule  # noqa: E402
from .context import RunContext, StepState  # noqa: E402
from .probe import Plugin, Probe, StepOwner, preserve_state  # noqa: E402
from .api import run, open_run, measure  # noqa: E402
from .session import attach, Session  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "hookspec", "Option", "Output", "UsageError", "PluginError", "Schedule",
    "RunContext", "StepState", "Plugin", "Probe", "StepOwner", "preserve_state", "run", "open_run", "measure", "attach", "Session",
]
