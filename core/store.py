"""The run store: one zarr v3 group per run, one subgroup per plugin, rows appended in chunks.

Layout (see DESIGN.md)::

    NAME.zarr/            attrs: version, resolved config, seed, status, times, ...
      train/              step(step) loss(step) lr(step) ...
      <plugin>/           attrs: options and schedule; step(step) <array>(step, ...)
      checkpoints/        model/optimizer state for resume

Every array carries ``dimension_names`` so ``xarray.open_zarr(path, group=g)`` gives a
labelled Dataset. Writers buffer rows and flush one chunk at a time, on ``flush()`` and
after ``flush_seconds`` of wall clock, so an interrupted run loses at most what came after
its last flush.

Live reads: a flush grows every array of a group, writes the rows (``step`` last) and only
then publishes the group's committed row count in its ``rows`` attribute; a resume's
truncation publishes the smaller count first. ``RunReader.read``/``to_xarray`` cut every
array to the committed count, so a reader polling a live store always gets a consistent
prefix (``xarray.open_zarr`` on a live store may catch arrays mid-resize: use
``lscape.open_run(path).to_xarray(group)``).

One writer: ``RunStore.create``/``open`` take the store's writer lock (``WriterLock``): an
OS lock on the store's folder, held until ``close()`` or the process dies, with the holder's
pid, host and start time in the attributes of the store's ``lock`` group (for messages and
``lscape show``). A lock left by a dead process is stale and taken over.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import zarr

from .errors import UsageError, message_line
from .options import Output

#: folders that experiment trackers keep inside a run store's folder by default (the tensorboard
#: and wandb plugins): not zarr nodes, so zarr's listing skips them; its warning about them is noise
TRACKER_FOLDERS = ("tensorboard", "wandb")
warnings.filterwarnings("ignore", message=rf"Object at ({'|'.join(TRACKER_FOLDERS)}) is not recognized as a component",
                        category=UserWarning)

__all__ = ["RunStore", "GroupWriter", "RunReader", "WriterLock", "store_exists", "to_numpy", "written_rows",
           "committed_rows", "missing_chunks", "stored_config", "local_path", "check_local_path"]

#: group attribute holding the number of rows every array of the group has written
ROWS_ATTR = "rows"
#: group attribute counting truncations (resumes cutting rows back): a reader's retry signal
TRUNCATIONS_ATTR = "truncations"
#: the group whose attributes name the store's writer
LOCK_GROUP = "lock"
#: array attribute: every chunk of the array is written, also one holding only fill values
#: (zarr skips those by default), so a missing chunk is a lost one (:func:`missing_chunks`)
ALL_CHUNKS_ATTR = "all_chunks_written"
#: what arrays written with every chunk are opened and created with
ALL_CHUNKS_CONFIG = {"write_empty_chunks": True}

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
    local = text.removeprefix("file://")
    check_local_path(local, text)
    return Path(local).exists()


def check_local_path(local: str, shown: str | None = None) -> None:
    """One line, before anything is created, for a path no filesystem takes: a component
    longer than the filesystem's name limit (255 bytes on most), a path longer than its path
    limit, a NUL character."""
    shown = shown or local
    if "\0" in local:
        raise UsageError(f"cannot use {shown!r}: a path cannot hold a NUL character")
    absolute = os.path.abspath(local)
    parent = absolute
    while parent and not os.path.isdir(parent):  # the nearest folder that exists tells the limits
        parent = os.path.dirname(parent)
    try:
        name_max, path_max = os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    except (AttributeError, ValueError, OSError):  # no pathconf (Windows): the common limits
        name_max, path_max = 255, 4096
    for part in absolute.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"cannot use {shown[:60]}...: its name {part[:24]}... is {len(os.fsencode(part))} "
                             f"bytes long, more than the {name_max} the filesystem allows")
    if len(os.fsencode(absolute)) >= path_max:
        raise UsageError(f"cannot use {shown[:60]}...: the path is {len(os.fsencode(absolute))} bytes long, more "
                         f"than the {path_max} the filesystem allows")


def written_rows(steps: np.ndarray, before: int | None = None) -> int:
    """How many leading rows of a ``step`` array are written (and, with ``before``, have
    step < before). A row whose step is still the fill value -1 was resized but not yet
    written: the writer, or a killed process, was between the two."""
    ok = steps >= 0
    if before is not None:
        ok &= steps < before
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else int(steps.shape[0])


def committed_rows(group: zarr.Group, arrays: Mapping[str, zarr.Array] | None = None) -> int:
    """The rows of ``group`` that a reader may trust: the published ``rows`` count (stores
    from before it existed: the written rows of ``step``), never more than ``step`` holds."""
    arrays = dict(group.arrays()) if arrays is None else arrays
    published = group.attrs.get(ROWS_ATTR)
    if "step" not in arrays:
        return min((a.shape[0] for a in arrays.values() if a.ndim), default=0)
    step = arrays["step"]
    n = step.shape[0] if published is None else min(int(published), step.shape[0])
    return written_rows(step[:n])


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
        self._arrays: dict[str, zarr.Array] = {name: _writable(group[name]) for name in group.array_keys()}
        self._length = committed_rows(group, self._arrays) if "step" in self._arrays else 0

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
            if isinstance(value, (float, int)):
                row[name] = value
            elif getattr(value, "ndim", None) == 0 and hasattr(value, "detach"):
                # a 0-d tensor (the loss) stays on its device until the flush: no host sync per step
                row[name] = value.detach()
            else:
                row[name] = to_numpy(value).copy()
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
        for r in rows:  # device scalars kept by append() reach the host here, once per flush
            for key, value in r.items():
                if hasattr(value, "detach"):
                    r[key] = to_numpy(value)
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
        self.group.attrs[ROWS_ATTR] = self._length  # published last: readers trust this many rows

    def truncate(self, keep: int) -> None:
        """Drop everything after the first ``keep`` rows (used by resume)."""
        self.flush()
        self._length = min(self._length, keep)
        # published first, in one metadata write: readers stop trusting the rest, and a reader
        # that read the old count before this sees the generation change and reads again
        self.group.attrs.update({ROWS_ATTR: self._length,
                                 TRUNCATIONS_ATTR: int(self.group.attrs.get(TRUNCATIONS_ATTR, 0)) + 1})
        for arr in self._arrays.values():
            if arr.shape[0] > keep:
                arr.resize((keep,) + arr.shape[1:])

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
        attrs: dict[str, Any] = {}
        if out is not None:
            attrs = {k: v for k, v in (("units", out.units), ("long_name", out.long_name)) if v}
        attrs[ALL_CHUNKS_ATTR] = True
        self._arrays[name] = self.group.create_array(
            name,
            shape=(0,) + sample.shape,
            chunks=(rows,) + inner,
            dtype=dtype,
            fill_value=_fill_value(dtype),
            dimension_names=list(dims),
            attributes=attrs,
            config=ALL_CHUNKS_CONFIG,
        )
        return self._arrays[name]


class RunStore:
    """A run store opened for writing. Use ``create`` for a new run, ``open`` to resume."""

    def __init__(self, root: zarr.Group, path: str, lock: "WriterLock | None" = None):
        self.root = root
        self.path = path
        self.lock = lock
        self._writers: dict[str, GroupWriter] = {}

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: Mapping[str, Any]) -> "RunStore":
        """Create a new store and take its writer lock; an existing one at ``path`` (or one
        that another process creates first) is a ``UsageError``."""
        path = str(path)
        exists = f"{path} already exists; pass --resume {path} to continue it, or choose another --out"
        if store_exists(path):
            raise UsageError(exists)
        local = _local_path(path)
        lock = None
        if local is not None:
            _make_parent(path, local)
            try:
                os.mkdir(local)  # atomic: of two runs racing for one --out, exactly one gets here
            except FileExistsError:
                raise UsageError(exists) from None
            except OSError as e:
                raise UsageError(f"cannot create {path}: {e.strerror or e}") from None
            lock = WriterLock.acquire(local, path)
        try:
            root = zarr.open_group(path, mode="w-")
        except Exception as e:  # a URL without its filesystem package (s3fs), an unknown protocol
            if lock is not None:
                lock.release()
                os.rmdir(local)
            hint = " (install the filesystem package for this URL)" if isinstance(e, ImportError) else ""
            raise UsageError(f"cannot create {path}: {message_line(e)}{hint}") from None
        root.attrs.update(_jsonable(dict(attrs)))
        store = cls(root, path, lock)
        if lock is not None:
            lock.publish(root)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, lock: bool = True) -> "RunStore":
        """Open an existing store for appending, taking its writer lock (``lock=False``: for
        the ranks of a distributed run that only read checkpoints)."""
        path = str(path)
        if not store_exists(path):
            raise UsageError(f"no run store at {path}")
        local = _local_path(path)
        held = WriterLock.acquire(local, path) if lock and local is not None else None
        try:
            root = zarr.open_group(path, mode="r+")
        except Exception as e:
            if held is not None:
                held.release()
            raise UsageError(f"{path} is not a lscape run store ({type(e).__name__})") from e
        if held is not None:
            held.publish(root)
        return cls(root, path, held)

    def close(self) -> None:
        """Flush every writer and release the writer lock."""
        try:
            self.flush()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def clear_attrs(self, *names: str) -> None:
        """Remove root attributes (an old ``error`` after a successful resume)."""
        for name in names:
            if name in self.root.attrs:
                del self.root.attrs[name]

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
                with self._reading(prefix + key):
                    child = group[key]
                walk(child, prefix + key + "/")

        with _quiet_listing(), self._reading(""):
            for key in sorted(self.root.group_keys()):
                with self._reading(key):
                    child = self.root[key]
                walk(child, key + "/")
        return out

    @contextlib.contextmanager
    def _reading(self, where: str) -> Iterator[None]:
        """A store damaged on disk (truncated metadata, a corrupt chunk) is one line naming
        the part, not a decoder's traceback."""
        try:
            yield
        except (KeyError, UsageError):
            raise
        except Exception as e:
            part = f"{self.path.rstrip('/')}/{where}" if where else self.path
            if isinstance(e, ValueError):  # JSON: name the metadata file itself
                part = _bad_metadata_file(self.path) or part
            raise UsageError(f"{part} is damaged and cannot be read ({type(e).__name__}: {message_line(e, 160)})") from e

    def has(self, group: str) -> bool:
        return group in self.groups()

    def __repr__(self) -> str:
        from .display import progress_of

        kind = "measurement store" if self.attrs.get("kind") == "measure" else "run store"
        p = progress_of(self)
        groups = ", ".join(g for g in self.groups() if g != "checkpoints") or "-"
        return (f"<lscape {kind} {self.path!r}: status {self.status}, steps {p['steps_done']}/"
                f"{p['total_steps'] if p['total_steps'] is not None else '?'}, groups {groups}>")

    def _repr_html_(self) -> str:
        from .display import html

        return html(self)

    def group_attrs(self, group: str) -> dict[str, Any]:
        with self._reading(group):
            return self.root[group].attrs.asdict()

    def arrays(self, group: str) -> dict[str, zarr.Array]:
        with self._reading(group):
            g = self.root[group]
            return {name: g[name] for name in sorted(g.array_keys())}

    def read(self, group: str) -> dict[str, np.ndarray]:
        """Every array of ``group`` as numpy, cut to the group's committed rows: a consistent
        prefix even while a run writes the store (read again if a resume truncated the group
        meanwhile: its chunks past the cut may have gone while they were read)."""
        for _ in range(8):
            data, generation = self._read_once(group)
            with self._reading(group), _quiet_listing():
                now = self.root[group].attrs.get(TRUNCATIONS_ATTR, 0)
            if now == generation:
                break
        return data

    def _read_once(self, group: str) -> tuple[dict[str, np.ndarray], int]:
        with self._reading(group), _quiet_listing():
            g = self.root[group]
            arrays = {name: g[name] for name in sorted(g.array_keys())}
        if not arrays or "step" not in arrays and any((a.metadata.dimension_names or ("",))[0] == "step" for a in arrays.values()):
            # the group's first flush is under way (its step array comes last): no rows yet
            return {**{name: a[:0] for name, a in arrays.items()}, "step": np.zeros(0, dtype=np.int64)}, \
                g.attrs.get(TRUNCATIONS_ATTR, 0)
        generation = g.attrs.get(TRUNCATIONS_ATTR, 0)
        with self._reading(f"{group}/step"):
            n = committed_rows(g, arrays)
        out = {}
        for name, a in arrays.items():
            if not a.ndim:
                out[name] = a[...]
                continue
            with self._reading(f"{group}/{name}"):
                value = a[:n]
            if value.shape[0] < n and name != "step":  # an array the writer is creating: not yet filled
                pad = np.full((n - value.shape[0],) + value.shape[1:], _fill_value(value.dtype), dtype=value.dtype)
                value = np.concatenate([value, pad])
            out[name] = value
        m = min((v.shape[0] for v in out.values() if np.ndim(v)), default=0)  # a truncation under way
        return {k: v[:m] if np.ndim(v) else v for k, v in out.items()}, generation

    def to_xarray(self, group: str):
        """``group`` as an ``xarray.Dataset`` with ``step`` as coordinate, cut to the committed
        rows (the live-safe form of ``xarray.open_zarr(path, group=group)``)."""
        try:
            import xarray as xr
        except ImportError:
            raise UsageError("to_xarray needs xarray: pip install xarray") from None
        try:
            data = self.read(group)
        except KeyError:
            raise UsageError(f"{self.path} has no group '{group}' (groups: {', '.join(self.groups()) or 'none'})") from None
        g = self.root[group]
        variables = {}
        with _quiet_listing():
            names = set(g.array_keys())
        for name, value in data.items():
            a = g[name] if name in names else None  # step may not exist yet
            dims = (a.metadata.dimension_names if a is not None else ("step",)) or \
                tuple(f"{name}_dim{i}" for i in range(np.ndim(value)))
            attrs = {k: v for k, v in a.attrs.asdict().items() if k != ALL_CHUNKS_ATTR} if a is not None else {}
            variables[name] = xr.Variable(tuple(dims), value, attrs=attrs)
        coords = {"step": variables.pop("step")} if "step" in variables else {}
        attrs = {k: v for k, v in g.attrs.asdict().items() if k not in (ROWS_ATTR, TRUNCATIONS_ATTR)}
        return xr.Dataset(variables, coords=coords, attrs=attrs)

    @property
    def status(self) -> str | None:
        """The run's status attribute, except that "running" with its writer gone (a killed
        process: status was never updated) reads "killed"."""
        status = self.root.attrs.get("status")
        if status == "running":
            holder = self.writer()
            if holder is not None and holder["alive"] is False:
                return "killed"
        return status

    def writer(self) -> dict[str, Any] | None:
        """Who holds (or last held) the store's writer lock: pid, host, since, and ``alive``
        (``None`` where it cannot be told: another host, or no lock recorded)."""
        try:
            info = self.root[LOCK_GROUP].attrs.asdict()
        except KeyError:
            return None
        except Exception:  # a damaged lock record (random bytes): the OS lock still tells
            local = _local_path(self.path)
            return {"damaged": True, "alive": None if local is None else WriterLock.held(local)}
        return {**info, "alive": _holder_alive(info, _local_path(self.path))}


