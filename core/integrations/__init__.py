"""Framework callbacks built on :func:`lscape.attach`, imported lazily (optional extras).

- ``lscape.integrations.lightning.LscapeCallback`` — a Lightning ``Callback``
  (``pip install lscape[lightning]``);
- ``lscape.integrations.huggingface.LscapeTrainerCallback`` — a ``transformers.TrainerCallback``
  (``pip install lscape[huggingface]``).

``from lscape.integrations import LscapeCallback`` works too; the framework is imported only
then.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LscapeCallback", "LscapeTrainerCallback"]

_WHERE = {"LscapeCallback": "lightning", "LscapeTrainerCallback": "huggingface"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
