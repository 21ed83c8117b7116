"""Small helpers every plot function shares: a figure with labels, and saving it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["figure", "save", "moving_average"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'lscape[plot]'") from None
    return plt


def figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (6.4, 4.0)) -> tuple[Any, Any]:
    """A new figure and axes with title and axis labels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def save(fig: Any, path: Path, legend: Any = None) -> Path:
    """Save and close ``fig`` at ``path`` (PNG), with a legend on ``legend`` if it has labels."""
    plt = _pyplot()
    if legend is not None and legend.get_legend_handles_labels()[0]:
        legend.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def moving_average(values: Any, window: int) -> Any:
    """Trailing moving average for plots (stored data stays raw); NaNs are skipped."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    ok = ~np.isnan(v)
    s = np.cumsum(np.where(ok, v, 0.0))
    c = np.cumsum(ok)
    s = np.concatenate([[0.0], s])
    c = np.concatenate([[0], c])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    n = c[idx] - c[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (s[idx] - s[lo]) / np.maximum(n, 1), np.nan)
