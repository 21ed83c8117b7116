"""What the framework callbacks share: the attach arguments they pass through."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


class AttachOptions:
    """The arguments of :func:`lscape.attach` a callback forwards (everything but the model
    and optimizer, which the framework owns)."""

    def __init__(self, plugins: Iterable[str] = (), out: str | None = None,
                 plugin_options: Mapping[str, Mapping[str, Any]] | None = None, loss_fn: Any = None,
                 adapter: Any = None, train_data: Any = None, eval_data: Any = None, seed: int = 0,
                 progress: bool = False, **attach_kwargs: Any):
        self.kwargs = dict(plugins=list(plugins), out=out, plugin_options=plugin_options, loss_fn=loss_fn,
                           adapter=adapter, train_data=train_data, eval_data=eval_data, seed=seed, progress=progress,
                           **attach_kwargs)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (tensors of one element included), as floats."""
    out = {}
    for key, value in metrics.items():
        try:
            if hasattr(value, "numel") and value.numel() != 1:
                continue
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out
