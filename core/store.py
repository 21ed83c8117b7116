"""The run store: one zarr v3 group per run, one subgroup per plugin, rows appended in chunks.

Layout (see DESIGN.md)::

    NAME.zarr/            attrs: version, resolved config, seed, status, times, ...
      train/              step(step) loss(step) lr(step) ...
      <plugin>/           attrs: options and schedule; step(step) <array>(step, ...)
      checkpoints/        model/optimizer state for resume

Every array carries ``dimension_names`` so ``xarray.open_zarr(path, group=g)`` gives a
labelled Dataset. Writers buffer rows and flush one chunk at a time, on ``flush()`` and
after ``flush_seconds`` of wall clock, so an interrupted run loses at most what came after
its last flush. The ``step`` array of a group is written last, so a reader that trusts
``len(step)`` never sees a half-written row.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import zarr

from .errors import UsageError
from .options import Output

__all__ = ["RunStore", "GroupWriter", "RunReader", "store_exists", "to_numpy", "written_rows"]

#: Target size of one chunk of a row-appended array.
CHUNK_BYTES = 2 * 2**20
MAX_CHUNK_ROWS = 512


def store_exists(path: str | os.PathLike) -> bool:
    """Whether a run store (or anything) already lives at ``path``."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        try:
            zarr.open_group(text, mode="r")
            return True
        except Exception:  # zarr raises several kinds for "nothing there"
            return False
    return Path(text.removeprefix("file://")).exists()


def written_rows(steps: np.ndarray, before: int | None = None) -> int:
    """How many leading rows of a ``step`` array are written (and, with ``before``, have
    step < before). A row whose step is still the fill value -1 was resized but not yet
    written: the writer, or a killed process, was between the two."""
    ok = steps >= 0
    if before is not None:
        ok &= steps < before
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else int(steps.shape[0])


def to_numpy(value: Any) -> np.ndarray:
    """A value handed to a writer as a numpy array (tensors are detached and moved to CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


class GroupWriter:
    """Appends rows ``(step, name=value, ...)`` to one group, one chunk at a time."""

    def __init__(self, group: zarr.Group, outputs: Iterable[Output] = (), flush_seconds: float = 10.0):
        self.group = group
        self.outputs = {o.name: o for o in outputs}
        self.flush_seconds = flush_seconds
        self._rows: list[dict[str, Any]] = []
        self._chunk_rows: int | None = None
        self._last_flush = time.monotonic()
        # array handles, opened once: listing and reopening them at every flush is I/O
        self._arrays: dict[str, zarr.Array] = {name: group[name] for name in group.array_keys()}
        self._length = written_rows(self._arrays["step"][:]) if "step" in self._arrays else 0

    def __len__(self) -> int:
        """Rows written so far, buffered ones included."""
        return self._length + len(self._rows)

    def append(self, step: int, **values: Any) -> None:
        """Buffer one row; arrays not given in a row are filled with NaN (or -1, False)."""
        if "step" in values:
            raise ValueError("'step' is the coordinate; pass it as the first argument")
        # plain numbers stay Python objects until the flush (cheap on the per-step path);
        # tensors and arrays are copied now, since their owner may change them in place
        row: dict[str, Any] = {"step": int(step)}
        for name, value in values.items():
            row[name] = value if isinstance(value, (float, int)) else to_numpy(value).copy()
        self._rows.append(row)
        if self._chunk_rows is None:
            self._chunk_rows = self._rows_per_chunk({k: np.asarray(v) for k, v in row.items()})
        if len(self._rows) >= self._chunk_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (the ``step`` array last)."""
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        # arrays seen in earlier flushes get NaN rows too, so every array keeps step's length
        seen = dict.fromkeys([*self._arrays, *(k for r in rows for k in r)])
        names = [n for n in seen if n != "step"] + ["step"]
        n0, k = self._length, len(rows)
        for name in names:
            sample = next((np.asarray(r[name]) for r in rows if name in r), None)
            arr = self._arrays[name] if sample is None else self._array(name, sample)
            if arr.shape[0] != n0:  # an array first seen late, or left short by a crash
                arr.resize((n0,) + arr.shape[1:])
            fill = _fill_value(arr.dtype)
            block = np.full((k,) + arr.shape[1:], fill, dtype=arr.dtype)
            for i, r in enumerate(rows):
                if name in r:
                    value = np.asarray(r[name])
                    if value.shape != arr.shape[1:]:
                        raise ValueError(
                            f"{self.group.path}/{name}: row shape {value.shape} differs from {arr.shape[1:]}"
                        )
                    block[i] = value
            arr.resize((n0 + k,) + arr.shape[1:])
            arr[n0 : n0 + k] = block
        self._length = n0 + k

    def truncate(self, keep: int) -> None:
        """Drop everything after the first ``keep`` rows (used by resume)."""
        self.flush()
        for arr in self._arrays.values():
            if arr.shape[0] > keep:
                arr.resize((keep,) + arr.shape[1:])
        self._length = min(self._length, keep)

    def _rows_per_chunk(self, row: Mapping[str, np.ndarray]) -> int:
        row_bytes = max(sum(v.nbytes for v in row.values()), 1)
        return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // row_bytes)))

    def _array(self, name: str, sample: np.ndarray) -> zarr.Array:
        if name in self._arrays:
            return self._arrays[name]
        out = self.outputs.get(name)
        dtype = np.dtype(out.dtype) if out is not None else _default_dtype(sample)
        if name == "step":
            dtype = np.dtype(np.int64)
        dims = ("step",) + (tuple(out.dims) if out is not None and out.dims else
                            tuple(f"{name}_dim{i}" for i in range(sample.ndim)))
        if len(dims) != sample.ndim + 1:
            raise ValueError(f"{self.group.path}/{name}: declared dims {dims[1:]} but value has shape {sample.shape}")
        rows = self._chunk_rows or 1
        inner = tuple(out.chunks) if out is not None and out.chunks else _inner_chunks(sample.shape, dtype.itemsize)
        attrs = {}
        if out is not None:
            attrs = {k: v for k, v in (("units", out.units), ("long_name", out.long_name)) if v}
        self._arrays[name] = self.group.create_array(
            name,
            shape=(0,) + sample.shape,
            chunks=(rows,) + inner,
            dtype=dtype,
            fill_value=_fill_value(dtype),
            dimension_names=list(dims),
            attributes=attrs,
        )
        return self._arrays[name]


