"""Helpers every plot function shares: figures, lines, run labels and colours, saving.

The rules they enforce, so that each plugin's figures get them for free:

* a series with one (or a few) measurements is drawn with markers, not as an invisible line;
  a series that stops being finite (a diverged run) ends in an ``x``;
* ``save()`` writes no figure whose axes hold no data, and says why on stderr;
* legends are deduplicated, at most ``MAX_LEGEND`` entries, and outside the data when long;
* an axis whose positive values span more than ``LOG_DECADES`` decades gets a log scale;
* each run has one colour (``run_colours``) and one label (``run_labels``: ``--name``, else the
  store name a user chose, else the config keys that differ between the runs), so train and
  eval, or λ and the SAM-edge, of one run share its colour;
* ``lscape plot --format/--dpi/--smooth`` reach every figure through ``configure()``.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import UsageError

__all__ = ["figure", "save", "moving_average", "configure", "settings", "line", "run_labels", "run_colours",
           "eigenvalue_lines", "note", "MAX_LEGEND", "FORMATS"]

FORMATS = ("png", "pdf", "svg")
#: legend entries shown at most; more are summarised as "+N more"
MAX_LEGEND = 10
#: positive data spanning more decades than this is drawn on a log axis
LOG_DECADES = 2.0
#: series with at most this many finite points are drawn with markers
FEW_POINTS = 12

_SETTINGS: dict[str, Any] = {"format": "png", "dpi": 110, "smooth": 1}
_COLLECTING: list[list[str]] = []


def settings() -> dict[str, Any]:
    """The output settings now in force (``format``, ``dpi``, ``smooth``)."""
    return dict(_SETTINGS)


@contextlib.contextmanager
def configure(format: str | None = None, dpi: int | None = None, smooth: int | None = None) -> Iterator[list[str]]:
    """Within the block, ``save()`` writes ``format`` at ``dpi`` and ``line()`` smooths with a
    trailing moving average of ``smooth`` points (``lscape plot --format --dpi --smooth``).
    Yields the list of notes (figures not written, and why) the block produced."""
    if format is not None and format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
    if dpi is not None and not (isinstance(dpi, int) and 10 <= dpi <= 2400):
        raise UsageError(f"--dpi must be an integer in [10, 2400], got {dpi!r}")
    if smooth is not None and not (isinstance(smooth, int) and smooth >= 1):
        raise UsageError(f"--smooth must be a positive integer, got {smooth!r}")
    saved, notes = dict(_SETTINGS), []
    _SETTINGS.update({k: v for k, v in (("format", format), ("dpi", dpi), ("smooth", smooth)) if v is not None})
    _COLLECTING.append(notes)
    try:
        yield notes
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(saved)
        _COLLECTING.remove(notes)


def note(message: str) -> None:
    """Say why a figure (or a panel) was not drawn: on stderr, and in ``configure()``'s notes."""
    for notes in _COLLECTING:
        notes.append(message)
    print(f"[lscape plot] {message}", file=sys.stderr, flush=True)


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


# -- runs: labels and colours -----------------------------------------------------------

_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")
#: config keys that never tell runs apart in a label
_NOT_LABELS = {"out", "resume", "progress", "plugins", "plugin_options", "disable", "device", "checkpoint_schedule",
               "eval_schedule", "workers", "name"}
_SHORT = {"batch_size": "batch", "weight_decay": "wd", "optimizer": "opt", "lr_schedule": "sched",
          "data_seed": "data seed", "momentum": "mom"}


def run_labels(runs: Sequence[Any]) -> list[str]:
    """One label per run: its ``--name``; else its store name unless that is the default
    MODEL-DATA-TIMESTAMP; else the config values that differ between the runs (``lr=0.1
    batch=16``). A run that did not complete says so: ``(diverged)``."""
    labels: list[str | None] = []
    for run in runs:
        attrs = run.attrs
        name = attrs.get("name") or (attrs.get("config") or {}).get("name")
        if not name and not _STAMP.search(run.name):
            name = run.name
        labels.append(str(name) if name else None)
    if any(label is None for label in labels):
        configs = [_flat(run.attrs.get("config") or {}) for run in runs]
        keys = sorted({k for c in configs for k in c} - _NOT_LABELS)
        differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
        for i, run in enumerate(runs):
            if labels[i] is None:
                parts = [f"{_SHORT.get(k, k)}={configs[i].get(k)}" for k in differ[:4]]
                labels[i] = " ".join(parts) if parts else _STAMP.sub("", run.name)
    if len(set(labels)) < len(labels):  # still the same: number them
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    out = []
    for run, label in zip(runs, labels):
        status = run.attrs.get("status")
        out.append(f"{label} ({status})" if status in ("diverged", "failed", "interrupted") else str(label))
    return out


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k not in _NOT_LABELS:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_colours(n: int) -> list[Any]:
    """``n`` distinct colours, one per run (tab10, then tab20, then a colour map)."""
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# -- drawing ----------------------------------------------------------------------------