class WriterLock:
    """The exclusive writer lock of a local run store.

    The lock itself is ``flock`` on the store's folder: the OS drops it when its process dies,
    so a lock left by a killed run is stale by construction and simply taken over. The
    holder's pid, host and start time go into the attributes of the store's ``lock`` group,
    for the message a second writer gets and for readers. Where ``flock`` is missing
    (Windows) the recorded pid is checked instead.
    """

    def __init__(self, local: str, path: str, fd: int | None):
        self.local, self.path, self._fd = local, path, fd

    @classmethod
    def acquire(cls, local: str, path: str, announce: bool = True) -> "WriterLock":
        """Take the lock of the store at ``local`` or raise a one-line ``UsageError``; a lock
        its recorded writer left without releasing (a killed run) is taken over, saying so
        (``announce``)."""
        try:
            import fcntl
        except ImportError:  # no flock: trust the recorded pid
            fcntl = None
        fd = None
        if fcntl is not None:
            fd = os.open(local, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(_busy_message(path, _recorded_holder(local))) from None
            holder = _recorded_holder(local)
            if holder and holder.get("host") != socket.gethostname() and not holder.get("released"):
                # flock does not reach across hosts on every network filesystem
                os.close(fd)
                raise UsageError(_busy_message(path, holder, remote=True))
            if announce and holder and holder.get("released") is False and holder.get("pid") != os.getpid():
                import sys

                print(f"[lscape] {path} was left locked by pid {holder.get('pid')} (since {holder.get('since')}), "
                      "which is gone: taking the store over", file=sys.stderr)
        else:
            holder = _recorded_holder(local)
            if holder and not holder.get("released") and _holder_alive(holder, local):
                raise UsageError(_busy_message(path, holder))
        return cls(local, path, fd)

    @classmethod
    def check(cls, local: str, path: str) -> None:
        """Refuse (one line) when another process holds the lock of the store at ``local``,
        without taking it or writing anything: what a resume checks before its other checks."""
        cls.acquire(local, path, announce=False).release()

    @classmethod
    def held(cls, local: str) -> bool | None:
        """Whether a live process holds the OS lock of the store at ``local`` (``None``: cannot
        be told without flock)."""
        try:
            cls.check(local, local)
        except UsageError:
            return True
        except (ImportError, OSError):
            return None
        return False

    def publish(self, root: zarr.Group) -> None:
        """Record this process as the writer (in the ``lock`` group's attributes); a damaged
        record (a lock group whose metadata is not JSON) is replaced, saying so."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_text(), "released": False,
                "start_ticks": _start_ticks(os.getpid())}
        try:
            root.require_group(LOCK_GROUP).attrs.update(info)
        except Exception as e:  # the lock group holds no children: rewriting it loses nothing
            import sys

            print(f"[lscape] the writer lock record of {self.path} was damaged ({type(e).__name__}); no live "
                  "process holds the store: taking it over", file=sys.stderr)
            zarr.create_group(store=root.store, path=LOCK_GROUP, overwrite=True, attributes=info)
        self._root = root

    def release(self) -> None:
        """Mark the lock released and drop it (idempotent)."""
        root = getattr(self, "_root", None)
        if root is not None:
            try:
                root[LOCK_GROUP].attrs.update({"released": True})
            except Exception:  # the store may be gone (a test deleting it): the OS lock still goes
                pass
            self._root = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


@contextlib.contextmanager
def _quiet_listing() -> Iterator[None]:
    """Listing a live store can meet a writer's half-made node (zarr's ``*.partial`` temporary
    files, a folder whose ``zarr.json`` is being written); zarr warns and skips it, which is
    right for a reader: keep the warning out of the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        yield


