"""Batches: the seeded training stream, fixed measurement subsets and full-data passes.

The training stream draws a new permutation each epoch from its own ``torch.Generator``,
so probes that sample data (with their own generators) never shift it, and its
``state_dict`` (epoch, position, generator, permutation) resumes it exactly.

Samples are collated by a :class:`Fetcher`: tensor data sets (``TensorDataset`` and
``Subset`` s of one) are indexed in one operation in the main process; every other data set
goes through a ``torch.utils.data.DataLoader`` (``--workers N`` worker processes, pinned
memory on CUDA, persistent workers, prefetch). lscape, not the loader, decides which
samples form a batch (a batch sampler fed by the stream), and every sample is loaded under
a seed derived from the run's seed, the epoch and the sample's index, so random
augmentations are reproducible and a run with ``--workers 2`` stores exactly what
``--workers 0`` stores; in the main process the global RNG is restored around each fetch,
so loading never shifts training's RNG.

An ``IterableDataset`` streams in its own order (no shuffling); resume skips the batches an
epoch had already used, which is exact only when the iterable yields the same sequence
again. Probes' subsets and full passes need a map-style data set.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, default_collate

from .batch import batch_size_of, shard, to_device
from .errors import UsageError

__all__ = ["BatchStream", "quiet_worker", "Fetcher", "take", "to_device", "fixed_batches", "fixed_subset", "full_batches", "batch_size_of",
           "derived_seed", "shard", "default_workers", "close_fetchers"]

Batch = tuple[torch.Tensor, torch.Tensor]


def derived_seed(seed: int, *names: Any) -> int:
    """A seed for a named purpose (a probe's subset, a projection), independent of others."""
    digest = hashlib.sha256(("/".join([str(seed), *map(str, names)])).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker leaves SIGINT and SIGTERM to the main process: a terminal's Ctrl-C
    (or a group kill) reaches every process of the group, and the main one stops the run and
    its workers itself, so a worker prints no traceback of its own. (A worker whose main
    process died exits through torch's own watchdog.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(device: torch.device | str) -> int:
    """Loader workers when ``--workers`` is not given: 0 on CPU (the main process is as
    fast for in-memory data and leaves the cores to the model), min(8, cores) on CUDA."""
    if torch.device(device).type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _tensor_base(dataset: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """``(tensors, index map)`` when ``dataset`` is a tensor data set (or Subsets of one)."""
    mapping = None
    base = dataset
    while isinstance(base, Subset):
        ind = torch.as_tensor(base.indices, dtype=torch.long)
        mapping = ind if mapping is None else ind[mapping]
        base = base.dataset
    # a TensorDataset whose __getitem__ is TensorDataset's own: indexing all at once is the same
    if not isinstance(base, TensorDataset) or type(base).__getitem__ is not TensorDataset.__getitem__:
        return None
    tensors = base.tensors
    if isinstance(tensors, (tuple, list)) and tensors and all(isinstance(t, torch.Tensor) for t in tensors):
        return tuple(tensors), mapping
    return None


class _Seeded(Dataset):
    """Loads ``dataset[index]`` under torch/random/numpy seeds derived from ``(seed, epoch,
    index)``: the same sample of the same epoch gets the same augmentation in any process."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = derived_seed(self.seed, epoch, index)
        # the CPU generator only: torch.manual_seed also (lazily) seeds every accelerator, which
        # cost ~1 ms a sample; transforms draw from this generator
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.dataset[index]


class _IndexBatches:
    """The batch sampler the stream feeds: it yields whatever batches of ``(epoch, index)``
    keys were set last, so persistent workers serve every epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _PreservedRng:
    """Saves and restores the global torch, random and numpy RNGs (main-process fetches)."""

    def __enter__(self) -> None:
        self.torch, self.random, self.numpy = torch.get_rng_state(), random.getstate(), np.random.get_state()

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.torch)
        random.setstate(self.random)
        np.random.set_state(self.numpy)


class Fetcher:
    """Collates batches of sample indices from a data set: one indexing operation for
    tensor data, else a ``DataLoader`` with ``workers`` processes (persistent, prefetching,
    pinned memory when ``pin_memory``)."""

    def __init__(self, dataset: Dataset, seed: int = 0, workers: int = 0, pin_memory: bool = False,
                 prefetch: int = 2):
        self.dataset = dataset
        self.seed = int(seed)
        self.workers = int(workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch = int(prefetch)
        # a data set from a DataLoader with its own collate function (lscape.build.CollatedDataset)
        self.collate_fn = getattr(dataset, "collate_fn", None) or default_collate
        self.tensor = _tensor_base(dataset) if self.collate_fn is default_collate else None
        self._sampler = _IndexBatches()
        self._loader: DataLoader | None = None

    @property
    def loader(self) -> DataLoader:
        if self._loader is None:
            w = self.workers
            self._loader = DataLoader(
                _Seeded(self.dataset, self.seed), batch_sampler=self._sampler, num_workers=w,
                collate_fn=self.collate_fn, pin_memory=self.pin_memory, persistent_workers=w > 0,
                prefetch_factor=self.prefetch if w > 0 else None, worker_init_fn=quiet_worker if w > 0 else None,
                # the loader's own base seed comes from this generator, never the global RNG
                generator=torch.Generator().manual_seed(self.seed),
            )
        return self._loader

    def take(self, indices: torch.Tensor | Sequence[int], epoch: int = -1) -> Any:
        """The samples at ``indices`` collated into one batch."""
        return next(self.iterate([indices], epoch))

    def iterate(self, index_batches: Iterable[torch.Tensor | Sequence[int]], epoch: int = -1) -> Iterator[Any]:
        """Batches for each index batch, in order (prefetched by the workers)."""
        if self.tensor is not None:
            tensors, mapping = self.tensor
            for idx in index_batches:
                idx = torch.as_tensor(idx, dtype=torch.long)
                mapped = idx if mapping is None else mapping[idx]
                yield tuple(t[mapped] for t in tensors)
            return
        self._sampler.batches = [[(epoch, int(i)) for i in torch.as_tensor(idx).tolist()] for idx in index_batches]
        if self.workers == 0:
            it = iter(self.loader)
            while True:
                with _PreservedRng():
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                yield batch
        else:
            yield from self.loader

    def close(self) -> None:
        """Stop the worker processes (persistent workers otherwise live until exit)."""
        loader, self._loader = self._loader, None
        if loader is not None:
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()


def take(dataset: Dataset, indices: torch.Tensor | Sequence[int], epoch: int = -1, seed: int = 0) -> Any:
    """The samples at ``indices`` collated into one batch (fast path for tensor data)."""
    return Fetcher(dataset, seed=seed).take(indices, epoch)


class BatchStream:
    """Shuffled minibatches, epoch after epoch, reproducible from ``seed``.

    ``batch_size=None`` means full-batch: every step sees the whole training set (in the
    same order, since order does not change a mean loss). ``workers``/``pin_memory`` are the
    loader's (see :class:`Fetcher`).
    """

    def __init__(self, dataset: Dataset, batch_size: int | None, seed: int, device: torch.device | str = "cpu",
                 drop_last: bool = False, shuffle: bool = True, workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.device = device
        self.drop_last = drop_last
        self.iterable = isinstance(dataset, IterableDataset)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch = 0
        self.position = 0
        self._perm: torch.Tensor | None = None
        self._full_batch: Any = None
        self._it: Iterator[Any] | None = None
        self._pending: Any = None
        if self.iterable:
            if batch_size is None:
                raise UsageError("--batch-size full needs a map-style data set (an IterableDataset has no length)")
            self.n = None
            self.batch_size = int(batch_size)
            self.full = False
            self.shuffle = False
            self._iterable_loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=workers,
                                               pin_memory=pin_memory, drop_last=drop_last,
                                               persistent_workers=workers > 0,
                                               worker_init_fn=quiet_worker if workers > 0 else None,
                                               generator=torch.Generator().manual_seed(int(seed)))
            self.fetcher = None
            return
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError("the training set is empty")
        self.batch_size = self.n if batch_size is None else min(int(batch_size), self.n)
        self.full = batch_size is None or self.batch_size >= self.n
        self.shuffle = shuffle and not self.full
        self.fetcher = Fetcher(dataset, seed=derived_seed(seed, "samples"), workers=workers, pin_memory=pin_memory)

    @property
    def steps_per_epoch(self) -> int | None:
        if self.n is None:
            return None
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return -(-self.n // self.batch_size)

    def next(self) -> tuple[Any, int, bool]:
        """``(batch, epoch, epoch_end)``: the next minibatch, its epoch, and whether it is
        the last of that epoch. Advances the stream."""
        if self.iterable:
            return self._next_iterable()
        if self.full:
            epoch = self.epoch
            self.epoch += 1
            if self.fetcher.tensor is not None:  # the same tensors every step: keep them on the device
                if self._full_batch is None:
                    self._full_batch = to_device(self.fetcher.take(torch.arange(self.n)), self.device)
                return self._full_batch, epoch, True
            # a loaded data set is loaded again each step (its augmentations differ per epoch)
            size = max(1, min(self.n, 256))
            parts = list(self.fetcher.iterate([torch.arange(s, min(self.n, s + size)) for s in range(0, self.n, size)],
                                              epoch))
            return to_device(_concat(parts), self.device), epoch, True
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        if self._it is None:
            bs, steps = self.batch_size, self.steps_per_epoch
            self._it = self.fetcher.iterate([self._perm[k * bs:(k + 1) * bs] for k in range(self.position, steps)],
                                            self.epoch)
        batch = next(self._it)
        epoch = self.epoch
        self.position += 1
        end = self.position >= self.steps_per_epoch
        if end:
            self.epoch += 1
            self.position = 0
            self._perm = None
            self._it = None
        return to_device(batch, self.device), epoch, end

    def _next_iterable(self) -> tuple[Any, int, bool]:
        if self._it is None:
            self._it = iter(self._iterable_loader)
            for _ in range(self.position):  # resume: skip what this epoch already used
                next(self._it, None)
            self._pending = next(self._it, None)
            if self._pending is None:
                raise UsageError("the training data (an IterableDataset) yielded no batch")
        batch, self._pending = self._pending, next(self._it, None)
        epoch, end = self.epoch, self._pending is None
        self.position += 1
        if end:
            self.epoch += 1
            self.position = 0
            self._it = None
        return to_device(batch, self.device), epoch, end

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self.generator.get_state(),
            "perm": self._perm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
        self._perm = state["perm"]
        self._it = None

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()


def _concat(parts: list[Any]) -> Any:
    """Batches joined along the sample dimension (tuples, dicts, tensors)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def _need_map_style(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise UsageError(f"{what} needs a map-style data set (with a length); the data is an IterableDataset")


def fixed_subset(dataset: Dataset, samples: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 workers: int = 0) -> list[Any]:
    """``min(samples, len)`` samples drawn once, without replacement, from a seeded
    generator, in batches of at most ``batch_size`` (the last may be smaller)."""
    _need_map_style(dataset, "a fixed measurement subset")
    n = len(dataset)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: max(1, min(int(samples), n))]
    size = max(1, min(int(batch_size), perm.numel()))
    fetcher = Fetcher(dataset, seed=seed, workers=workers)
    try:
        return [to_device(b, device) for b in fetcher.iterate([perm[i:i + size] for i in range(0, perm.numel(), size)])]
    finally:
        fetcher.close()


def fixed_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                  device: torch.device | str = "cpu", workers: int = 0) -> list[Any]:
    """``count`` disjoint batches of ``batch_size`` drawn once, without replacement, from a
    seeded generator (at least one; never more than the data holds)."""
    _need_map_style(dataset, "a fixed measurement subset")
    n = len(dataset)  # type: ignore[arg-type]
    batch_size = min(batch_size, n)
    count = max(1, min(count, n // batch_size))
    return fixed_subset(dataset, count * batch_size, batch_size, seed, device, workers)


def full_batches(dataset: Dataset, batch_size: int, device: torch.device | str = "cpu",
                 workers: int = 0, cache: dict | None = None) -> Iterator[Any]:
    """The whole data set in order, in batches of at most ``batch_size``. With ``cache`` (a
    run's ``ctx.cache``) the loader and its workers are kept for the next pass (evaluation
    every epoch) and stopped by :func:`close_fetchers` at the run's end."""
    _need_map_style(dataset, "a full-data pass")
    n = len(dataset)  # type: ignore[arg-type]
    key = ("fetcher", id(dataset), workers)
    fetcher = Fetcher(dataset, workers=workers) if cache is None else cache.get(key)
    if fetcher is None:
        fetcher = cache[key] = Fetcher(dataset, workers=workers)
    try:
        for batch in fetcher.iterate([torch.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]):
            yield to_device(batch, device)
    finally:
        if cache is None:
            fetcher.close()


def close_fetchers(cache: dict) -> None:
    """Stop the loader workers that :func:`full_batches` kept in ``cache``."""
    for key in [k for k in cache if isinstance(k, tuple) and k and k[0] == "fetcher"]:
        cache.pop(key).close()


def __getattr__(name: str) -> Any:
    # `lscape.data.from_hf` was documented before HuggingFace data sets got their home among the
    # workloads: a compatibility alias, resolved by name so that the core imports no plugin.
    if name == "from_hf":
        import importlib

        return importlib.import_module("lscape.plugins.workloads.formats").from_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
