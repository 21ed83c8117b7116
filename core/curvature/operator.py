"""Exact Hessian- and Gauss-Newton-vector products of a model's loss over a fixed set of batches.

The operator computes H v (or G v) for the size-weighted mean loss over its batches,
L = Σ_b n_b L_b / Σ_b n_b, with ``L_b`` the batch-mean loss. It leaves the model as it
found it: ``.grad`` is never written (``torch.autograd.grad`` and ``torch.func`` do not
touch it), train/eval flags and buffers are restored after every product, and in train
mode dropout masks are drawn from a fixed per-batch seed inside a forked RNG, so that the
operator is the same symmetric matrix at every product and the training RNG is untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lscape import activity
from lscape import params as lparams
from lscape.curvature import distributed
from lscape.errors import UsageError

__all__ = ["HessianOperator", "gradient", "METHODS", "KINDS", "MODES"]

METHODS = ("auto", "double-backward", "forward-over-reverse")
KINDS = ("hessian", "ggn")
MODES = ("eval", "train")

# Caching keeps every batch's activations alive; beyond a handful of batches the memory is
# better spent elsewhere and each product recomputes the forward pass.
_DEFAULT_CACHE_LIMIT = 8

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HessianOperator:
    """The Hessian (or generalised Gauss–Newton matrix) of a model's loss as a linear operator.

    ``model`` any ``nn.Module``; ``loss_fn(output, target)`` returns the batch-mean loss;
    ``batches`` a list of ``(x, y)`` batches (a single ``(x, y)`` tuple, or any re-iterable
    such as a DataLoader over the full training set); ``params`` None (all trainable
    parameters), glob patterns for :func:`lscape.params.select_parameters` (``"fc1.*"``,
    ``["layer1", "layer2"]``), or a list of the model's parameters; ``mode`` ``"eval"`` or
    ``"train"`` (the module mode during products); ``method`` ``"double-backward"``,
    ``"forward-over-reverse"`` or ``"auto"``; ``kind`` ``"hessian"`` or ``"ggn"``
    (Gauss–Newton, J^T ∇²_out L J, positive semi-definite for convex losses such as
    cross-entropy and MSE). ``cache_graph`` keeps the first-order graph of each batch so that
    a product costs one extra backward pass instead of a forward and two backwards (default:
    when there are at most 8 batches held in a list). A cached operator describes the
    parameters at its first product: build a new operator after the parameters change.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        params: Any = None,
        mode: str = "eval",
        method: str = "auto",
        kind: str = "hessian",
        cache_graph: bool | None = None,
        seed: int = 0,
    ):
        method = method.replace("_", "-")
        if method not in METHODS:
            raise UsageError(f"unknown HVP method {method!r}; choose one of {', '.join(METHODS)}")
        if kind not in KINDS:
            raise UsageError(f"unknown curvature kind {kind!r}; choose 'hessian' or 'ggn'")
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose 'eval' or 'train'")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _as_batches(batches)
        self.named_params = _resolve_params(model, params)
        self.names = [n for n, _ in self.named_params]
        self.params = [p for _, p in self.named_params]
        self.mode = mode
        self.kind = kind
        self.seed = seed
        self.dim = lparams.numel(self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0
        listed = isinstance(self.batches, (list, tuple))
        if cache_graph is None:
            cache_graph = listed and len(self.batches) <= _DEFAULT_CACHE_LIMIT
        self.cache_graph = bool(cache_graph) and listed and kind == "hessian"
        self.method = _choose_method(method, self.cache_graph, kind)
        # The global sample count, summed over ranks: products are divided by it.
        local = sum(_batch_size(b) for b in self._iter_batches())
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        self.num_samples = float(distributed.all_reduce_(total)[0])
        if self.num_samples <= 0:
            raise UsageError("the curvature operator needs at least one non-empty batch")
        self._cached: list[tuple[float, list[torch.Tensor]]] | None = None

    # -- public ---------------------------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return H v (or G v) for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, the operator acts on ({self.dim},)")
        v = v.detach().to(dtype=self.dtype, device=self.device)
        out = self._product(v.unsqueeze(0))[0]
        self.num_products += 1
        activity.tick(1, unit="HVPs")
        return out

    __call__ = matvec

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """Return H V for a block of flat vectors ``vs`` of shape (c, dim), as rows (c, dim)."""
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise ValueError(f"block has shape {tuple(vs.shape)}, expected (c, {self.dim})")
        vs = vs.detach().to(dtype=self.dtype, device=self.device)
        out = self._product(vs)
        self.num_products += vs.shape[0]
        activity.tick(vs.shape[0], unit="HVPs")
        return out

    def gradient(self) -> torch.Tensor:
        """The size-weighted mean gradient over the operator's batches (flat, all-reduced)."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with _model_state(self.model, self.mode), torch.enable_grad():
            for i, batch in enumerate(self._iter_batches()):
                with self._batch_rng(i):
                    loss = self._loss(batch)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += _batch_size(batch) * lparams.flatten(grads, like=self.params).detach()
        return distributed.all_reduce_(total).div_(self.num_samples)

    def loss(self) -> float:
        """The size-weighted mean loss over the operator's batches (all-reduced)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad(), _model_state(self.model, self.mode):
            for i, batch in enumerate(self._iter_batches()):
                with self._batch_rng(i):
                    total += _batch_size(batch) * self._loss(batch).double()
        return float(distributed.all_reduce_(total)[0]) / self.num_samples

    def release(self) -> None:
        """Drop cached graphs (they hold the activations of every batch)."""
        self._cached = None

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, kind={self.kind!r}, method={self.method!r}, "
            f"mode={self.mode!r}, batches={len(self.batches) if hasattr(self.batches, '__len__') else '?'}, "
            f"num_products={self.num_products})"
        )

    # -- products -------------------------------------------------------------------------

    def _product(self, vs: torch.Tensor) -> torch.Tensor:
        """Σ_b n_b H_b V over local batches, all-reduced and divided by the global count."""
        total = torch.zeros_like(vs)
        # Probes may run under no_grad; the products need autograd regardless.
        with _model_state(self.model, self.mode), torch.enable_grad():
            if self.kind == "ggn":
                for i, batch in enumerate(self._iter_batches()):
                    total += _batch_size(batch) * self._ggn_batch(i, batch, vs)
            elif self.method == "double-backward":
                for i, (weight, grads) in enumerate(self._first_order_graphs()):
                    total += weight * self._double_backward(grads, vs)
            else:
                for i, batch in enumerate(self._iter_batches()):
                    total += _batch_size(batch) * self._forward_over_reverse(i, batch, vs)
        return distributed.all_reduce_(total).div_(self.num_samples)

    def _first_order_graphs(self) -> Iterable[tuple[float, list[torch.Tensor]]]:
        """(n_b, ∇L_b with its graph) per batch; built once and kept when caching."""
        if self._cached is not None:
            yield from self._cached
            return
        built = []
        for i, batch in enumerate(self._iter_batches()):
            with self._batch_rng(i):
                loss = self._loss(batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
            item = (float(_batch_size(batch)), grads)
            if self.cache_graph:
                built.append(item)
            yield item
        if self.cache_graph:
            self._cached = built

    def _double_backward(self, grads: list[torch.Tensor], vs: torch.Tensor) -> torch.Tensor:
        """H_b V by differentiating g·v; V's rows are batched through autograd's vmap."""
        live = [(g, p, j) for j, (g, p) in enumerate(zip(grads, self.params)) if g.requires_grad]
        out = torch.zeros_like(vs)
        if not live:  # the loss is linear in these parameters
            return out
        parts = _unflatten_rows(vs, self.params)
        outputs = [g for g, _, _ in live]
        cotangents = [parts[j] for _, _, j in live]
        retain = True  # cached graphs are reused; uncached ones may serve several rows
        if vs.shape[0] == 1:
            hv = torch.autograd.grad(outputs, self.params, [c[0] for c in cotangents], retain_graph=retain, allow_unused=True)
            return lparams.flatten(hv, like=self.params).detach().unsqueeze(0)
        if vs.device.type == "cpu":
            # Measured: on CPU autograd's batched (vmapped) backward of a CNN is ~1.7x slower
            # than one backward per row, so rows go one at a time there.
            for r in range(vs.shape[0]):
                hv = torch.autograd.grad(outputs, self.params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
                out[r] = lparams.flatten(hv, like=self.params).detach()
            return out
        try:
            hv = torch.autograd.grad(outputs, self.params, cotangents, retain_graph=retain, allow_unused=True, is_grads_batched=True)
            return torch.cat([_rows(h, p, vs.shape[0]) for h, p in zip(hv, self.params)], dim=1).detach()
        except RuntimeError:
            # Some operators have no batching rule: fall back to one row at a time.
            for r in range(vs.shape[0]):
                hv = torch.autograd.grad(outputs, self.params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
                out[r] = lparams.flatten(hv, like=self.params).detach()
            return out

    def _functional(self, batch: Batch):
        """Loss and output as functions of the selected parameters (others held fixed)."""
        x, y = batch
        fixed = {n: t for n, t in self.model.named_parameters() if n not in set(self.names)}
        fixed.update(dict(self.model.named_buffers()))
        model = self.model

        def output_of(selected: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(model, (selected, fixed), (x,), strict=False)

        def loss_of(selected: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_fn(output_of(selected), y)

        return output_of, loss_of

    def _forward_over_reverse(self, i: int, batch: Batch, vs: torch.Tensor) -> torch.Tensor:
        """H_b V as the directional derivative (jvp) of the gradient function (grad)."""
        _, loss_of = self._functional(batch)
        primal = {n: p.detach() for n, p in self.named_params}
        grad_fn = torch.func.grad(loss_of)

        def hvp(v_flat: torch.Tensor) -> torch.Tensor:
            tangent = dict(zip(self.names, lparams.unflatten(v_flat, self.params)))
            _, hv = torch.func.jvp(grad_fn, (primal,), (tangent,))
            return lparams.flatten([hv[n] for n in self.names])

        if vs.shape[0] == 1 or vs.device.type == "cpu":  # vmap is slower than a loop on CPU
            rows = []
            for v in vs:
                with self._batch_rng(i):  # the same dropout mask for every row
                    rows.append(hvp(v))
            return torch.stack(rows).detach()
        with self._batch_rng(i):
            # One dropout mask for all rows: they are columns of the same matrix.
            return torch.func.vmap(hvp, randomness="same")(vs).detach()

    def _ggn_batch(self, i: int, batch: Batch, vs: torch.Tensor) -> torch.Tensor:
        """G_b V = J^T (∇²_out L_b) J V: forward-mode J v, output Hessian product, then a vjp."""
        output_of, _ = self._functional(batch)
        x, y = batch
        primal = {n: p.detach() for n, p in self.named_params}
        out_rows = torch.zeros_like(vs)
        with self._batch_rng(i):
            out, pullback = torch.func.vjp(output_of, primal)
        # ∇_out L with its graph, so that (∇²_out L) u is one more backward for any loss.
        out = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (loss_grad,) = torch.autograd.grad(self.loss_fn(out, y), out, create_graph=True)
        for r in range(vs.shape[0]):
            tangent = dict(zip(self.names, lparams.unflatten(vs[r], self.params)))
            with self._batch_rng(i):
                _, jv = torch.func.jvp(output_of, (primal,), (tangent,))
            if loss_grad.requires_grad:
                (hjv,) = torch.autograd.grad(loss_grad, out, jv, retain_graph=True)
            else:  # the loss is linear in the output
                hjv = torch.zeros_like(jv)
            (back,) = pullback(hjv)
            out_rows[r] = lparams.flatten([back[n] for n in self.names]).detach()
        return out_rows

    # -- helpers --------------------------------------------------------------------------

    def _loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def _iter_batches(self) -> Iterable[Batch]:
        for batch in self.batches:
            yield _to_pair(batch, self.device)

    def _batch_rng(self, i: int):
        """A forked RNG with a fixed seed per batch in train mode (fixed dropout masks)."""
        if self.mode != "train":
            return contextlib.nullcontext()
        return _seeded_rng(self.seed * 1_000_003 + i, self.device)


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    params: Any = None,
    mode: str = "eval",
) -> torch.Tensor:
    """The size-weighted mean gradient of the loss over ``batches`` as a flat vector.

    Same conventions as :class:`HessianOperator`; ``.grad``, modes and buffers are untouched.
    """
    return HessianOperator(model, loss_fn, batches, params=params, mode=mode, cache_graph=False).gradient()


# -- module state -------------------------------------------------------------------------


@contextlib.contextmanager
def _model_state(model: nn.Module, mode: str):
    """Set ``mode`` for the duration, then restore every module's flag and every buffer.

    In train mode BatchNorm layers normalise with batch statistics as usual but do not
    update their running statistics (``track_running_stats`` is switched off meanwhile),
    which keeps the forward pass free of in-place buffer writes that torch.func forbids.
    """
    flags = [(m, m.training) for m in model.modules()]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tracking = []
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    tracking.append(m)
                    m.track_running_stats = False
        yield
    finally:
        for m in tracking:
            m.track_running_stats = True
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in saved_buffers:
                b.copy_(saved)


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(seed)
        yield


# -- parameters and batches ---------------------------------------------------------------


def _resolve_params(model: nn.Module, params: Any) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs from None, glob pattern(s) or a list of the model's parameters."""
    if params is None:
        chosen = lparams.select_parameters(model)
    elif isinstance(params, str) or (
        isinstance(params, (list, tuple)) and params and all(isinstance(p, str) for p in params)
    ):
        try:
            chosen = lparams.select_parameters(model, include=params)
        except ValueError as err:
            raise UsageError(f"{err}; list the model's parameters with model.named_parameters()") from None
    else:
        by_id = {id(p): n for n, p in model.named_parameters()}
        chosen = []
        for p in params:
            if isinstance(p, tuple):  # (name, parameter) pairs from select_parameters
                p = p[1]
            if id(p) not in by_id:
                raise UsageError("a tensor in `params` is not a parameter of the model; pass names or model parameters")
            chosen.append((by_id[id(p)], p))
    if not chosen:
        raise UsageError("no trainable parameters selected for the curvature operator")
    return chosen


def _as_batches(batches: Any) -> Any:
    """A list of batches (one (x, y) pair is one batch); re-iterables are kept as they are."""
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches):
        return [tuple(batches)]
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise UsageError("the curvature operator needs at least one batch")
        return list(batches)
    if iter(batches) is batches:  # a one-shot iterator: materialise so every product sees the same data
        return list(batches)
    return batches


def _to_pair(batch: Any, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        x, y = batch["x"] if "x" in batch else batch["input"], batch["y"] if "y" in batch else batch["target"]
    else:
        x, y = batch[0], batch[1]
    return x.to(device), y.to(device)


def _batch_size(batch: Any) -> int:
    """The weight of a batch in the mean: its number of examples (leading dimension)."""
    x = batch["x"] if isinstance(batch, dict) and "x" in batch else batch[0]
    return int(x.shape[0])


def _unflatten_rows(vs: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a (c, d) block into per-parameter blocks shaped (c, *p.shape)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vs[:, offset : offset + n].reshape(vs.shape[0], *t.shape))
        offset += n
    return out


def _rows(h: torch.Tensor | None, p: torch.Tensor, c: int) -> torch.Tensor:
    if h is None:
        return torch.zeros(c, p.numel(), dtype=p.dtype, device=p.device)
    return h.reshape(c, -1)


def _choose_method(method: str, cached: bool, kind: str) -> str:
    """Resolve "auto" to the faster exact product.

    Measured on the benchmark CNN (benchmarks/curvature.py, 2 CPU cores, torch 2.13): with
    a cached first-order graph a double-backward product is one backward pass (about 0.9× a
    gradient); uncached it is about 1.5× a gradient, against about 2× for torch.func
    forward-over-reverse. Double backward is the default either way; the GGN needs torch.func.
    """
    if kind == "ggn":
        return "forward-over-reverse"
    return "double-backward" if method == "auto" else method