def _bad_metadata_file(path: str) -> str | None:
    """The first ``zarr.json`` under a local store that is not valid JSON."""
    local = _local_path(path)
    if local is None:
        return None
    for folder, _, files in sorted(os.walk(local)):
        if "zarr.json" in files:
            name = os.path.join(folder, "zarr.json")
            try:
                with open(name) as f:
                    json.load(f)
            except (OSError, ValueError):
                return name
    return None


def _busy_message(path: str, holder: dict[str, Any] | None, remote: bool = False) -> str:
    who = "another process"
    if holder:
        who = f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
    if remote:
        return (f"{path} is being written by {who}; if that run is dead, delete {path}/{LOCK_GROUP} "
                f"and try again")
    return f"{path} is being written by {who}; wait for it to finish, or choose another --out"


def _recorded_holder(local: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(local, LOCK_GROUP, "zarr.json")) as f:
            return dict(json.load(f).get("attributes") or {})
    except (OSError, ValueError):
        return None


def _holder_alive(info: Mapping[str, Any], local: str | None) -> bool | None:
    """Whether the recorded writer still runs (``None``: cannot be told from here)."""
    if info.get("released"):
        return False
    if local is None or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = info.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)  # a reused pid is another process


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _now_text() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def local_path(path: str) -> str | None:
    """The filesystem path of a local store (``None`` for URL stores such as memory:// or s3://)."""
    if "://" in path and not path.startswith("file://"):
        return None
    return path.removeprefix("file://")


