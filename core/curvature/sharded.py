"""The Hessian of a sharded (FSDP2) model, from finite differences of its own gradients.

Under ``--strategy fsdp`` every parameter is a ``DTensor`` whose rank-local shard is all a
rank holds; the forward all-gathers them block by block, so ``torch.autograd.grad`` cannot
differentiate through them twice (double backward and torch.func fail). Gradients are what
FSDP gives: the backward reduce-scatters them, each rank receiving its shard of the gradient
summed over all ranks' batches. So the products here are central differences of gradients,

    H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε,

taken on the parameters in place (:mod:`lscape.curvature.products`: ``finite_difference``,
the per-dtype step rule ``fd_step`` and the error estimate ‖D(ε) − D(ε/2)‖), with every
vector *sharded like the parameters*: a vector is the concatenation of this rank's local
shards (``dim`` entries) of a global vector of ``global_dim`` entries, and no rank ever
holds a full one. Perturbing θ writes the local shards (which the next forward all-gathers);
θ is put back by copying a saved copy of the local shards (bit-exact). Gradients come from
``loss.backward()`` through the FSDP model (the reduce-scatter of FSDP2 itself), read from
the sharded ``.grad`` and multiplied by the world size (FSDP2 averages over ranks); the
training gradient already in ``.grad`` is put back afterwards, so a probe at
``after_backward`` leaves the step untouched. Every rank runs the same number of forward and
backward passes (the collectives inside them must match): a rank with fewer batches pads with
zero-weight passes over its first batch.

Inner products and norms of sharded vectors are summed over ranks (the operator's
``vectors``, :class:`lscape.curvature.distributed.Vectors`); Lanczos, Hutch++/Hutchinson
and SLQ density read them through :func:`lscape.curvature.distributed.on_vectors`, and
draw their random vectors chunk by chunk from seeds of the global position, so the global
start and probe vectors do not depend on the number of ranks.

Only the Hessian (``kind=hessian``) is available sharded: the Gauss–Newton and Fisher
matrices need forward-mode or per-sample products, and the preconditioned Hessian reads
optimizer state; :func:`check_sharded` says so in one line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lscape.batch import batch_size_of
from lscape.curvature import distributed, products
from lscape.curvature._support import model_state
from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.hessian import Hessian

__all__ = ["ShardedHessian", "is_sharded_model", "check_sharded", "SHARDED_METHOD", "SHARDED_REASON"]

#: the product every sharded operator uses
SHARDED_METHOD = "finite-difference"

#: why (``op.method_reason``, stored as the probes' ``hvp_method_reason``)
SHARDED_REASON = ("sharded parameters (FSDP2): autograd cannot differentiate twice through the all-gathered "
                  "DTensor parameters, so products are central differences of the model's own reduce-scattered "
                  "gradients, vectors sharded like the parameters")


def is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model`` (or one of its submodules) was sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_sharded(kind: str, method: str) -> None:
    """Raise :class:`CurvatureArgumentError` when a sharded model cannot have this matrix or
    product (only the Hessian by finite differences is available)."""
    if kind != "hessian":
        raise CurvatureArgumentError(f"kind={kind} is not available on a sharded (FSDP) model: only the Hessian "
                                     f"(kind=hessian), by finite differences of gradients", "kind")
    if method not in ("auto", SHARDED_METHOD):
        raise CurvatureArgumentError(f"method={method} cannot run on a sharded (FSDP) model: autograd cannot "
                                     f"differentiate twice through FSDP2's gathered parameters; use method=auto "
                                     f"or finite-difference", "method")


def _compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype FSDP2's mixed-precision policy gathers parameters in (None: their own)."""
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            group = get_state()._fsdp_param_group
            dtype = group.mp_policy.param_dtype if group is not None else None
        except AttributeError:
            continue
        if dtype is not None:
            return dtype
    return None


