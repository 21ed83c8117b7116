"""The Lanczos basis: bounded storage, block reorthogonalisation, the remainder block.

Only the orthonormal basis Q (m rows) and a small block U of remainder directions (u rows,
u ≤ the number of start/fresh directions, 1 for plain Lanczos) are stored; the products are
not. Every product is kept exactly as coefficients (float64, small):

    H q_j = Σ_i T[i, j] q_i + Σ_l B[l, j] u_l      (U orthonormal and orthogonal to Q)

so the Rayleigh–Ritz matrix is T and the residual of a Ritz pair (θ, s) is
‖H Q s − θ Q s‖² = ‖T s − θ s‖² + ‖B s‖², a sum of squares of small float64 vectors: no
cancellation, no Gram matrix. The residual direction of a pair is (B s)ᵀ U, already
orthogonal to Q.

Rows are held in fixed blocks of :data:`BLOCK` (no doubling, no copy when growing) on
``device`` (which may differ from the device the products run on). Dot products with the
basis accumulate in float64 across chunks of :data:`CHUNK` entries (blockwise summation:
the error is that of a CHUNK-long float32 sum, not of a dim-long one), one matrix product
per block: ``c = Q w`` then ``w -= cᵀ Q``, twice.
"""

from __future__ import annotations

import torch

from lscape.curvature import distributed

__all__ = ["Basis", "BLOCK", "CHUNK", "dots64", "norm64"]

BLOCK = 16
CHUNK = 1 << 16


def dots64(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rows @ b`` (rows (r, dim), b (dim,)) accumulated in float64 across chunks, on the CPU, all-reduced
    (summed over ranks for sharded vectors, :func:`lscape.curvature.distributed.reduction`)."""
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
    """(m, dim) rows stored in fixed blocks of BLOCK rows: append, row access, block products."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = BLOCK):
        self.dim, self.dtype, self.device, self.block = dim, dtype, device, block
        self.blocks: list[torch.Tensor] = []
        self.m = 0
        self.peak_rows = 0

    def __len__(self) -> int:
        return self.m

    def allocated(self) -> int:
        return len(self.blocks) * self.block

    def append(self, row: torch.Tensor) -> None:
        if self.m == self.allocated():
            self.blocks.append(torch.empty(self.block, self.dim, dtype=self.dtype, device=self.device))
            self.peak_rows = max(self.peak_rows, self.allocated())
        self.blocks[self.m // self.block][self.m % self.block] = row
        self.m += 1

    def row(self, i: int) -> torch.Tensor:
        return self.blocks[i // self.block][i % self.block]

    def _views(self):
        for b, block in enumerate(self.blocks):
            n = min(self.block, self.m - b * self.block)
            if n <= 0:
                break
            yield b * self.block, block[:n]

    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """Q w as float64 (m,)."""
        if not self.m:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([dots64(v, w) for _, v in self._views()])

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        """coefᵀ Q for coef (m,) or (m, r): one vector (dim,) or rows (r, dim), in the basis dtype."""
        vec = coef.ndim == 1
        c = coef[:, None] if vec else coef
        out = torch.zeros(c.shape[1], self.dim, dtype=self.dtype, device=self.device)
        for start, v in self._views():
            out.addmm_(c[start : start + len(v)].T.to(self.dtype).to(self.device), v)  # in place: no temporary
        return out[0] if vec else out

    def replace(self, rows: torch.Tensor) -> None:
        """Make ``rows`` the whole content (keeping the storage already allocated)."""
        self.m = 0
        keep = -(-len(rows) // self.block)
        del self.blocks[keep:]
        for r in rows:
            self.append(r)


class Basis:
    """Orthonormal basis Q, remainder block U and the float64 coefficients T, B (see the module doc)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, block: int = BLOCK):
        self.dim, self.dtype, self.device = dim, dtype, device
        self.Q = _Blocks(dim, dtype, device, block)
        self.U = torch.zeros(0, dim, dtype=dtype, device=device)
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.B = torch.zeros(0, 0, dtype=torch.float64)
        self.peak_u = 0

    def __len__(self) -> int:
        return len(self.Q)

    @property
    def bytes_per_vector(self) -> int:
        return self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def peak_vectors(self) -> int:
        return self.Q.peak_rows + self.peak_u

    def orthogonalise(self, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        """v minus its projection on Q, and the norm left (float64).

        One block pass, and a second only when the first removed much ("twice is enough",
        Kahan–Parlett: when ‖v‖ stays above 0.7 of what it was, one pass is already
        orthogonal to working precision). Residual directions are orthogonal to Q by
        construction, so they cost one pass (two sweeps over the basis), not two.
        """
        n = norm64(v)
        for _ in range(2):
            if not len(self.Q):
                break
            v = v - self.Q.combine(self.Q.dots(v))
            before, n = n, norm64(v)
            if n > 0.7 * before:
                break
        return v, n

    def new_direction(self, direction: torch.Tensor) -> torch.Tensor | None:
        """The unit vector ``direction`` adds to the basis, or None if it is (numerically) in it."""
        q = direction.to(dtype=self.dtype, device=self.device)
        n0 = norm64(q)
        if n0 == 0.0 or n0 != n0 or n0 == float("inf"):
            return None
        q, n = self.orthogonalise(q / n0)
        if n <= 1e-8:
            return None
        return q / n

    def append(self, q: torch.Tensor, w: torch.Tensor) -> None:
        """Add the unit vector q (orthogonal to Q) and its product w = H q."""
        m = len(self.Q)
        # 1. q takes its share of the old remainders: u_l = a_l q + (u_l − a_l q).
        t_row = torch.zeros(m, dtype=torch.float64)
        if len(self.U):
            a = dots64(self.U, q)
            t_row = a @ self.B
            d, V = torch.linalg.eigh(torch.eye(len(a), dtype=torch.float64) - torch.outer(a, a))
            keep = d > 1e-4  # directions of U that q does not (nearly) contain
            V, d = V[:, keep], d[keep]
            U = self.U - a.to(self.dtype).to(self.device)[:, None] * q[None]
            self.U = (V / d.sqrt()).T.to(self.dtype).to(self.device) @ U
            self.B = (V * d.sqrt()).T @ self.B
        self.Q.append(q)
        # 2. w's coefficients on Q (two block passes) and its remainder.
        w = w.to(dtype=self.dtype, device=self.device)
        col = torch.zeros(m + 1, dtype=torch.float64)
        for _ in range(2):
            c = self.Q.dots(w)
            w = w - self.Q.combine(c)
            col += c
        b = torch.zeros(len(self.U), dtype=torch.float64)
        for _ in range(2):
            if len(self.U):
                c = dots64(self.U, w)
                w = w - c.to(self.dtype).to(self.device) @ self.U
                b += c
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
            self.U = torch.cat([self.U, (w / nr)[None]])
        self.T, self.B = T, B
        self.peak_u = max(self.peak_u, len(self.U))

    def remainder(self, coef: torch.Tensor) -> torch.Tensor | None:
        """(B coef)ᵀ U: the part of H Q coef outside span Q (None when there is none)."""
        if not len(self.U):
            return None
        c = self.B @ coef
        if float(c.norm()) == 0.0:
            return None
        return c.to(self.dtype).to(self.device) @ self.U

    def restart(self, S: torch.Tensor) -> None:
        """Thick restart: keep only the Ritz combinations Q S (S (m, p) orthonormal columns)."""
        rows = self.Q.combine(S)
        self.Q.replace(rows)
        self.T = S.T @ self.T @ S
        self.B = self.B @ S
