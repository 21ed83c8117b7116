"""Exact Hessian-, Gauss-Newton- and Fisher-vector products of a model's loss over a fixed set of batches.

The operator computes H v (or G v, F v) for the size-weighted mean loss over its batches,
L = Σ_b n_b L_b / Σ_b n_b, with ``L_b`` the batch-mean loss. Every forward pass goes through
the one batch→loss adapter (:class:`lscape.batch.BatchAdapter`), so tuple batches, dict
batches (``model(**batch)``) and HuggingFace models (``ModelOutput.logits``/``.loss``) all
work. It leaves the model as it found it: ``.grad`` is never written (``torch.autograd.grad``
and ``torch.func`` do not touch it), train/eval flags are restored after every product,
buffers are restored only when a forward pass actually wrote them (so a cached graph, or a
user's pending backward pass, that saved a BatchNorm buffer stays valid), and in train mode
dropout masks are drawn from a fixed per-batch seed inside a forked RNG, so that the operator
is the same symmetric matrix at every product and the training RNG is untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lscape import activity
from lscape import params as lparams
from lscape.batch import BatchAdapter, as_adapter, batch_size_of, chunks, sequence_of_batches, to_device
from lscape.curvature import distributed
from lscape.errors import UsageError

__all__ = ["HessianOperator", "gradient", "METHODS", "KINDS", "MODES"]

METHODS = ("auto", "double-backward", "forward-over-reverse", "finite-difference")
KINDS = ("hessian", "ggn", "fisher", "empirical-fisher")
MODES = ("eval", "train")

# Caching keeps every batch's activations alive; beyond a handful of batches the memory is
# better spent elsewhere and each product recomputes the forward pass.
_DEFAULT_CACHE_LIMIT = 8

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HessianOperator:
    """The Hessian (or Gauss–Newton matrix, or a Fisher matrix) of a model's loss as a linear operator.

    ``model`` any ``nn.Module``; ``loss_fn`` a batch-mean ``loss_fn(output, target)`` or a
    :class:`lscape.batch.BatchAdapter` (``ctx.adapter`` in a probe; dict batches, HF models,
    the model's own loss); ``batches`` a list of batches (a single ``(x, y)`` tuple or dict,
    or any re-iterable such as a DataLoader over the full training set); ``params`` None (all
    trainable parameters), glob patterns for :func:`lscape.params.select_parameters`
    (``"fc1.*"``, ``["layer1", "layer2"]``), or a list of the model's parameters; ``mode``
    ``"eval"`` or ``"train"`` (the module mode during products); ``method``
    ``"double-backward"``, ``"forward-over-reverse"``, ``"finite-difference"`` (central
    differences of exact gradients, (g(θ+εv) − g(θ−εv)) / (2ε + ``fd_offset``), an explicit
    option for replicating seeds that used it) or ``"auto"``; ``kind``

    - ``"hessian"``;
    - ``"ggn"``: Gauss–Newton Jᵀ ∇²_out L J, positive semi-definite for convex losses. For
      cross-entropy (lscape's ``ce``, ``F.cross_entropy``, a plain ``nn.CrossEntropyLoss``)
      the output Hessian is applied analytically, (p⊙u − p(pᵀu))/R per row, without a
      second-order graph through log-softmax, so memory is one forward's activations plus
      one logits-sized tangent;
    - ``"empirical-fisher"``: (1/R) Σ_r g_r g_rᵀ with g_r the gradient of row r's loss
      (rows: samples, or tokens of a sequence output);
    - ``"fisher"``: the Monte-Carlo Fisher (1/R) Σ_r ĝ_r ĝ_rᵀ with ĝ_r the gradient of the
      loss at a label drawn from the model's softmax (cross-entropy only), ``mc_samples``
      draws per row from a fixed seed, so the operator is one fixed matrix.

    The GGN and the Fisher matrices need the loss as a function of a tensor output
    (``adapter.criterion``): they are refused for the model's own loss (``--loss model``).

    ``cache_graph`` keeps the first-order graph of each batch so that a product costs one
    extra backward pass instead of a forward and two backwards (default: when there are at
    most 8 batches held in a list and no ``chunk``). A cached operator describes the
    parameters at its first product: build a new operator after the parameters change.
    ``chunk`` splits every batch into pieces of at most that many samples
    (:func:`lscape.batch.chunks`), so memory scales with one chunk; exact for per-sample
    mean losses. After each product ``peak_memory`` holds the peak bytes allocated on a CUDA
    device during it (None on the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | BatchAdapter,
        batches: Any,
        params: Any = None,
        mode: str = "eval",
        method: str = "auto",
        kind: str = "hessian",
        cache_graph: bool | None = None,
        seed: int = 0,
        chunk: int | None = None,
        fd_eps: float = 1e-3,
        fd_offset: float = 0.0,
        mc_samples: int = 1,
    ):
        method = method.replace("_", "-")
        kind = kind.replace("_", "-")
        if method not in METHODS:
            raise UsageError(f"unknown HVP method {method!r}; choose one of {', '.join(METHODS)}")
        if kind not in KINDS:
            raise UsageError(f"unknown curvature kind {kind!r}; choose one of {', '.join(KINDS)}")
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose 'eval' or 'train'")
        if chunk is not None and int(chunk) < 1:
            raise UsageError(f"chunk must be a positive number of samples, not {chunk}")
        if fd_eps <= 0:
            raise UsageError(f"the finite-difference step fd_eps must be positive, not {fd_eps}")
        self.model = model
        self.adapter = as_adapter(loss_fn)
        self.loss_fn = self.adapter.loss_fn
        if kind != "hessian" and not self.adapter.separable:
            raise UsageError(f"kind={kind} needs the loss as a function of the model's output (a separable loss): "
                             f"name a loss (--loss ce) instead of --loss model, or use kind=hessian")
        if kind == "fisher" and _ce_like(self.loss_fn) is None:
            raise UsageError("kind=fisher (Monte-Carlo Fisher) samples labels from a softmax: it needs a "
                             "cross-entropy loss; use kind=empirical-fisher or kind=ggn for other losses")
        self.batches = _as_batches(batches)
        self.named_params = _resolve_params(model, params)
        self.names = [n for n, _ in self.named_params]
        self.params = [p for _, p in self.named_params]
        self.mode = mode
        self.kind = kind
        self.seed = seed
        self.chunk = int(chunk) if chunk is not None else None
        self.fd_eps = float(fd_eps)
        self.fd_offset = float(fd_offset)
        self.mc_samples = int(mc_samples)
        self.dim = lparams.numel(self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_products = 0
        self.peak_memory: int | None = None
        #: why the operator did not use the method asked for, if it did not (stored by probes)
        self.fallback: str | None = None
        listed = isinstance(self.batches, (list, tuple))
        if cache_graph is None:
            cache_graph = listed and len(self.batches) <= _DEFAULT_CACHE_LIMIT and self.chunk is None
        self.cache_graph = bool(cache_graph) and listed and kind == "hessian"
        self.method = _choose_method(method, self.cache_graph, kind)
        # The global sample count, summed over ranks: products are divided by it.
        local = sum(batch_size_of(b) for b in self._iter_batches())
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        self.num_samples = float(distributed.all_reduce_(total)[0])
        if self.num_samples <= 0:
            raise UsageError("the curvature operator needs at least one non-empty batch")
        self._cached: list[tuple[float, list[torch.Tensor]]] | None = None

    # -- public ---------------------------------------------------------------------------

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return H v (or G v, F v) for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, the operator acts on ({self.dim},)")
        v = v.detach().to(dtype=self.dtype, device=self.device)
        out = self._measured_product(v.unsqueeze(0))[0]
        self.num_products += 1
        activity.tick(1, unit="HVPs")
        return out

    __call__ = matvec

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """Return H V for a block of flat vectors ``vs`` of shape (c, dim), as rows (c, dim)."""
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise ValueError(f"block has shape {tuple(vs.shape)}, expected (c, {self.dim})")
        vs = vs.detach().to(dtype=self.dtype, device=self.device)
        out = self._measured_product(vs)
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
                total += batch_size_of(batch) * lparams.flatten(grads, like=self.params).detach()
        return distributed.all_reduce_(total).div_(self.num_samples)

    def loss(self) -> float:
        """The size-weighted mean loss over the operator's batches (all-reduced)."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad(), _model_state(self.model, self.mode):
            for i, batch in enumerate(self._iter_batches()):
                with self._batch_rng(i):
                    total += batch_size_of(batch) * self._loss(batch).double()
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

    def _measured_product(self, vs: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = self._product(vs)
        self.peak_memory = int(torch.cuda.max_memory_allocated(self.device)) if cuda else None
        return out

    def _product(self, vs: torch.Tensor) -> torch.Tensor:
        """Σ_b n_b H_b V over local batches, all-reduced and divided by the global count."""
        total = torch.zeros_like(vs)
        # Probes may run under no_grad; the products need autograd regardless.
        with _model_state(self.model, self.mode), torch.enable_grad():
            if self.kind != "hessian":
                for i, batch in enumerate(self._iter_batches()):
                    total += batch_size_of(batch) * self._output_space_batch(i, batch, vs)
            elif self.method == "double-backward":
                for weight, grads in self._first_order_graphs():
                    total += weight * self._double_backward(grads, vs)
            elif self.method == "finite-difference":
                for i, batch in enumerate(self._iter_batches()):
                    total += batch_size_of(batch) * self._finite_difference(i, batch, vs)
            else:
                for i, batch in enumerate(self._iter_batches()):
                    total += batch_size_of(batch) * self._forward_over_reverse(i, batch, vs)
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
            item = (float(batch_size_of(batch)), grads)
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
        if vs.shape[0] == 1:
            hv = torch.autograd.grad(outputs, self.params, [c[0] for c in cotangents], retain_graph=True, allow_unused=True)
            return lparams.flatten(hv, like=self.params).detach().unsqueeze(0)
        if vs.device.type == "cpu":
            # Measured: on CPU autograd's batched (vmapped) backward of a CNN is ~1.7x slower
            # than one backward per row, so rows go one at a time there.
            for r in range(vs.shape[0]):
                hv = torch.autograd.grad(outputs, self.params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
                out[r] = lparams.flatten(hv, like=self.params).detach()
            return out
        try:
            hv = torch.autograd.grad(outputs, self.params, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
            return torch.cat([_rows(h, p, vs.shape[0]) for h, p in zip(hv, self.params)], dim=1).detach()
        except RuntimeError:
            # Some operators have no batching rule: fall back to one row at a time.
            for r in range(vs.shape[0]):
                hv = torch.autograd.grad(outputs, self.params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
                out[r] = lparams.flatten(hv, like=self.params).detach()
            return out

    def _functional(self, batch: Any):
        """Loss and (output, target) as functions of the selected parameters (others held fixed)."""
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

    def _forward_over_reverse(self, i: int, batch: Any, vs: torch.Tensor) -> torch.Tensor:
        """H_b V as the directional derivative (jvp) of the gradient function (grad).

        Some losses have no forward-mode rule for their backward (``F.mse_loss`` raises
        "ZeroTensors are immutable" in torch 2.x): those batches use reverse-over-forward
        (the gradient of the jvp), the same exact product, and say so in ``fallback``.
        """
        _, loss_of = self._functional(batch)
        primal = {n: p.detach() for n, p in self.named_params}
        grad_fn = torch.func.grad(loss_of)

        def hvp_for(v_flat: torch.Tensor) -> torch.Tensor:
            tangent = dict(zip(self.names, lparams.unflatten(v_flat, self.params)))
            _, hv = torch.func.jvp(grad_fn, (primal,), (tangent,))
            return lparams.flatten([hv[n] for n in self.names])

        def hvp_rev(v_flat: torch.Tensor) -> torch.Tensor:
            tangent = dict(zip(self.names, lparams.unflatten(v_flat, self.params)))
            hv = torch.func.grad(lambda p: torch.func.jvp(loss_of, (p,), (tangent,))[1])(primal)
            return lparams.flatten([hv[n] for n in self.names])

        def rows(hvp) -> torch.Tensor:
            if vs.shape[0] == 1 or vs.device.type == "cpu":  # vmap is slower than a loop on CPU
                out = []
                for v in vs:
                    with self._batch_rng(i):  # the same dropout mask for every row
                        out.append(hvp(v))
                return torch.stack(out).detach()
            with self._batch_rng(i):
                # One dropout mask for all rows: they are columns of the same matrix.
                return torch.func.vmap(hvp, randomness="same")(vs).detach()

        if self.fallback is None:
            try:
                return rows(hvp_for)
            except RuntimeError as err:
                if "ZeroTensor" not in str(err):
                    raise
                self.fallback = "forward-over-reverse has no rule for this loss: reverse-over-forward used"
        return rows(hvp_rev)

    def _finite_difference(self, i: int, batch: Any, vs: torch.Tensor) -> torch.Tensor:
        """(g(θ + εv) − g(θ − εv)) / (2ε + offset) with exact gradients g (an explicit option)."""
        _, loss_of = self._functional(batch)
        primal = {n: p.detach() for n, p in self.named_params}
        grad_fn = torch.func.grad(loss_of)
        eps = self.fd_eps
        out = torch.zeros_like(vs)
        for r in range(vs.shape[0]):
            tangent = dict(zip(self.names, lparams.unflatten(vs[r], self.params)))
            with self._batch_rng(i):
                plus = grad_fn({n: primal[n] + eps * tangent[n] for n in self.names})
            with self._batch_rng(i):
                minus = grad_fn({n: primal[n] - eps * tangent[n] for n in self.names})
            diff = lparams.flatten([plus[n] - minus[n] for n in self.names])
            out[r] = (diff / (2 * eps + self.fd_offset)).detach()
        return out

    def _output_space_batch(self, i: int, batch: Any, vs: torch.Tensor) -> torch.Tensor:
        """Jᵀ M J V for the output-space matrix M of the kind (GGN, Fisher): forward-mode J v,
        M applied in output space, then one vjp per row."""
        output_of, _ = self._functional(batch)
        primal = {n: p.detach() for n, p in self.named_params}
        out_rows = torch.zeros_like(vs)
        with self._batch_rng(i):
            (out, target), pullback = _vjp_out(output_of, primal)
        apply_m = self._output_matrix(i, out.detach(), target)
        del out  # the output-space matrix keeps what it needs (softmax probabilities for CE)
        for r in range(vs.shape[0]):
            tangent = dict(zip(self.names, lparams.unflatten(vs[r], self.params)))
            with self._batch_rng(i):
                jv = torch.func.jvp(lambda p: output_of(p)[0], (primal,), (tangent,))[1]  # primal output freed
            (back,) = pullback(apply_m(jv))
            del jv
            out_rows[r] = lparams.flatten([back[n] for n in self.names]).detach()
        return out_rows

    def _output_matrix(self, i: int, out: torch.Tensor, target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """u ↦ M u in output space for the batch's output ``out``."""
        ce = _ce_like(self.loss_fn)
        if self.kind == "ggn" and ce is not None:
            # Analytic cross-entropy Hessian per row: (p⊙u − p(pᵀu)) / R, ignored rows 0.
            logits, mask, rows = _ce_rows(out, target, ce)
            p = torch.softmax(logits.detach(), dim=-1)
            scale = (mask / rows)[:, None]

            def ggn_ce(u: torch.Tensor) -> torch.Tensor:
                # p⊙(u − pᵀu), in place on the tangent u (which the caller no longer needs): no
                # logits-sized temporary beyond p and u, whatever the vocabulary
                u2 = u.reshape(-1, u.shape[-1])
                pu = torch.linalg.vecdot(p, u2).unsqueeze(-1)
                return u2.sub_(pu).mul_(p).mul_(scale).reshape(u.shape)

            return ggn_ce
        if self.kind == "ggn":
            # ∇_out L with its graph, so that (∇²_out L) u is one more backward for any loss.
            leaf = out.detach().requires_grad_(True)
            with torch.enable_grad():
                (loss_grad,) = torch.autograd.grad(self.adapter.criterion(leaf, target), leaf, create_graph=True)

            def ggn_any(u: torch.Tensor) -> torch.Tensor:
                if not loss_grad.requires_grad:  # the loss is linear in the output
                    return torch.zeros_like(u)
                return torch.autograd.grad(loss_grad, leaf, u, retain_graph=True)[0]

            return ggn_any
        # Fisher matrices: per-row loss gradients e_r in output space (R rows of the flattened output).
        flat = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)
        if self.kind == "empirical-fisher":
            leaf = out.detach().requires_grad_(True)
            with torch.enable_grad():
                (g_out,) = torch.autograd.grad(self.adapter.criterion(leaf, target), leaf)
            # L = (1/R) Σ ℓ_r with rows independent: ∇_{o_r} ℓ_r = R ∇_{o_r} L.
            rows = _count_rows(out, target, ce)
            samples = [(g_out.reshape(flat.shape) * rows, rows)]
        else:
            logits, mask, rows = _ce_rows(out, target, ce)
            p = torch.softmax(logits.detach().double(), dim=-1)
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + 7919 * i + 17)
            samples = []
            for _ in range(self.mc_samples):
                drawn = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(p.device)
                e = p.clone()
                e[torch.arange(len(drawn), device=p.device), drawn] -= 1.0  # ∇ of −log softmax at the draw
                samples.append(((e * mask[:, None]).to(out.dtype), rows))

        def fisher(u: torch.Tensor) -> torch.Tensor:
            u2 = u.reshape(flat.shape)
            total = torch.zeros_like(u2)
            for e, rows_ in samples:
                s = (e * u2).sum(-1, keepdim=True)
                total += e * s / rows_
            return (total / len(samples)).reshape(u.shape)

        return fisher

    # -- helpers --------------------------------------------------------------------------

    def _loss(self, batch: Any) -> torch.Tensor:
        return self.adapter.loss(self.model, batch)

    def _iter_batches(self) -> Iterable[Any]:
        for batch in self.batches:
            batch = to_device(batch, self.device)
            yield from chunks(batch, self.chunk)

    def _batch_rng(self, i: int):
        """A forked RNG with a fixed seed per batch in train mode (fixed dropout masks)."""
        if self.mode != "train":
            return contextlib.nullcontext()
        return _seeded_rng(self.seed * 1_000_003 + i, self.device)


