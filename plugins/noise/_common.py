"""Shared pieces of the noise probes: the probes' own minibatch sampler, common options, and the
panel figures."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lscape import Option
from lscape.data import take, to_device


__all__ = ["BatchSampler", "SMOOTH", "PARAMS", "is_measure_only", "smoothing_window", "panels"]


class BatchSampler:
    """Fresh minibatches from the training set, the probe's own shuffled loader.

    Batches are consecutive slices of a seeded permutation, so the batches of one pass are
    disjoint; a new permutation starts when too few samples are left for a full batch. Its
    generator is separate from the training stream, which it never shifts.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, device: Any):
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = min(int(batch_size), self.n)
        self.device = device
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def draw(self, count: int) -> list[Any]:
        """``count`` fresh batches."""
        out = []
        for _ in range(count):
            if self._perm is None or self._pos + self.batch_size > self.n:
                self._perm = torch.randperm(self.n, generator=self.generator)
                self._pos = 0
            idx = self._perm[self._pos : self._pos + self.batch_size]
            self._pos += self.batch_size
            out.append(to_device(take(self.dataset, idx), self.device))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"], int(state["pos"])


SMOOTH = Option("smooth", int, 1, "moving-average window of the figures (stored data stays raw)", minimum=1)
PARAMS = Option("params", str, None, "parameter subset: comma-separated glob patterns on names")


def is_measure_only(ctx) -> bool:
    """Whether this is `lscape measure` (no training step follows a measurement)."""
    try:
        return ctx.store is not None and ctx.store.attrs.get("kind") == "measure"
    except Exception:
        return False


def smoothing_window(run, group: str) -> int:
    """The moving-average window: ``lscape plot --smooth K``, else ``LSCAPESMOOTH`` if set,
    else the probe's ``smooth`` option."""
    from lscape.plotting import settings

    if settings()["smooth"] > 1:
        return int(settings()["smooth"])
    env = os.environ.get("LSCAPESMOOTH")
    if env:
        return max(1, int(env))
    opts = run.group_attrs(group).get("options", {})
    return max(1, int(opts.get("smooth") or 1))


def panels(runs, out_dir, group, panels, filename):
    import numpy as np

    from lscape.plotting import figure, line, note, run_colours, run_labels, save

    labels, colours = run_labels(runs), run_colours(len(runs))
    data = [(run.read(group), run.read("train") if run.has("train") else {}) for run in runs]
    drawn = []  # the panels with data, in order; the others are left out (and said so)
    for title, keys, ylabel in panels:
        series = []
        for label, colour, run, (d, train) in zip(labels, colours, runs, data):
            for k, key in enumerate(keys):
                source, _, name = key.rpartition(":")
                values = (train if source == "train" else d).get(name)
                steps = (train if source == "train" else d).get("step")
                if values is None or not np.isfinite(np.asarray(values, dtype=float)).any():
                    continue
                name_label = name if len(runs) == 1 else f"{label}: {name}"
                series.append((steps, values, name_label, colour if len(runs) > 1 else None,
                               ("-", "--", ":")[k % 3] if len(runs) > 1 else "-", smoothing_window(run, group)))
        if series:
            drawn.append((title, ylabel, series))
        else:
            note(f"{filename}: panel '{title}' left out: nothing recorded for {', '.join(keys)}")
    if not drawn:
        return save(*figure(group, "step", "")[:1], out_dir / filename, empty=f"no {group} measurement is finite")
    rows = math.ceil(len(drawn) / 2)
    fig, ax0 = figure(group, "", "", size=(11, 3.2 * rows))
    fig.delaxes(ax0)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, drawn):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        for steps, values, label, colour, ls, window in series:
            line(ax, steps, values, label=label, color=colour, ls=ls, smooth=window)
    every = np.concatenate([np.asarray(steps, dtype=float) for _, _, series in drawn for steps, *_ in series])
    if every.size and every.max() > every.min():  # one step axis for all panels, the loss panel's
        for ax in axes[:len(drawn)]:
            ax.set_xlim(every.min(), every.max())
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    return save(fig, out_dir / filename, legend=list(axes[:len(drawn)]))