_local_path = local_path


def _writable(arr: zarr.Array) -> zarr.Array:
    """An existing array as its writer appends to it: one written with every chunk keeps so."""
    return arr.with_config(ALL_CHUNKS_CONFIG) if arr.attrs.get(ALL_CHUNKS_ATTR) else arr


def missing_chunks(arr: zarr.Array, rows: int, folder: str | None) -> list[str]:
    """The chunk keys of the first ``rows`` rows of ``arr`` that are missing from the array's
    ``folder`` (a local store's). Only an array written with every chunk
    (``ALL_CHUNKS_ATTR``) or a ``step`` array (never a fill value) can tell: others give []."""
    if folder is None or rows <= 0 or not arr.ndim or not os.path.isdir(folder):
        return []
    if not arr.attrs.get(ALL_CHUNKS_ATTR) and not arr.basename == "step":
        return []
    chunks, shape = arr.chunks, arr.shape
    grid = [range(-(-min(rows, shape[0]) // chunks[0]))] + [range(-(-n // c)) for n, c in zip(shape[1:], chunks[1:])]
    encoding = arr.metadata.chunk_key_encoding
    missing = []
    for coords in itertools.product(*grid):
        key = encoding.encode_chunk_key(coords)
        if not os.path.exists(os.path.join(folder, *key.split("/"))):
            missing.append(key)
    return missing


def stored_config(reader: "RunReader") -> dict[str, Any]:
    """A store's ``config`` attribute, which must be a table (a hand-edited or foreign store's
    may not be): one line when it is not."""
    config = reader.attrs.get("config", {})
    if not isinstance(config, Mapping):
        raise UsageError(f"{reader.path} has a config attribute that is not a table of options "
                         f"({type(config).__name__}): it was not written by lscape, or was edited by hand")
    return dict(config)


def _make_parent(path: str, local: str) -> None:
    parent = os.path.dirname(os.path.abspath(local))
    if os.path.isdir(parent):
        return
    if os.path.exists(parent):
        raise UsageError(f"cannot create {path}: {parent} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror or e}") from None


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