class RunStore:
    """A run store opened for writing. Use ``create`` for a new run, ``open`` to resume."""

    def __init__(self, root: zarr.Group, path: str):
        self.root = root
        self.path = path
        self._writers: dict[str, GroupWriter] = {}

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: Mapping[str, Any]) -> "RunStore":
        """Create a new store; an existing one at ``path`` is a ``UsageError``."""
        path = str(path)
        if store_exists(path):
            raise UsageError(f"{path} already exists; pass --resume {path} to continue it, or choose another --out")
        root = zarr.open_group(path, mode="w-")
        root.attrs.update(_jsonable(dict(attrs)))
        return cls(root, path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunStore":
        """Open an existing store for appending."""
        path = str(path)
        if not store_exists(path):
            raise UsageError(f"no run store at {path}")
        try:
            root = zarr.open_group(path, mode="r+")
        except Exception as e:
            raise UsageError(f"{path} is not a lscape run store ({type(e).__name__})") from e
        return cls(root, path)

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self.root.attrs.asdict()

    def update_attrs(self, **attrs: Any) -> None:
        """Merge ``attrs`` into the root attributes (written at once)."""
        self.root.attrs.update(_jsonable(attrs))

    def group(self, name: str, outputs: Iterable[Output] = (), attrs: Mapping[str, Any] | None = None) -> GroupWriter:
        """The writer of group ``name`` (``"plugin"`` or ``"plugin/part"``), created once."""
        writer = self._writers.get(name)
        if writer is None:
            zgroup = self.root.require_group(name)
            if attrs:
                zgroup.attrs.update(_jsonable(dict(attrs)))
            writer = GroupWriter(zgroup, outputs)
            self._writers[name] = writer
        elif outputs:
            writer.outputs.update({o.name: o for o in outputs})
        return writer

    def flush(self) -> None:
        """Flush every writer."""
        for writer in self._writers.values():
            writer.flush()


class RunReader:
    """Read-only view of a run store, safe to open while the run writes."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not store_exists(self.path):
            raise UsageError(f"no run store at {self.path}")
        try:
            self.root = zarr.open_group(self.path, mode="r")
        except Exception as e:
            raise UsageError(f"{self.path} is not a lscape run store ({type(e).__name__})") from e
        if "lscape_version" not in self.root.attrs:
            raise UsageError(f"{self.path} is a zarr store but not a lscape run (no lscape_version attribute)")

    @property
    def name(self) -> str:
        return Path(self.path.rstrip("/")).name.removesuffix(".zarr")

    @property
    def attrs(self) -> dict[str, Any]:
        return self.root.attrs.asdict()

    def groups(self) -> list[str]:
        """Every group that holds arrays, as slash paths, sorted."""
        out = []

        def walk(group: zarr.Group, prefix: str) -> None:
            if any(True for _ in group.array_keys()):
                out.append(prefix.rstrip("/"))
            for key in sorted(group.group_keys()):
                walk(group[key], prefix + key + "/")

        for key in sorted(self.root.group_keys()):
            walk(self.root[key], key + "/")
        return out

    def has(self, group: str) -> bool:
        return group in self.groups()

    def group_attrs(self, group: str) -> dict[str, Any]:
        return self.root[group].attrs.asdict()

    def arrays(self, group: str) -> dict[str, zarr.Array]:
        g = self.root[group]
        return {name: g[name] for name in sorted(g.array_keys())}

    def read(self, group: str) -> dict[str, np.ndarray]:
        """Every array of ``group`` as numpy, cut to the rows whose ``step`` is written."""
        arrays = self.arrays(group)
        n = written_rows(arrays["step"][:]) if "step" in arrays else min((a.shape[0] for a in arrays.values()), default=0)
        return {name: a[:n] if a.ndim else a[...] for name, a in arrays.items()}


def _default_dtype(sample: np.ndarray) -> np.dtype:
    if sample.dtype.kind == "f":
        return np.dtype(np.float64) if sample.dtype.itemsize >= 8 else np.dtype(np.float32)
    if sample.dtype.kind in "iu":
        return np.dtype(np.int64)
    if sample.dtype.kind == "b":
        return np.dtype(bool)
    raise ValueError(f"cannot store values of dtype {sample.dtype}")


def _fill_value(dtype: np.dtype) -> Any:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    return -1


def _inner_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    # Long vectors (trajectories) are cut along their last axis too, so one chunk stays
    # near CHUNK_BYTES and a reader can take a slice of coordinates cheaply.
    if not shape:
        return ()
    total = math.prod(shape) * itemsize
    if total <= CHUNK_BYTES:
        return shape
    last = max(1, CHUNK_BYTES // (itemsize * max(1, math.prod(shape[:-1]))))
    return shape[:-1] + (min(shape[-1], last),)


def _jsonable(value: Any) -> Any:
    """Attributes must be JSON: convert tuples, numpy scalars, paths and unknowns to text."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
