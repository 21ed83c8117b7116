"""The shared base of every curvature matrix: batches, parameters, modes, RNG, graph cache, reduction.

A curvature operator is a symmetric matrix M over the selected parameters θ of a model,
for the size-weighted mean loss over its batches, L = Σ_b n_b L_b / Σ_b n_b with ``L_b``
the batch-mean loss. Its whole contract is on flat vectors of length ``dim``:
``matvec(v)`` → M v, ``matmat(V)`` → rows M vᵢ, plus ``gradient()``, ``loss()`` and
``release()``. A subclass says what M is:

- a matrix computed from per-batch products sets ``product`` (a name in
  :data:`lscape.curvature.products.PRODUCTS`, or ``None`` to take the ``method`` asked for)
  and, for an output-space matrix Jᵀ M_out J, implements ``output_matrix``;
- a matrix built from another one (a preconditioned or scaled Hessian) overrides
  :meth:`CurvatureOperator.apply`, which maps a (c, dim) block to M applied to its rows,
  already summed over ranks and divided by the sample count.

Every forward pass goes through the one batch→loss adapter (:class:`lscape.batch.BatchAdapter`),
so tuple batches, dict batches and HuggingFace models all work. The model is left as found:
``.grad`` is never written, train/eval flags are restored after every product, buffers are
restored only when a forward pass actually wrote them, and in train mode dropout masks are
drawn from a fixed per-batch seed inside a forked RNG, so that the operator is the same
symmetric matrix at every product and the training RNG is untouched. Bad arguments raise
:class:`lscape.curvature.errors.CurvatureArgumentError` (a ``ValueError`` naming the argument)
or ``TypeError``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from lscape import activity
from lscape import params as lparams
from lscape.batch import BatchAdapter, as_adapter, batch_size_of, chunks, to_device
from lscape.curvature import distributed, products
from lscape.curvature._support import as_batches, model_state, resolve_params, seeded_rng
from lscape.curvature.errors import CurvatureArgumentError

__all__ = ["CurvatureOperator", "MODES", "LossFn"]

MODES = ("eval", "train")

# Caching keeps every batch's activations alive; beyond a handful of batches the memory is
# better spent elsewhere and each product recomputes the forward pass.
DEFAULT_CACHE_LIMIT = 8

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CurvatureOperator:
    """A curvature matrix of a model's loss over fixed batches, as a linear operator on flat vectors.

    ``model`` any ``nn.Module``; ``loss_fn`` a batch-mean ``loss_fn(output, target)`` or a
    :class:`lscape.batch.BatchAdapter` (dict batches, HF models, the model's own loss);
    ``batches`` a list of batches (a single ``(x, y)`` tuple or dict, or any re-iterable such
    as a DataLoader); ``params`` None (all trainable parameters), glob patterns for
    :func:`lscape.params.select_parameters` or a list of the model's parameters; ``mode``
    ``"eval"`` or ``"train"`` (the module mode during products); ``method`` the product
    method (:data:`lscape.curvature.products.METHODS`; matrices with a fixed product
    ignore it); ``cache_graph`` keeps the first-order graph of each batch for matrices
    whose product uses it (default: at most 8 listed batches and no ``chunk``; a cached
    operator describes the parameters at its first product); ``seed`` fixes dropout masks
    (train mode) and any sampling; ``chunk`` splits every batch into pieces of at most that
    many samples; ``fd_eps``/``fd_offset`` the finite-difference step (None: the per-dtype
    rule of :func:`lscape.curvature.products.fd_step`) and denominator offset;
    ``fd_richardson`` Richardson-extrapolated finite differences. With ``method="auto"``
    the first product chooses the product (:func:`lscape.curvature.products.ladder`) and
    records it in ``method``, ``method_reason`` and ``method_check``; see :meth:`describe`.
    After each product ``peak_memory`` holds the peak CUDA bytes (None on the CPU).
    """

    #: the registry name of the matrix (``kind``)
    name: ClassVar[str] = ""
    #: the product method this matrix always uses, or None to follow ``method``
    product: ClassVar[str | None] = None
    #: whether the matrix needs the loss as a function of the output (a separable loss)
    needs_output_loss: ClassVar[bool] = False
    #: whether parameters and vectors are sharded across ranks (each rank a slice): inner
    #: products are then summed over ranks, not averaged (:class:`lscape.curvature.sharded.ShardedHessian`)
    sharded: ClassVar[bool] = False
    #: whether the matrix reads the training optimizer (passed as ``optimizer=``, e.g. its
    #: preconditioner); probes pass the run's optimizer to such a matrix and ask
    #: :meth:`check_optimizer` before the store exists
    needs_optimizer: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | BatchAdapter,
        batches: Any,
        params: Any = None,
        mode: str = "eval",
        method: str = "auto",
        cache_graph: bool | None = None,
        seed: int = 0,
        chunk: int | None = None,
        fd_eps: float | None = None,
        fd_offset: float = 0.0,
        fd_richardson: bool = False,
    ):
        if mode not in MODES:
            raise CurvatureArgumentError(f"unknown mode {mode!r}; choose 'eval' or 'train'", "mode")
        if chunk is not None and int(chunk) < 1:
            raise CurvatureArgumentError(f"chunk must be a positive number of samples, not {chunk}", "chunk")
        if fd_eps is not None and fd_eps <= 0:
            raise CurvatureArgumentError(f"the finite-difference step fd_eps must be positive, not {fd_eps}", "fd_eps")
        self.method = products.choose_method(method, self.product)
        #: why ``method`` is the product used ("auto": decided on the first product by the ladder)
        self.method_reason: str | None = (
            f"the matrix's own product (kind={self.name})" if self.product is not None
            else None if self.method == "auto" else f"asked for (method={self.method})")
        #: the ladder's measurements on the first product (method="auto"), else None
        self.method_check: dict[str, Any] | None = None
        self.model = model
        self.adapter = as_adapter(loss_fn)
        self.loss_fn = self.adapter.loss_fn
        self.check_loss(self.adapter)
        self.batches = as_batches(batches)
        self.named_params = resolve_params(model, params)
        self.names = [n for n, _ in self.named_params]
        self.params = [p for _, p in self.named_params]
        self.mode = mode
        self.kind = self.name
        self.seed = seed
        self.chunk = int(chunk) if chunk is not None else None
        self.fd_eps = float(fd_eps) if fd_eps is not None else None
        self.fd_offset = float(fd_offset)
        self.fd_richardson = bool(fd_richardson)
        #: the length of a finite-difference move ‖εv‖ (ε = fd_length/‖v‖), set by a probe's
        #: ``fd_eps`` option; None: ``fd_eps`` or the per-dtype rule
        self.fd_length: float | None = None
        #: largest relative error estimate of a finite-difference product so far (None: none made)
        self.product_error: float | None = None
        #: ‖θ‖ of the selected parameters (the finite-difference step rule), once computed
        self.theta_norm: float | None = None
        #: error rows of a finite-difference product waiting for their reduction
        self.pending_error: Any = None
        self.dim = lparams.numel(self.params)
        #: the length of the whole vectors (= ``dim`` unless the operator's vectors are sharded
        #: across ranks, each rank holding ``dim`` of them: :class:`lscape.curvature.ShardedHessian`)
        self.global_dim = self.dim
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0
        self.peak_memory: int | None = None
        #: why the operator did not use the method asked for, if it did not (stored by probes)
        self.fallback: str | None = None
        listed = isinstance(self.batches, (list, tuple))
        if cache_graph is None:
            cache_graph = listed and len(self.batches) <= DEFAULT_CACHE_LIMIT and self.chunk is None
        self.cache_graph = bool(cache_graph) and listed and products.uses_graph(self.method)
        # The global sample count, summed over ranks: products are divided by it.
        local = sum(batch_size_of(b) for b in self.iter_batches())
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        self.num_samples = float(distributed.all_reduce_(total)[0])
        if self.num_samples <= 0:
            raise CurvatureArgumentError("the curvature operator needs at least one non-empty batch", "batches")
        self._cached: list[tuple[float, list[torch.Tensor]]] | None = None

    @classmethod
    def check_loss(cls, adapter: BatchAdapter) -> None:
        """Raise :class:`CurvatureArgumentError` when the matrix cannot be formed for this loss
        (a :class:`lscape.batch.BatchAdapter`); callers may ask before building an operator."""
        if cls.needs_output_loss and not adapter.separable:
            raise CurvatureArgumentError(f"kind={cls.name} needs the loss as a function of the model's output (a "
                                         f"separable loss), not the model's own loss: pass a loss function, or use "
                                         f"kind=hessian", "loss_fn")

    @classmethod
    def check_optimizer(cls, optimizer: Any) -> None:
        """Raise :class:`CurvatureArgumentError` (argument ``"optimizer"``) when a matrix that
        ``needs_optimizer`` cannot be formed for this optimizer (none given, no rule for it)."""

    @classmethod
    def describe_matrix(cls, optimizer: Any = None) -> dict[str, str]:
        """What the matrix is, as attributes a probe stores beside its arrays (default none;
        a derived matrix says e.g. ``{"matrix": "P^-1/2 H P^-1/2 (adam)"}``)."""
        return {}

    # -- the flat-vector contract -----------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return M v for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, the operator acts on ({self.dim},)")
        v = v.detach().to(dtype=self.dtype, device=self.device)
        out = self._measured(v.unsqueeze(0))[0]
        self._count(1)
        return out

    __call__ = matvec

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """Return M V for a block of flat vectors ``vs`` of shape (c, dim), as rows (c, dim)."""
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise ValueError(f"block has shape {tuple(vs.shape)}, expected (c, {self.dim})")
        vs = vs.detach().to(dtype=self.dtype, device=self.device)
        out = self._measured(vs)
        self._count(vs.shape[0])
        return out

    def apply(self, vs: torch.Tensor) -> torch.Tensor:
        """M applied to the rows of a (c, dim) block: Σ_b n_b M_b V over local batches, summed
        over ranks and divided by the global sample count. The one method a derived matrix
        (preconditioned, scaled, shifted) overrides."""
        with model_state(self.model, self.mode), torch.enable_grad():  # probes may run under no_grad
            if self.method == "auto":  # the first product: choose the product (and record why)
                return products.ladder(self, vs)
            return products.reduce_product(self, products.PRODUCTS[self.method](self, vs))

    def gradient(self) -> torch.Tensor:
        """The size-weighted mean gradient over the operator's batches (flat, all-reduced)."""
        with model_state(self.model, self.mode), torch.enable_grad():
            total = self.gradient_sum()
        return distributed.all_reduce_(total).div_(self.num_samples)

    def gradient_sum(self) -> torch.Tensor:
        """Σ_b n_b ∇L_b over this rank's batches (flat, not reduced), at the parameters as they
        are, in the current module state: the gradient path every gradient of the operator
        takes (finite-difference products too)."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for i, batch in enumerate(self.iter_batches()):
            with self.batch_rng(i):
                loss = self.batch_loss(batch)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            total += batch_size_of(batch) * lparams.flatten(grads, like=self.params).detach()
        return total

    def describe(self) -> dict[str, Any]:
        """The product in use and its error, for the record (probes store it in their attrs):
        ``method``, ``method_reason``, ``product_error`` (relative, finite differences; None
        otherwise), ``fd_richardson`` and ``check`` (the ladder's measurements, or None)."""
        return {"method": self.method, "method_reason": self.method_reason, "product_error": self.product_error,
                "fd_richardson": self.fd_richardson, "check": self.method_check}

    def loss(self) -> float:
        """The size-weighted mean loss over the operator's batches (all-reduced)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad(), model_state(self.model, self.mode):
            for i, batch in enumerate(self.iter_batches()):
                with self.batch_rng(i):
                    total += batch_size_of(batch) * self.batch_loss(batch).double()
        return float(distributed.all_reduce_(total)[0]) / self.num_samples

    def release(self) -> None:
        """Drop cached graphs (they hold the activations of every batch)."""
        self._cached = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, kind={self.kind!r}, method={self.method!r}, "
            f"mode={self.mode!r}, batches={len(self.batches) if hasattr(self.batches, '__len__') else '?'}, "
            f"num_products={self.num_products})"
        )

    # -- what the product methods use ------------------------------------------------------

    def output_matrix(self, i: int, out: torch.Tensor, target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """u ↦ M_out u in output space for batch ``i``'s output (output-space matrices only)."""
        raise NotImplementedError(f"{type(self).__name__} is not an output-space matrix")

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The batch-mean loss of the model on ``batch``."""
        return self.adapter.loss(self.model, batch)

    def iter_batches(self) -> Iterable[Any]:
        """The batches on the operator's device, split into chunks when asked."""
        for batch in self.batches:
            batch = to_device(batch, self.device)
            yield from chunks(batch, self.chunk)

    def batch_rng(self, i: int):
        """A forked RNG with a fixed seed per batch in train mode (fixed dropout masks)."""
        if self.mode != "train":
            return contextlib.nullcontext()
        return seeded_rng(self.seed * 1_000_003 + i, self.device)

    def first_order_graphs(self) -> Iterable[tuple[float, list[torch.Tensor]]]:
        """(n_b, ∇L_b with its graph) per batch; built once and kept when ``cache_graph``."""
        if self._cached is not None:
            yield from self._cached
            return
        built = []
        for i, batch in enumerate(self.iter_batches()):
            with self.batch_rng(i):
                loss = self.batch_loss(batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
            item = (float(batch_size_of(batch)), grads)
            if self.cache_graph:
                built.append(item)
            yield item
        if self.cache_graph:
            self._cached = built

    def functional(self, batch: Any):
        """``(output_of, loss_of)``: (output, target) and the loss as functions of a dict of the
        selected parameters (the others and the buffers held fixed), for torch.func."""
        selected_names = set(self.names)
        fixed = {n: t for n, t in self.model.named_parameters() if n not in selected_names}
        fixed.update(dict(self.model.named_buffers()))
        model, adapter = self.model, self.adapter

        def as_model(selected: dict[str, torch.Tensor]):
            # Behaves like the model, so the adapter can call it as model(x) or model(**batch).
            return lambda *a, **k: torch.func.functional_call(model, (selected, fixed), a, k, strict=False)

        def output_of(selected: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
            return adapter.output(as_model(selected), batch)

        def loss_of(selected: dict[str, torch.Tensor]) -> torch.Tensor:
            return adapter.loss(as_model(selected), batch)

        return output_of, loss_of

    # -- bookkeeping ----------------------------------------------------------------------

    def _measured(self, vs: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = self.apply(vs)
        self.peak_memory = int(torch.cuda.max_memory_allocated(self.device)) if cuda else None
        return out

    def _count(self, n: int) -> None:
        self.num_products += n
        activity.tick(n, unit="HVPs")
