"""The Lanczos basis: bounded storage, block reorthogonalisation, the remainder block.

Only the orthonormal basis Q (m rows) and a small block U of remainder directions (u rows,
u ≤ the number of start/fresh directions, 1 for plain Lanczos) are stored; the products are
not. Every product is kept exactly as coefficients (float64, small):

    H q_j = Σ_i T[i, j] q_i + Σ_l B[l, j] u_l      (U orthonormal and orthogonal to Q)

so the Rayleigh–Ritz matrix is T and the residual of a Ritz pair (θ, s) is
‖H Q s − θ Q s‖² = ‖T s − θ s‖² + ‖B s‖², a sum of squares of small float64 vectors: no
cancellation, no Gram matrix. The residual direction of a pair is (B s)ᵀ U, already
orthogonal to Q.

Rows are held in fixed blocks of at most :data:`BLOCK` rows, never more rows than the
``limit`` the memory budget allows (no doubling, no copy when growing), on ``device``
(which may differ from the device the products run on). Dot products with the basis
accumulate in float64 across chunks of :data:`CHUNK` entries (blockwise summation: the
error is that of a CHUNK-long float32 sum, not of a dim-long one), one matrix product per
block and chunk; every dot product goes through :func:`dots64` (the one place a sharded
reduction would hook in).

Cost of one step (m basis rows): the new row's product H q is first reduced by its
coefficients known in advance by symmetry (T[i, m] = T[m, i], the old products' share of
q: for plain Lanczos only q_{m−1} and q itself, a three-term recurrence), then one full
pass ``c = Q w``, ``w −= cᵀQ`` removes what rounding left (two sweeps over the basis); a
second pass runs only when the first removed much (Kahan–Parlett "twice is enough"). A
residual direction is orthogonal to Q by construction and is added without a pass. A
thick restart replaces Q by Q S in place, column chunk by column chunk (no second copy of
the basis).
"""

from __future__ import annotations

import torch

from lscape.curvature import distributed

__all__ = ["Basis", "BLOCK", "CHUNK", "dots64", "norm64"]

BLOCK = 16
CHUNK = 1 << 18