def line(ax: Any, x: Any, y: Any, label: str | None = None, smooth: int | None = None, **style: Any) -> Any:
    """Plot ``y`` against ``x`` the way every lscape figure does: markers when there are few
    finite points, the raw series faint under its moving average when smoothing is on
    (``smooth`` or ``lscape plot --smooth``), an ``x`` where a series stops being finite."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    finite = np.isfinite(y)
    n = int(finite.sum())
    window = int(smooth if smooth is not None else _SETTINGS["smooth"])
    if n <= FEW_POINTS:
        style.setdefault("marker", "o")
        style.setdefault("ms", 4 if n > 1 else 6)
    if window > 1 and n > window:
        raw = ax.plot(x, y, lw=0.5, alpha=0.3, color=style.get("color"), ls=style.get("ls", style.get("linestyle", "-")))[0]
        style["color"] = raw.get_color()
        handle = ax.plot(x, moving_average(y, window), label=f"{label} (MA {window})" if label else None,
                         **{"lw": 1.2, **style})[0]
    else:
        handle = ax.plot(x[finite] if n <= FEW_POINTS else x, y[finite] if n <= FEW_POINTS else y, label=label,
                         **{"lw": 0.9, **style})[0]
    if n and not finite[-1] and n < y.size:  # the series ended non-finite: mark where
        last = int(np.flatnonzero(finite)[-1])
        ax.plot([x[last]], [y[last]], "x", ms=9, mew=2, color=handle.get_color())
    return handle


def eigenvalue_lines(ax: Any, steps: Any, eigenvalues: Any, label: str = "", colour: Any = None,
                     legend_k: int = 3) -> None:
    """The top-k eigenvalues (rows: steps, columns: λ₁..λ_k) against step. Up to ``legend_k``
    get legend entries; more than that are coloured along a colour map with a colour bar
    (λ index) instead of a legend entry each."""
    import numpy as np

    eig = np.asarray(eigenvalues, dtype=float).reshape(len(steps), -1)
    k = eig.shape[1]
    if k <= legend_k:
        for j in range(k):
            line(ax, steps, eig[:, j], label=f"{label} λ{j + 1}".strip(), color=colour,
                 ls=("-", "--", ":")[j % 3] if colour is not None else "-")
        return
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for j in range(k):
        line(ax, steps, eig[:, j], label=f"{label} λ1..λ{k}".strip() if j == 0 else None,
             color=cmap(j / max(k - 1, 1)), lw=0.8)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(1, k), cmap=cmap)
    ax.figure.colorbar(mappable, ax=ax, label="eigenvalue index j (λ_j)", pad=0.01)


def _has_data(ax: Any) -> bool:
    import numpy as np

    for l in ax.lines:
        if np.isfinite(np.asarray(l.get_ydata(), dtype=float)).any():
            return True
    return bool(ax.collections or ax.images or ax.patches or ax.containers)


def _auto_log(ax: Any) -> None:
    """Log y when the drawn positive values span more than ``LOG_DECADES`` decades."""
    import numpy as np

    if ax.get_yscale() != "linear" or not ax.lines or ax.collections or ax.images or ax.patches:
        return
    values = np.concatenate([np.asarray(l.get_ydata(), dtype=float).ravel() for l in ax.lines])
    values = values[np.isfinite(values)]
    if values.size < 2 or (values <= 0).any():
        return
    if np.log10(values.max() / values.min()) > LOG_DECADES:
        ax.set_yscale("log")


def _legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, label in zip(handles, labels):
        if label and not label.startswith("_") and label not in seen:
            seen[label] = h
    if not seen:
        return
    items = list(seen.items())
    extra = len(items) - MAX_LEGEND
    if extra > 0:
        items = items[:MAX_LEGEND - 1]
        from matplotlib.lines import Line2D

        items.append((f"+{extra + 1} more", Line2D([], [], ls="none")))
    labels, handles = zip(*items)
    if len(items) > 4:  # a long legend goes beside the axes, not over the data
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(handles, labels, fontsize=8, loc="best")


def save(fig: Any, path: Path, legend: Any = None, auto_log: bool = True, empty: str | None = None) -> Path | None:
    """Save and close ``fig`` at ``path`` (its suffix replaced by ``--format``), with a tidy
    legend on ``legend`` (an axes, or a list of them). Axes without data are hidden; a figure
    with no data at all is not written: ``note()`` says why (``empty``, or "no data") and
    None is returned."""
    plt = _pyplot()
    path = Path(path).with_suffix("." + _SETTINGS["format"])
    axes = [a for a in fig.get_axes() if a.get_visible() and a.get_label() != "<colorbar>"]
    with_data = [a for a in axes if _has_data(a)]
    if not with_data:
        plt.close(fig)
        note(f"{path.name} not written: {empty or 'no data to draw'}")
        return None
    for ax in axes:
        if ax not in with_data:
            ax.set_visible(False)
        elif auto_log:
            _auto_log(ax)
    targets = legend if isinstance(legend, (list, tuple)) else [legend] if legend is not None else []
    for ax in targets:
        if ax in with_data:
            _legend(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_SETTINGS["dpi"], bbox_inches="tight")
    plt.close(fig)
    return path


def written(paths: Iterable[Path | None]) -> list[Path]:
    """The paths of figures ``save()`` wrote (it returns None for those it did not)."""
    return [p for p in paths if p is not None]


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


def default_plot_folder(paths: Sequence[str]) -> Path:
    """``RUN-plots`` next to a single run; for several runs a folder named after all of them
    (``A-vs-B-plots``, beside the first), so an overlay never lands in one run's own folder."""
    stores = [Path(str(p).removeprefix("file://").rstrip("/")) for p in paths]
    names = [s.name.removesuffix(".zarr") for s in stores]
    if len(stores) == 1:
        return stores[0].with_name(names[0] + "-plots")
    label = "-vs-".join(names[:3]) + (f"-and-{len(names) - 3}-more" if len(names) > 3 else "")
    return stores[0].parent / (label[:120] + "-plots")


