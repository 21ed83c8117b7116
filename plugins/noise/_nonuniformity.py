"""Non-uniformity of the per-sample Hessians (Wu, Ma, E 2018), matrix-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.utils._pytree import tree_map
from torch import nn
from torch.func import grad, jvp, vmap

from lscape.params import flatten, unflatten
from lscape.batch import as_adapter, batch_size_of, chunks

from ._per_sample import Batch, LossFn, Params, frozen_state, functional_model, model_mode, named_params

__all__ = ["HessianVarianceOperator", "NonUniformity", "nonuniformity", "stability_margins"]


class HessianVarianceOperator:
    """The operator v ↦ (1/n) Σ_i H_i(H_i v) − H(H v) on flat vectors.

    H_i is the Hessian of sample i's loss and H their mean, so the operator is
    (1/n) Σ_i (H_i − H)², symmetric positive semi-definite. Each product costs three
    chunked passes of per-sample Hessian-vector products (forward-over-reverse with
    torch.func); no matrix is ever formed. It follows the toolkit's operator protocol
    (``matvec``, ``dim``, ``num_products``, ``params``) so that lscape.curvature's
    eigensolvers accept it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        params: Params = None,
        chunk_size: int = 32,
        mode: str | None = "eval",
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.named = named_params(model, params)
        self.params = [p for _, p in self.named]
        self.chunk_size = chunk_size
        self.mode = mode
        self.n = sum(batch_size_of(b) for b in self.batches)
        self.dim = sum(p.numel() for p in self.params)
        self.num_products = 0
        p0 = self.params[0]
        self.dtype, self.device = p0.dtype, p0.device

        adapter = as_adapter(loss_fn)

        def sample_loss(theta, frozen, sample):
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
            return adapter.loss(functional_model(model, theta, frozen), one)

        def sample_hvp(theta, frozen, sample, v):
            return jvp(lambda t: grad(sample_loss)(t, frozen, sample), (theta,), (v,))[1]

        self._hvp_shared = vmap(sample_hvp, in_dims=(None, None, 0, None), randomness="different")
        self._hvp_own = vmap(sample_hvp, in_dims=(None, None, 0, 0), randomness="different")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_i H_i² v − H² v for a flat vector v."""
        theta = {n: p.detach() for n, p in self.named}
        frozen = frozen_state(self.model, self.named)
        names = [n for n, _ in self.named]
        v = v.to(self.dtype)
        vd = dict(zip(names, unflatten(v, self.params)))
        with model_mode(self.model, self.mode), torch.no_grad():
            # pass 1, chunk by chunk: u_i = H_i v, then H_i u_i at once, so that memory
            # stays bounded by the chunk; Hv = mean u_i is complete only after the pass
            own_sum, hv = torch.zeros_like(v), torch.zeros_like(v)
            for piece in self._chunks():
                u = self._hvp_shared(theta, frozen, piece, vd)
                hv += flatten([u[n].sum(0) for n in names])
                own = self._hvp_own(theta, frozen, piece, u)
                own_sum += flatten([own[n].sum(0) for n in names])
            hv /= self.n
            # pass 2: H(Hv) = mean_i H_i (Hv)
            hvd = dict(zip(names, unflatten(hv, self.params)))
            shared_sum = torch.zeros_like(v)
            for piece in self._chunks():
                shared = self._hvp_shared(theta, frozen, piece, hvd)
                shared_sum += flatten([shared[n].sum(0) for n in names])
            out = own_sum - shared_sum
        self.num_products += 1
        # (1/n) Σ H_i u_i − (1/n) Σ H_i Hv = (1/n) Σ H_i² v − H² v
        return out / self.n

    def _chunks(self):
        for batch in self.batches:
            yield from chunks(batch, self.chunk_size)


@dataclass
class NonUniformity:
    """Result of :func:`nonuniformity`."""

    value: float
    """sqrt(λ_max((1/n) Σ H_i² − H²))."""
    eigenvalue: float
    """λ_max((1/n) Σ H_i² − H²)."""
    num_products: int
    converged: bool


def nonuniformity(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: Params = None,
    chunk_size: int = 32,
    mode: str | None = "eval",
    iters: int = 30,
    tol: float = 1e-4,
    seed: int = 0,
) -> NonUniformity:
    """Non-uniformity sqrt(λ_max((1/n)Σ_i H_i² − H²)) over all samples of ``batches``.

    Top eigenvalue by Lanczos from lscape.curvature on :class:`HessianVarianceOperator`;
    ``seed`` fixes the random start so the probe does not consume the training RNG.
    """
    op = HessianVarianceOperator(model, loss_fn, batches, params, chunk_size, mode)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v0 = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    lam, converged = _top_eigenvalue(op, v0, iters, tol)
    lam = max(lam, 0.0)  # PSD: a tiny negative value is rounding
    return NonUniformity(math.sqrt(lam), lam, op.num_products, converged)


def stability_margins(sharpness: float, nonuniformity: float, lr: float, batch_size: int) -> dict[str, float]:
    """Wu, Ma, E (2018) linear-stability margins; SGD is stable only where both are ≤ 1.

    ``sharpness_margin`` = λ_max·η/2 (from λ_max ≤ 2/η) and ``nonuniformity_margin`` =
    non-uniformity·η/√B (from non-uniformity ≤ √B/η).
    """
    return {
        "sharpness_margin": sharpness * lr / 2.0,
        "nonuniformity_margin": nonuniformity * lr / math.sqrt(batch_size),
    }


def _top_eigenvalue(op, v0: torch.Tensor, iters: int, tol: float) -> tuple[float, bool]:
    """Largest eigenvalue of a PSD operator: the toolkit's Lanczos."""
    from lscape.curvature import lanczos

    res = lanczos(op, k=1, which="LA", tol=tol, max_iter=iters, v0=v0)
    ev = res.eigenvalues
    conv = res.converged
    return float(ev[0] if hasattr(ev, "__len__") else ev), bool(conv[0] if hasattr(conv, "__len__") else conv)