def gradient(
    model: nn.Module,
    loss_fn: LossFn | BatchAdapter,
    batches: Any,
    params: Any = None,
    mode: str = "eval",
) -> torch.Tensor:
    """The size-weighted mean gradient of the loss over ``batches`` as a flat vector.

    Same conventions as :class:`HessianOperator`; ``.grad``, modes and buffers are untouched.
    """
    return HessianOperator(model, loss_fn, batches, params=params, mode=mode, cache_graph=False).gradient()


def _vjp_out(output_of, primal):
    """(output, target) and the pullback of the output tensor only."""
    holder = {}

    def out_only(p):
        out, target = output_of(p)
        holder["target"] = target
        return out

    out, pullback = torch.func.vjp(out_only, primal)
    return (out, holder["target"]), pullback


# -- cross-entropy structure ----------------------------------------------------------------


def _ce_like(loss_fn: Any) -> dict | None:
    """If ``loss_fn`` is a plain mean cross-entropy, its ignore_index; else None."""
    import torch.nn.functional as F

    if loss_fn is None:
        return None
    if loss_fn is F.cross_entropy:
        return {"ignore_index": -100}
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is None and loss_fn.reduction == "mean" and loss_fn.label_smoothing == 0:
            return {"ignore_index": loss_fn.ignore_index}
        return None
    if getattr(loss_fn, "__module__", "") == "lscape.plugins.builtins" and getattr(loss_fn, "__name__", "") == "cross_entropy":
        return {"ignore_index": -100}
    return None