def dots64(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rows @ b`` (rows (r, dim), b (dim,)) accumulated in float64 across chunks, on the CPU, all-reduced
    (summed over ranks for sharded vectors, :func:`lscape.curvature.distributed.reduction`).

    Every inner product of the Lanczos solver goes through here (norms too, :func:`norm64`)."""
    dim = b.shape[0]
    if rows.dtype == torch.float64 or dim <= CHUNK:
        out = (rows @ b).double()
    else:
        out = torch.zeros(rows.shape[0], dtype=torch.float64, device=b.device)
        for start in range(0, dim, CHUNK):
            out += (rows[:, start : start + CHUNK] @ b[start : start + CHUNK]).double()
    return distributed.all_reduce_(out.cpu(), op=distributed.reduction())


def norm64(a: torch.Tensor) -> float:
    """‖a‖ with float64 accumulation (identical on every rank)."""
    return float(dots64(a[None], a)[0].clamp_min(0).sqrt())


class _Blocks:
    """(m, dim) rows stored in fixed blocks of at most BLOCK rows and never more than ``limit``
    rows in all: append, row access, block products, in-place recombination."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = BLOCK,
                 limit: int | None = None):
        self.dim, self.dtype, self.device, self.block = dim, dtype, device, block
        self.limit = limit
        self.blocks: list[torch.Tensor] = []
        self.m = 0
        self.peak_rows = 0

    def __len__(self) -> int:
        return self.m

    def allocated(self) -> int:
        return sum(len(b) for b in self.blocks)

    def _locate(self, i: int) -> tuple[int, int]:
        for b, block in enumerate(self.blocks):
            if i < len(block):
                return b, i
            i -= len(block)
        raise IndexError(i)

    def next_row(self) -> torch.Tensor:
        """The storage of row m (allocated if needed), for a caller to write the next row into."""
        if self.m == self.allocated():
            rows = self.block if self.limit is None else max(1, min(self.block, self.limit - self.m))
            self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device))
            self.peak_rows = max(self.peak_rows, self.allocated())
        b, j = self._locate(self.m)
        return self.blocks[b][j]

    def append(self, row: torch.Tensor) -> None:
        target = self.next_row()
        if row.data_ptr() != target.data_ptr():  # written in place by the caller: no copy
            target.copy_(row)
        self.m += 1

    def row(self, i: int) -> torch.Tensor:
        b, j = self._locate(i)
        return self.blocks[b][j]

    def _views(self):
        start = 0
        for block in self.blocks:
            n = min(len(block), self.m - start)
            if n <= 0:
                break
            yield start, block[:n]
            start += n

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """Q w as float64 (m,)."""
        if not self.m:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([dots64(v, w) for _, v in self._views()])

    def subtract_(self, coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """w −= coefᵀ Q in place (coef (m,) float64): one matrix–vector product per block, no temporary."""
        for start, v in self._views():
            w.addmv_(v.T, coef[start : start + len(v)].to(self.dtype).to(self.device), alpha=-1)
        return w

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        """coefᵀ Q for coef (m,) or (m, r): one vector (dim,) or rows (r, dim), in the basis dtype."""
        vec = coef.ndim == 1
        c = coef[:, None] if vec else coef
        out = torch.zeros(c.shape[1], self.dim, dtype=self.dtype, device=self.device)
        for start, v in self._views():
            out.addmm_(c[start : start + len(v)].T.to(self.dtype).to(self.device), v)  # in place: no temporary
        return out[0] if vec else out

    def recombine_(self, S: torch.Tensor) -> None:
        """Q ← Sᵀ Q in place (S (m, p), p ≤ m): column chunk by column chunk, so the only extra
        storage is one (m, CHUNK) slice; the first p rows are kept, the blocks beyond them freed."""
        m, p = S.shape
        St = S.T.to(self.dtype).to(self.device)
        views = list(self._views())
        for start in range(0, self.dim, CHUNK):
            stop = min(start + CHUNK, self.dim)
            new = torch.zeros(p, stop - start, dtype=self.dtype, device=self.device)
            for at, v in views:  # read every row's chunk before writing any
                new.addmm_(St[:, at : at + len(v)], v[:, start:stop])
            at = 0
            for _, v in views:
                if at >= p:
                    break
                n = min(len(v), p - at)
                v[:n, start:stop] = new[at : at + n]
                at += n
        self.m = p
        keep, total = 0, 0
        for block in self.blocks:
            if total >= p:
                break
            total += len(block)
            keep += 1
        del self.blocks[keep:]


class Basis:
    """Orthonormal basis Q, remainder block U and the float64 coefficients T, B (see the module doc)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = BLOCK,
                 limit: int | None = None):
        self.dim, self.dtype, self.device = dim, dtype, device
        self.Q = _Blocks(dim, dtype, device, block, limit)
        self.U = torch.zeros(0, dim, dtype=dtype, device=device)
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.B = torch.zeros(0, 0, dtype=torch.float64)
        self.peak_u = 0
        self.passes = 0  # full reorthogonalisation passes over the basis (each two sweeps)

    def __len__(self) -> int:
        return len(self.Q)

    @property
    def bytes_per_vector(self) -> int:
        return self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def peak_vectors(self) -> int:
        return self.Q.peak_rows + self.peak_u

    def _pass(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.Q.dots(w)
        self.Q.subtract_(c, w)
        self.passes += 1
        return w, c

    def orthogonalise(self, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        """v minus its projection on Q (v is overwritten), and the norm left (float64).

        One block pass, and a second only when the first removed much ("twice is enough",
        Kahan–Parlett: when ‖v‖ stays above 0.7 of what it was, one pass is already
        orthogonal to working precision).
        """
        n = norm64(v)
        for _ in range(2):
            if not len(self.Q):
                break
            v, _ = self._pass(v)
            before, n = n, norm64(v)
            if n > 0.7 * before:
                break
        return v, n

    def new_direction(self, direction: torch.Tensor) -> torch.Tensor | None:
        """The unit vector ``direction`` adds to the basis (orthogonalised against Q), or None if
        it is (numerically) in it. (A residual direction needs no pass: :meth:`residual_direction`.)"""
        q = direction.to(dtype=self.dtype, device=self.device)
        n0 = norm64(q)
        if n0 == 0.0 or n0 != n0 or n0 == float("inf"):
            return None
        q, n = self.orthogonalise(q / n0)
        if n <= 1e-8:
            return None
        return q.div_(n)

    def append(self, q: torch.Tensor, w: torch.Tensor) -> None:
        """Add the unit vector q (orthogonal to Q) and its product w = H q (w is overwritten)."""
        m = len(self.Q)
        # 1. q takes its share of the old remainders: u_l = a_l q + (u_l − a_l q).
        t_row = torch.zeros(m, dtype=torch.float64)
        if len(self.U):
            a = dots64(self.U, q)
            t_row = a @ self.B
            d, V = torch.linalg.eigh(torch.eye(len(a), dtype=torch.float64) - torch.outer(a, a))
            keep = d > 1e-4  # directions of U that q does not (nearly) contain
            V, d = V[:, keep], d[keep]
            if not len(d):  # q is the whole remainder (plain Lanczos): nothing left of U
                self.U = self.U[:0]
            else:
                U = self.U - a.to(self.dtype).to(self.device)[:, None] * q[None]
                self.U = (V / d.sqrt()).T.to(self.dtype).to(self.device) @ U
            self.B = (V * d.sqrt()).T @ self.B
        self.Q.append(q)
        # 2. w's coefficients on Q: those known by symmetry (T[i, m] = T[m, i]) and q's own
        #    removed first, locally; then one full pass for what rounding left, a second
        #    only when the first removed much.
        w = w.to(dtype=self.dtype, device=self.device)
        col = torch.zeros(m + 1, dtype=torch.float64)
        known = torch.nonzero(t_row).flatten().tolist()
        if len(known) <= max(2, m // 4):
            col[m] = float(dots64(q[None], w)[0])
            w.add_(q, alpha=-col[m].item())
            for i in known:
                w.add_(self.Q.row(i), alpha=-float(t_row[i]))
                col[i] = t_row[i]
            before = norm64(w)
        else:
            before = norm64(w)
        for _ in range(2):
            w, c = self._pass(w)
            col += c
            after = norm64(w)
            if after > 0.7 * before:
                break
            before = after
        nr = after
        b = torch.zeros(len(self.U), dtype=torch.float64)
        for _ in range(2):
            if len(self.U):
                c = dots64(self.U, w)
                w = w - c.to(self.dtype).to(self.device) @ self.U
                b += c
        if len(self.U):
            nr = norm64(w)
        T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        T[:m, :m] = self.T
        T[m, :m] = t_row
        T[:, m] = col
        u = len(self.U)
        scale = max(float(col.abs().max()) if len(col) else 0.0, float(b.abs().max()) if u else 0.0, nr)
        grow = nr > 64 * float(torch.finfo(self.dtype).eps) * scale and nr > 0
        B = torch.zeros(u + int(grow), m + 1, dtype=torch.float64)
        B[:u, :m] = self.B
        B[:u, m] = b
        if grow:
            B[u, m] = nr
            self.U = torch.cat([self.U, w.div_(nr)[None]]) if u else w.div_(nr)[None]
        self.T, self.B = T, B
        self.peak_u = max(self.peak_u, len(self.U))

    def residual_direction(self, coef: torch.Tensor) -> torch.Tensor | None:
        """The unit vector along :meth:`remainder` ``(coef)``, written straight into the storage
        of the next basis row (no copy when it is appended), or None when there is none."""
        if not len(self.U):
            return None
        c = self.B @ coef
        if float(c.norm()) == 0.0:
            return None
        n = float(c.norm())  # U is orthonormal: ‖cᵀU‖ = ‖c‖, no sweep to measure it
        if n != n or n == float("inf"):
            return None
        row = self.Q.next_row()
        return torch.mv(self.U.T, (c / n).to(self.dtype).to(self.device), out=row)

    def remainder(self, coef: torch.Tensor) -> torch.Tensor | None:
        """(B coef)ᵀ U: the part of H Q coef outside span Q (None when there is none)."""
        if not len(self.U):
            return None
        c = self.B @ coef
        if float(c.norm()) == 0.0:
            return None
        return c.to(self.dtype).to(self.device) @ self.U

    def restart(self, S: torch.Tensor) -> None:
        """Thick restart: keep only the Ritz combinations Q S (S (m, p) orthonormal columns), in place."""
        self.Q.recombine_(S)
        self.T = S.T @ self.T @ S
        self.B = self.B @ S