class ShardedHessian(Hessian):
    """The Hessian of an FSDP2-sharded model's loss, on sharded flat vectors.

    Same arguments as :class:`lscape.curvature.hessian.Hessian`; ``method`` must be
    ``"auto"`` or ``"finite-difference"`` (both give finite differences, recorded in
    ``method_reason``). ``dim`` is the length of this rank's vectors (its local shards of
    the selected parameters), ``global_dim`` that of the full vectors; ``vectors`` the
    layout the solvers reduce and draw with. ``fd_eps``/``fd_richardson`` as for any
    operator; the step rule uses the unit roundoff of the dtype the forward computes in
    (``fd_dtype``: the mixed-precision policy's, e.g. bfloat16).
    """

    sharded = True

    def __init__(self, model: nn.Module, loss_fn: Any, batches: Any, params: Any = None, mode: str = "eval",
                 method: str = "auto", cache_graph: bool | None = None, seed: int = 0, chunk: int | None = None,
                 fd_eps: float | None = None, fd_offset: float = 0.0, fd_richardson: bool = False):
        check_sharded("hessian", products.choose_method(method))
        super().__init__(model, loss_fn, batches, params=params, mode=mode, method=SHARDED_METHOD,
                         cache_graph=False, seed=seed, chunk=chunk, fd_eps=fd_eps, fd_offset=fd_offset,
                         fd_richardson=fd_richardson)
        self.method_reason = SHARDED_REASON
        #: the (DTensor) parameters as the model holds them; ``params`` are their local shards
        self.dparams = list(self.params)
        layout = distributed.ShardLayout.of(self.dparams)
        self.params = [_local(p) for p in self.dparams]
        self.dim = layout.dim
        largest = int(_all_max(torch.tensor([float(self.dim)], dtype=torch.float64))[0])
        self.vectors = distributed.Vectors(self.dim, layout, plan_dim=largest)
        self.global_dim = self.vectors.global_dim
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.fd_dtype = _compute_dtype(model) or self.dtype
        self._world = distributed.world_size()
        local = sum(1 for _ in self.iter_batches())
        most, fewest = _all_max(torch.tensor([float(local), -float(local)], dtype=torch.float64))
        #: forward/backward passes per gradient on every rank (the largest local batch count)
        self._passes = int(most)
        if -fewest < 1:  # decided together: one rank raising alone would leave the others waiting
            raise CurvatureArgumentError("every rank needs at least one batch for a sharded curvature operator (the "
                                         "forward and backward passes are collectives)", "batches")

    # -- gradients through the FSDP model ----------------------------------------------------

    def _passes_of(self):
        """(weight, batch index, batch) for this rank's batches, padded with zero-weight passes
        over its first batch to the largest count over ranks."""
        local = list(self.iter_batches())
        for i in range(self._passes):
            if i < len(local):
                yield float(batch_size_of(local[i])), i, local[i]
            else:
                yield 0.0, 0, local[0]

    def gradient_sum(self) -> torch.Tensor:
        """This rank's shard of Σ_ranks Σ_b n_b ∇L_b (flat, ``dim`` entries), through the FSDP
        backward (its reduce-scatter); ``.grad`` is left as found."""
        saved = [p.grad for p in self.dparams]
        for p in self.dparams:
            p.grad = None
        try:
            _reshard(self.model)
            for weight, i, batch in self._passes_of():
                with self.batch_rng(i):
                    loss = self.batch_loss(batch)
                (loss * (weight * self._world)).backward()
            parts = []
            for p, local in zip(self.dparams, self.params):
                g = p.grad
                if g is None:
                    parts.append(torch.zeros_like(local).reshape(-1))
                    continue
                g = g.to_local() if distributed.is_dtensor(g) else g
                parts.append(g.detach().reshape(-1).to(local.dtype))
            return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)
        finally:
            for p, g in zip(self.dparams, saved):
                p.grad = g
            _reshard(self.model)

    def apply(self, vs: torch.Tensor) -> torch.Tensor:
        """H applied to the rows of a (c, dim) block of sharded vectors: finite differences of
        gradients, already summed over ranks by the reduce-scatter, divided by the sample count."""
        with model_state(self.model, self.mode), torch.enable_grad():
            total = products.finite_difference(self, vs)
        total = total / self.num_samples
        pending, self.pending_error = self.pending_error, None
        if pending is not None:
            idx, diff = pending
            err = distributed.row_norms(diff / self.num_samples, sharded=True)
            size = distributed.row_norms(total[idx], sharded=True)
            rel = torch.where(size > 0, err / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(err))
            self.product_error = max(self.product_error or 0.0, float(rel.max()))
        return total

    def gradient(self) -> torch.Tensor:
        """This rank's shard of the size-weighted mean gradient."""
        with model_state(self.model, self.mode), torch.enable_grad():
            return self.gradient_sum() / self.num_samples

    def loss(self) -> float:
        """The size-weighted mean loss over every rank's batches (the same number of forward
        passes on every rank)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad(), model_state(self.model, self.mode):
            for weight, i, batch in self._passes_of():
                with self.batch_rng(i):
                    total += weight * self.batch_loss(batch).double()
        _reshard(self.model)
        return float(distributed.all_reduce_(total)[0]) / self.num_samples

    def first_order_graphs(self):
        raise NotImplementedError("a sharded operator has no first-order graph: its products are finite differences")

    def functional(self, batch: Any):
        raise NotImplementedError("a sharded operator has no functional form: its products are finite differences")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a (DTensor) parameter, sharing its storage (writes reach the
    storage the next forward all-gathers)."""
    if distributed.is_dtensor(p):
        return p.to_local().detach()
    return p.detach()


def _all_max(value: torch.Tensor) -> list[float]:
    """The elementwise maximum of ``value`` over ranks, as floats."""
    out = value.clone()
    if distributed.is_distributed():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return [float(x) for x in out]


def _reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered parameters, so the next forward gathers the local
    shards as they are now (a no-op where they are sharded already)."""
    for m in model.modules():
        reshard = getattr(m, "reshard", None)
        if reshard is not None and hasattr(m, "_get_fsdp_state"):
            reshard()
