"""Batches: the seeded training stream, fixed measurement subsets and full-data passes.

The training stream draws a new permutation each epoch from its own ``torch.Generator``,
so probes that sample data (with their own generators) never shift it, and its
``state_dict`` resumes it exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Subset, default_collate

from .batch import batch_size_of, shard, to_device

__all__ = ["BatchStream", "take", "to_device", "fixed_batches", "full_batches", "batch_size_of", "derived_seed",
           "shard"]

Batch = tuple[torch.Tensor, torch.Tensor]


def derived_seed(seed: int, *names: str) -> int:
    """A seed for a named purpose (a probe's subset, a projection), independent of others."""
    digest = hashlib.sha256(("/".join([str(seed), *names])).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def take(dataset: Dataset, indices: torch.Tensor | Sequence[int]) -> Any:
    """The samples at ``indices`` collated into one batch (fast path for tensor data)."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    base, mapped = dataset, idx
    while isinstance(base, Subset):
        mapped = torch.as_tensor(base.indices, dtype=torch.long)[mapped]
        base = base.dataset
    tensors = getattr(base, "tensors", None)
    if isinstance(tensors, (tuple, list)) and tensors and all(isinstance(t, torch.Tensor) for t in tensors):
        return tuple(t[mapped] for t in tensors)
    return default_collate([dataset[int(i)] for i in idx])


class BatchStream:
    """Shuffled minibatches, epoch after epoch, reproducible from ``seed``.

    ``batch_size=None`` means full-batch: every step sees the whole training set (in the
    same order, since order does not change a mean loss).
    """

    def __init__(self, dataset: Dataset, batch_size: int | None, seed: int, device: torch.device | str = "cpu",
                 drop_last: bool = False, shuffle: bool = True):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError("the training set is empty")
        self.batch_size = self.n if batch_size is None else min(int(batch_size), self.n)
        self.full = batch_size is None or self.batch_size >= self.n
        self.device = device
        self.drop_last = drop_last
        self.shuffle = shuffle and not self.full
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch = 0
        self.position = 0
        self._perm: torch.Tensor | None = None
        self._full_batch: Any = None

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return max(1, self.n // self.batch_size)
        return -(-self.n // self.batch_size)

    def next(self) -> tuple[Any, int, bool]:
        """``(batch, epoch, epoch_end)``: the next minibatch, its epoch, and whether it is
        the last of that epoch. Advances the stream."""
        if self.full:
            if self._full_batch is None:
                self._full_batch = to_device(take(self.dataset, torch.arange(self.n)), self.device)
            epoch = self.epoch
            self.epoch += 1
            return self._full_batch, epoch, True
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        start = self.position * self.batch_size
        idx = self._perm[start : start + self.batch_size]
        epoch = self.epoch
        self.position += 1
        end = self.position >= self.steps_per_epoch
        if end:
            self.epoch += 1
            self.position = 0
            self._perm = None
        return to_device(take(self.dataset, idx), self.device), epoch, end

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


def fixed_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                  device: torch.device | str = "cpu") -> list[Any]:
    """``count`` disjoint batches drawn once, without replacement, from a seeded generator."""
    n = len(dataset)  # type: ignore[arg-type]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    batch_size = min(batch_size, n)
    count = max(1, min(count, n // batch_size))
    return [to_device(take(dataset, perm[i * batch_size:(i + 1) * batch_size]), device) for i in range(count)]


def full_batches(dataset: Dataset, batch_size: int, device: torch.device | str = "cpu") -> Iterator[Any]:
    """The whole data set in order, in batches of at most ``batch_size``."""
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        yield to_device(take(dataset, torch.arange(start, min(n, start + batch_size))), device)
