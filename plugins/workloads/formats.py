"""Readers for the files the seeds' data sets come in: IDX (MNIST), CIFAR python batches, text; and
HuggingFace ``datasets`` objects as torch data sets (`from_hf`)."""

from __future__ import annotations

import gzip
import importlib
import pickle
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lscape.errors import UsageError

__all__ = ["read_idx", "read_cifar_batch", "read_bytes", "find_file", "from_hf", "HFDataset"]

# IDX type codes (the third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, raw or gzipped) as an array of its shape.

    The magic number is two zero bytes, a type code and the number of dimensions; the
    sizes follow as big-endian int32, then the data in C order.
    """
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UsageError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); expected e.g. MNIST's train-images-idx3-ubyte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path} is a truncated IDX file (header cut short)")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise UsageError(f"{path} is a malformed IDX file: header says {shape}, {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_batch(path: Path) -> dict[bytes, Any]:
    """One CIFAR "python version" batch: the pickled dict with ``b'data'`` (N, 3072) uint8
    and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'``/``b'coarse_labels'`` (CIFAR-100).

    Unpickling is restricted to numpy arrays and builtin containers, so a tampered file
    cannot run code.
    """
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a CIFAR python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch:
        raise UsageError(f"{path} is not a CIFAR python batch: no b'data' entry")
    return batch


def read_bytes(path: Path) -> bytes:
    """The content of ``path``, decompressed when it is gzipped (detected by its magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UsageError(f"{path} is a damaged gzip file ({e})") from e
    return raw


def find_file(dirs: Iterable[Path], names: Iterable[str]) -> Path | None:
    """The first of ``dir/name`` that exists, trying every name in every directory, plain and ``.gz``."""
    for d in dirs:
        for name in names:
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


class _ArrayUnpickler(pickle.Unpickler):
    # What numpy arrays pickle as (protocols 2-5, numpy 1 and 2 module names), and the
    # codec that Python-2 pickles of byte strings use.
    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):
            # numpy 2 renamed numpy.core to numpy._core; old pickles use the old name.
            try:
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


class HFDataset(Dataset):
    """A map-style view of a HuggingFace ``datasets.Dataset`` (or any sequence of dicts)
    whose samples are dicts of tensors."""

    def __init__(self, data: Any, columns: Sequence[str] | None, tuple_of: Sequence[str] | None):
        self.data = data
        self.columns = list(columns) if columns else None
        self.tuple_of = list(tuple_of) if tuple_of else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        row = self.data[int(index)]
        cols = self.tuple_of or self.columns or list(row)
        missing = [c for c in cols if c not in row]
        if missing:
            raise KeyError(f"the data set has no column '{missing[0]}' (columns: {', '.join(row)})")
        values = {c: torch.as_tensor(row[c]) for c in cols}
        return tuple(values[c] for c in self.tuple_of) if self.tuple_of else values


def from_hf(data: Any, columns: Sequence[str] | None = None, tuple_of: Sequence[str] | None = None) -> Dataset:
    """A HuggingFace ``datasets`` object as a torch ``Dataset``.

    Samples become dicts of tensors (``model(**batch)``, labels under ``labels``), or, with
    ``tuple_of=("pixel_values", "label")``, ``(x, y)`` tuples. ``columns`` keeps only those
    columns (drop the text a tokenizer left behind). A ``DatasetDict`` gives
    ``{"train": ..., "eval": ...}`` from its ``train`` and ``validation``/``test`` splits.
    """
    if hasattr(data, "keys") and "train" in data.keys() and not hasattr(data, "column_names") \
            or isinstance(data, dict):
        held = next((k for k in ("validation", "eval", "test") if k in data), None)
        out = {"train": HFDataset(data["train"], columns, tuple_of)}
        if held is not None:
            out["eval"] = HFDataset(data[held], columns, tuple_of)
        return out  # type: ignore[return-value]
    return HFDataset(data, columns, tuple_of)