def _ce_rows(out: torch.Tensor, target: Any, ce: dict | None):
    """(logits as rows (R, C), valid-row mask (R,), number of valid rows) of a CE output."""
    if ce is None:
        raise UsageError("the Monte-Carlo Fisher needs a cross-entropy loss")
    logits = out.reshape(-1, out.shape[-1])
    if isinstance(target, torch.Tensor) and not target.is_floating_point():
        mask = (target.reshape(-1) != ce["ignore_index"]).to(out.dtype)
    else:
        mask = torch.ones(logits.shape[0], dtype=out.dtype, device=out.device)
    return logits, mask, max(float(mask.sum()), 1.0)


def _count_rows(out: torch.Tensor, target: Any, ce: dict | None) -> float:
    if ce is not None:
        return _ce_rows(out, target, ce)[2]
    return float(out.reshape(-1, out.shape[-1]).shape[0]) if out.dim() > 1 else float(out.numel())


# -- module state -------------------------------------------------------------------------


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the selector: nothing to choose
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def _model_state(model: nn.Module, mode: str):
    """Set ``mode`` for the duration, then restore every module's flag and any buffer a forward wrote.

    In train mode BatchNorm layers normalise with batch statistics as usual but do not
    update their running statistics (``track_running_stats`` is switched off meanwhile),
    which keeps the forward pass free of in-place buffer writes that torch.func forbids.
    Buffers are compared by version counter and copied back only when something wrote them:
    an unconditional ``copy_`` would bump the version of every BatchNorm buffer and invalidate
    any graph that saved it (the operator's cached graph, or a user's pending backward).
    """
    flags = [(m, m.training) for m in model.modules()]
    saved_buffers = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    tracking = []
    try:
        model.train(mode == "train")
        if mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    tracking.append(m)
                    m.track_running_stats = False
        # scaled-dot-product attention (HF models, nn.MultiheadAttention): the fused flash and
        # memory-efficient kernels have no double backward, the math kernel is plain
        # differentiable ops, so second-order products go through it (exact, O(T²) memory)
        with _math_attention():
            yield
    finally:
        for m in tracking:
            m.track_running_stats = True
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, version, saved in saved_buffers:
                if b._version != version:
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
        patterns = lparams._patterns(params)  # "layer2.*,fc.*" is two patterns
        try:
            chosen = lparams.select_parameters(model, include=patterns)
        except ValueError as err:
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad
                      and any(lparams._match(n, pat) for pat in lparams._patterns(patterns))]
            if frozen:
                raise UsageError(f"params={','.join(patterns)} selects only frozen parameters ({', '.join(frozen[:3])}"
                                 f"{', ...' if len(frozen) > 3 else ''}): the curvature operator needs "
                                 f"parameters with requires_grad=True") from None
            raise UsageError(f"{err}; list the model's parameters with model.named_parameters()") from None
    else:
        by_id = {id(p): n for n, p in model.named_parameters()}
        chosen = []
        for p in params:
            if isinstance(p, tuple):  # (name, parameter) pairs from select_parameters
                p = p[1]
            if id(p) not in by_id:
                raise UsageError("a tensor in `params` is not a parameter of the model; pass names or model parameters")
            if not p.requires_grad:
                raise UsageError(f"parameter {by_id[id(p)]} in `params` is frozen (requires_grad=False): "
                                 f"the curvature operator differentiates only trainable parameters")
            chosen.append((by_id[id(p)], p))
    if not chosen:
        raise UsageError("no trainable parameters selected for the curvature operator")
    return chosen


def _as_batches(batches: Any) -> Any:
    """A list of batches (one (x, y) pair or one dict is one batch); re-iterables are kept as they are."""
    batches = sequence_of_batches(batches)
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise UsageError("the curvature operator needs at least one batch")
        return list(batches)
    if iter(batches) is batches:  # a one-shot iterator: materialise so every product sees the same data
        return list(batches)
    return batches


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
    forward-over-reverse. Double backward is the default either way; the GGN and the Fisher
    matrices are output-space products (torch.func jvp and vjp).
    """
    if kind != "hessian":
        return "forward-over-reverse"
    return "double-backward" if method == "auto" else method
