"""Seeded Johnson–Lindenstrauss random projection, generated block by block from its seed."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["RandomProjection"]


class RandomProjection:
    """The linear map y = P x from R^n to R^dim with a reproducible random P.

    ``kind="gaussian"``: P has i.i.d. N(0, 1/dim) entries, so E‖Px‖² = ‖x‖² and pairwise
    distances are kept within a relative error of about √(2/dim) (Johnson–Lindenstrauss).
    P is never built whole unless it fits in ``cache_bytes``: it is a sequence of column
    blocks ``P[:, b·block:(b+1)·block]``, each drawn from its own generator seeded with
    ``(seed, b)``, so any block can be regenerated on demand and the same seed always
    gives the same map. ``kind="sparse"``: a sparse JL map (Kane & Nelson 2014) with
    ``nnz`` entries ±1/√nnz per column — the same guarantee in expectation at O(nnz·n)
    cost per vector, for models where the dense product is too slow.

    ``project`` accepts a flat vector ``(n,)`` or a batch ``(T, n)``.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        seed: int = 0,
        kind: str = "gaussian",
        block: int = 65536,
        cache_bytes: int = 256 * 2**20,
        nnz: int = 8,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if kind not in ("gaussian", "sparse"):
            raise ValueError(f"unknown projection kind '{kind}' (use gaussian or sparse)")
        if dim < 1 or n < 1:
            raise ValueError("projection needs positive dimensions")
        self.n, self.dim, self.seed, self.kind = int(n), int(dim), int(seed), kind
        self.block = int(block)
        self.nnz = int(min(nnz, dim))
        self.device, self.dtype = torch.device(device), dtype
        per_block = self.dim * self.block * 4 if kind == "gaussian" else self.nnz * self.block * 12
        n_blocks = math.ceil(self.n / self.block)
        self._cache: dict[int, object] | None = {} if per_block * n_blocks <= cache_bytes else None

    @property
    def num_blocks(self) -> int:
        """Number of column blocks."""
        return math.ceil(self.n / self.block)

    def matrix_block(self, b: int) -> torch.Tensor:
        """The dense column block ``b`` of P, shape ``(dim, width)`` (for tests and small n)."""
        lo, hi = b * self.block, min((b + 1) * self.block, self.n)
        if self.kind == "gaussian":
            return self._gaussian_block(b)
        rows, vals = self._sparse_block(b)
        m = torch.zeros(self.dim, hi - lo, dtype=self.dtype, device=self.device)
        cols = torch.arange(hi - lo, device=self.device).repeat_interleave(self.nnz)
        m.index_put_((rows.reshape(-1), cols), vals.reshape(-1), accumulate=True)
        return m

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x for a flat vector ``(n,)`` or each row of ``(T, n)``; returns ``(dim,)`` or ``(T, dim)``."""
        single = x.dim() == 1
        xs = x.reshape(1, -1) if single else x
        if xs.shape[1] != self.n:
            raise ValueError(f"projection expects vectors of length {self.n}, got {xs.shape[1]}")
        xs = xs.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(xs.shape[0], self.dim, dtype=self.dtype, device=self.device)
        for b in range(self.num_blocks):
            lo, hi = b * self.block, min((b + 1) * self.block, self.n)
            xb = xs[:, lo:hi]
            if self.kind == "gaussian":
                out.addmm_(xb, self._gaussian_block(b).T)
            else:
                rows, vals = self._sparse_block(b)  # (width, nnz) each
                contrib = xb[:, :, None] * vals[None]  # (T, width, nnz)
                out.index_add_(1, rows.reshape(-1), contrib.reshape(xs.shape[0], -1))
        return out[0] if single else out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)

    def _generator(self, b: int) -> torch.Generator:
        # SeedSequence mixes (seed, block) so neighbouring seeds give unrelated blocks
        s = int(np.random.SeedSequence([self.seed, b]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator(device="cpu").manual_seed(s)

    def _gaussian_block(self, b: int) -> torch.Tensor:
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        width = min((b + 1) * self.block, self.n) - b * self.block
        m = torch.randn(self.dim, width, generator=self._generator(b), dtype=torch.float32)
        m = (m / math.sqrt(self.dim)).to(device=self.device, dtype=self.dtype)
        if self._cache is not None:
            self._cache[b] = m
        return m

    def _sparse_block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        width = min((b + 1) * self.block, self.n) - b * self.block
        g = self._generator(b)
        # rows drawn with replacement: a collision sums two ±1/√nnz entries, which keeps
        # E‖Px‖² = ‖x‖² and avoids a (width, dim) permutation workspace
        rows = torch.randint(self.dim, (width, self.nnz), generator=g)
        signs = torch.randint(0, 2, (width, self.nnz), generator=g).to(torch.float32) * 2 - 1
        vals = (signs / math.sqrt(self.nnz)).to(device=self.device, dtype=self.dtype)
        out = (rows.to(self.device), vals)
        if self._cache is not None:
            self._cache[b] = out
        return out