def require_writable_folder(out: Path, flag: str = "--out") -> None:
    """``out`` is a folder this process could create or write, else a ``UsageError``; nothing is
    created (a refused plot leaves no empty folder behind)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a folder for the figures")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create the figure folder {out}: {probe} is a file")
    import os

    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write figures to {out}: {probe} is not writable")


def plot_runs(readers: Sequence[Any], out: Path, registry: Any) -> tuple[list[Path], list[str]]:
    """Every registered figure for the groups ``readers`` hold, and a generic figure for each
    group no plot is registered for (a third-party probe's arrays are never silently left
    out). Returns the figures written and warnings (a figure function that failed)."""
    written_paths: list[Path] = []
    warnings: list[str] = []
    groups = {g.split("/")[0] for r in readers for g in r.groups()} | {g for r in readers for g in r.groups()}
    for group, entries in registry.plots.items():
        if group not in groups:
            continue
        having = [r for r in readers if r.has(group) or any(g.startswith(group + "/") for g in r.groups())]
        for entry in entries:
            try:
                written_paths += [p for p in (entry.obj(having, out) or []) if p is not None]
            except UsageError:
                raise
            except Exception as e:  # one broken figure should not hide the others
                warnings.append(f"the '{group}' figure from {entry.source} failed: {type(e).__name__}: {e}")
    covered = set(registry.plots)
    for group in sorted(g for g in groups if "/" not in g and g not in covered and g != "checkpoints"):
        having = [r for r in readers if r.has(group)]
        if having:
            note(f"no figure is registered for the group '{group}': drawing its arrays against step")
            written_paths += written(generic_figures(having, group, out))
    return written_paths, warnings


def generic_figures(runs: Sequence[Any], group: str, out_dir: Path) -> list[Path | None]:
    """One figure per array of ``group``: a (step,) array as a line, a (step, k) array as k
    lines (labelled by the array's ``labels`` attribute when it has one, e.g. parameter names);
    arrays of more dimensions are named and skipped."""
    import numpy as np

    colours = run_colours(len(runs))
    labels = run_labels(runs)
    data = [(run, run.read(group), run.arrays(group)) for run in runs]
    names = sorted({n for _, d, _ in data for n in d if n != "step"})
    paths: list[Path | None] = []
    for name in names:
        fig, ax = figure(f"{group}: {name}", "step", name)
        drew = False
        for (run, d, arrays), colour, label in zip(data, colours, labels):
            if name not in d or "step" not in d:
                continue
            y = np.asarray(d[name], dtype=float) if np.asarray(d[name]).dtype.kind in "fiub" else None
            if y is None or y.ndim > 2 or len(y) != len(d["step"]):
                note(f"{group}/{name} of {run.name}: not a (step,) or (step, k) number array, not drawn")
                continue
            if y.ndim == 1:
                line(ax, d["step"], y, label=label, color=colour)
            else:
                names_k = list(arrays[name].attrs.get("labels", [])) or [str(j) for j in range(y.shape[1])]
                for j in range(y.shape[1]):
                    line(ax, d["step"], y[:, j], label=f"{label} {names_k[j] if j < len(names_k) else j}".strip(),
                         color=colour, alpha=max(0.25, 1 - j / max(y.shape[1], 1)))
            drew = True
        if drew:
            paths.append(save(fig, out_dir / f"{group}_{name}.png", legend=ax))
        else:
            _pyplot().close(fig)
    return paths
