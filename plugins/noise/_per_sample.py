"""Per-sample gradients with torch.func and the gradient-noise statistics built on them."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils._pytree import tree_map
from torch import nn
from torch.func import functional_call, grad, vmap

from lscape.params import select_parameters
from lscape.batch import as_adapter, batch_size_of, chunks, index_batch
from lscape.errors import message_line

__all__ = [
    "GradientStatistics",
    "per_sample_gradients",
    "iter_per_sample_gradients",
    "per_sample_statistics",
    "statistics_from_gradients",
    "model_mode",
    "named_params",
]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = Sequence[tuple[str, torch.Tensor]] | None


@dataclass
class GradientStatistics:
    """Per-sample gradient statistics of n samples at one point θ.

    g is the mean of the per-sample gradients g_i and Σ their unbiased sample covariance
    (divisor n − 1). Every ratio is a plain float; per-group values are keyed by
    parameter name.
    """

    n: int
    grad_sq: float
    """‖g‖², squared norm of the mean gradient."""
    trace_cov: float
    """tr Σ = 1/(n−1) Σ_i ‖g_i − g‖², the per-sample gradient variance."""
    b_simple: float
    """Gradient noise scale B_simple = tr Σ / ‖g‖² (McCandlish et al. 2018)."""
    gsnr: float
    """Mean over coordinates of g_j² / Var_j (Liu et al. 2020)."""
    norm_test: float
    """Cockpit's NormTest: sqrt(tr Σ / (n ‖g‖²)) (Byrd et al. 2012, eq. 3.9)."""
    inner_test: float
    """Cockpit's InnerTest: sqrt(Var(g_i·g) / (n ‖g‖⁴)) (Bollapragada et al. 2018, eq. 2.6)."""
    grad_sq_unbiased: float
    """‖g‖² − tr Σ / n, an unbiased estimate of the squared norm of the expected gradient."""
    gsnr_groups: dict[str, float] = field(default_factory=dict)
    trace_cov_groups: dict[str, float] = field(default_factory=dict)
    grad_sq_groups: dict[str, float] = field(default_factory=dict)
    grad: torch.Tensor | None = None
    """The flat mean gradient g (float64), in the order of the selected parameters."""


def named_params(model: nn.Module, params: Params = None) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` pairs to differentiate: ``params`` as given, or all trainable ones.

    ``params`` may also be a list of bare tensors of ``model``; their names are looked up.
    """
    if params is None:
        return select_parameters(model)
    params = list(params)
    if params and isinstance(params[0], torch.Tensor):
        by_id = {id(p): n for n, p in model.named_parameters()}
        return [(by_id[id(p)], p) for p in params]
    return [(n, p) for n, p in params]


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str | None) -> Iterator[None]:
    """Put every module in ``mode`` ("train", "eval", or None: leave) and restore each flag."""
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    try:
        if mode is not None:
            model.train(mode == "train")
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def iter_per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: Params = None,
    chunk_size: int = 64,
    mode: str | None = "eval",
    method: str = "vmap",
    fallback: list[str] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield per-sample gradients chunk by chunk: ``{name: tensor (c, *param.shape)}``.

    Each sample's loss is ``loss_fn(model(x[None]), y[None])``, so the batch-mean loss is
    the mean of these. ``chunk_size`` bounds memory: at most that many per-sample gradients
    exist at once. BatchNorm needs ``mode="eval"`` (a batch of one has no statistics);
    dropout in train mode draws independent masks per sample. ``method="vmap"``
    (torch.func) is the fast path; ``"loop"`` runs one ordinary backward per sample, for
    modules that torch.func cannot transform (in-place updates of captured state).
    """
    named = named_params(model, params)
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if method == "loop":
        yield from _loop_chunks(model, loss_fn, batches, named, chunk_size, mode)
        return
    if method not in ("vmap", "auto"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', not {method!r}")
    grad_fn = _per_sample_grad_fn(model, loss_fn, named)
    theta = {n: p.detach() for n, p in named}
    frozen = frozen_state(model, named)
    batches = list(batches)
    first = True
    with model_mode(model, mode), torch.no_grad():
        for b, batch in enumerate(batches):
            for piece in chunks(batch, chunk_size):
                if first and method == "auto":
                    first = False
                    try:
                        out = grad_fn(theta, frozen, piece)
                    except RuntimeError as e:
                        # models torch.func cannot vmap (data-dependent checks in HF attention
                        # masks, .item() calls): one ordinary backward per sample instead
                        if "vmap" not in str(e) and "functorch" not in str(e) and "batch" not in str(e).lower():
                            raise
                        if fallback is not None:  # the caller records why
                            fallback.append(message_line(e, 200))
                        yield from _loop_chunks(model, loss_fn, batches, named, chunk_size, mode)
                        return
                    yield out
                    continue
                yield grad_fn(theta, frozen, piece)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Params = None,
    chunk_size: int = 64,
    mode: str | None = "eval",
    method: str = "vmap",
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of one batch, ``{name: tensor (n, *param.shape)}``."""
    chunks = list(iter_per_sample_gradients(model, loss_fn, [batch], params, chunk_size, mode, method))
    if len(chunks) == 1:  # no copy: per-sample gradients are large
        return chunks[0]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def per_sample_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    params: Params = None,
    chunk_size: int = 64,
    mode: str | None = "eval",
    eps: float = 0.0,
    keep_grad: bool = False,
    method: str = "vmap",
    fallback: list[str] | None = None,
) -> GradientStatistics:
    """Gradient variance, GSNR, noise scale and Cockpit's tests over all samples of ``batches``.

    Memory is bounded by ``chunk_size`` per-sample gradients plus a few flat vectors. When
    all samples fit in one chunk this is one vmap pass; otherwise a first ordinary
    backward pass gives the mean gradient g and a second, chunked pass accumulates the
    deviations from it (accumulating deviations, not raw squares, avoids cancellation).
    GSNR per coordinate is g_j² / (Var_j + eps); coordinates whose per-sample gradients
    are all zero (dead units) or zero up to rounding — second moment below
    (10·machine eps)² times the mean second moment — have no defined ratio and are left
    out of the means.
    """
    named = named_params(model, params)
    batches = list(batches)
    n = sum(batch_size_of(b) for b in batches)
    if n < 2:
        raise ValueError("per-sample statistics need at least two samples")
    acc_dtype = torch.float64
    if n <= chunk_size:
        # one chunk: per-sample gradients of everything, centre on their exact mean
        chunk = {}
        for part in iter_per_sample_gradients(model, loss_fn, batches, named, n, mode, method, fallback):
            chunk = {k: torch.cat([chunk[k], v]) if k in chunk else v for k, v in part.items()}
        centre = {k: (v.sum(0) / n).to(acc_dtype) for k, v in chunk.items()}  # close is enough, see below
        chunks: Iterable[dict[str, torch.Tensor]] = [chunk]
    else:
        centre = _mean_gradient(model, loss_fn, batches, named, mode, acc_dtype)
        chunks = iter_per_sample_gradients(model, loss_fn, batches, named, chunk_size, mode, method, fallback)

    dtype = named[0][1].dtype
    return statistics_from_gradients(chunks, n, centre, eps=eps, keep_grad=keep_grad, dtype=dtype)


def statistics_from_gradients(
    chunks: Iterable[dict[str, torch.Tensor]],
    n: int,
    centre: dict[str, torch.Tensor],
    eps: float = 0.0,
    keep_grad: bool = False,
    dtype: torch.dtype = torch.float32,
) -> GradientStatistics:
    """:class:`GradientStatistics` from chunks of per-sample gradients ``{name: (c, *shape)}``.

    ``n`` is the total number of samples and ``centre`` a reference gradient (float64)
    close to their mean — the exact mean, or the ordinary minibatch gradient; deviations
    from it are summed, so the result is exact for any centre and accurate for a good one.
    ``dtype`` is the parameters' dtype (it sets the rounding floor of inactive coordinates).
    The chunks are consumed: they are overwritten in place.
    Used by :func:`per_sample_statistics`; other per-sample sources (BackPACK's
    ``grad_batch``, a loop) can share it.
    """
    c_sq = sum(float((c * c).sum()) for c in centre.values())
    s1 = {k: torch.zeros_like(c) for k, c in centre.items()}  # Σ (g_i − c)
    s2 = {k: torch.zeros_like(c) for k, c in centre.items()}  # Σ (g_i − c)²
    p1 = 0.0  # Σ (g_i·c − ‖c‖²)
    p2 = 0.0  # Σ (g_i·c − ‖c‖²)²
    low = {k: c.to(dtype).reshape(-1) for k, c in centre.items()}
    for chunk in chunks:
        proj = None
        for k, gk in chunk.items():
            # In place and through matrix-vector products: allocating chunk-sized
            # temporaries and float64 reductions cost more than the per-sample gradients.
            d = gk.reshape(len(gk), -1).sub_(low[k])
            ones = torch.ones(len(d), dtype=d.dtype, device=d.device)
            dp = (d @ low[k]).double()
            proj = dp if proj is None else proj + dp
            s1[k] += (ones @ d).double().view_as(s1[k])
            s2[k] += (ones @ d.mul_(d)).double().view_as(s2[k])
        p1 += float(proj.sum())
        p2 += float((proj * proj).sum())

    stats = GradientStatistics(n=n, grad_sq=0.0, trace_cov=0.0, b_simple=math.nan, gsnr=math.nan,
                               norm_test=math.nan, inner_test=math.nan, grad_sq_unbiased=math.nan)
    gsnr_sum, gsnr_count = 0.0, 0
    means = {k: centre[k] + s1[k] / n for k in centre}
    variances = {k: (s2[k] - s1[k] * s1[k] / n).clamp_min(0) / (n - 1) for k in centre}
    # second moments (1/n) Σ g_ij²; a coordinate whose per-sample gradients are all zero
    # up to rounding (an attention key bias, an unused embedding row) has a GSNR of
    # rounding noise over rounding noise, so it counts as inactive and is left out
    moments = {k: (s2[k] + 2 * centre[k] * s1[k]) / n + centre[k] * centre[k] for k in centre}
    d_total = sum(m.numel() for m in moments.values())
    mean_moment = sum(float(m.sum()) for m in moments.values()) / d_total
    floor = (10 * torch.finfo(dtype).eps) ** 2 * mean_moment
    for k in centre:
        mean, var = means[k], variances[k]
        stats.grad_sq_groups[k] = float((mean * mean).sum())
        stats.trace_cov_groups[k] = float(var.sum())
        denom = var + eps
        ok = (denom > 0) & (moments[k] > floor)
        ratio = (mean * mean)[ok] / denom[ok]
        stats.gsnr_groups[k] = float(ratio.mean()) if ratio.numel() else math.nan
        gsnr_sum += float(ratio.sum())
        gsnr_count += ratio.numel()
    stats.grad_sq = sum(stats.grad_sq_groups.values())
    stats.trace_cov = sum(stats.trace_cov_groups.values())
    stats.gsnr = gsnr_sum / gsnr_count if gsnr_count else math.nan
    stats.grad_sq_unbiased = stats.grad_sq - stats.trace_cov / n
    # projections onto the centre c; Var(g_i·c) is shift-invariant, so centring on ‖c‖² is exact
    var_proj = max(p2 - p1 * p1 / n, 0.0) / (n - 1)
    if stats.grad_sq > 0:
        stats.b_simple = stats.trace_cov / stats.grad_sq
        stats.norm_test = math.sqrt(stats.trace_cov / (n * stats.grad_sq))
        # Cockpit projects on the minibatch gradient; c equals it up to rounding
        stats.inner_test = math.sqrt(var_proj / (n * c_sq * c_sq)) if c_sq > 0 else math.nan
    if keep_grad:
        stats.grad = torch.cat([means[k].reshape(-1) for k in centre])
    return stats




def _per_sample_grad_fn(model: nn.Module, loss_fn: LossFn, named: list[tuple[str, torch.Tensor]]):
    """vmap(grad(loss of one sample)) over the leading dimension of every tensor of a batch
    (tuples or dicts, through the batch adapter)."""
    adapter = as_adapter(loss_fn)

    def sample_loss(theta, frozen, sample):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return adapter.loss(functional_model(model, theta, frozen), one)

    # "different": dropout in train mode draws a fresh mask per sample, as a loop would
    return vmap(grad(sample_loss), in_dims=(None, None, 0), randomness="different")


def functional_model(model: nn.Module, theta: dict, frozen: dict):
    """A callable that runs ``model`` with parameters ``theta`` (others ``frozen``), as the
    batch adapter calls a model: positional and keyword inputs."""
    return lambda *args, **kwargs: functional_call(model, (theta, frozen), args, kwargs)


def frozen_state(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Parameters not differentiated and all buffers, detached, for functional_call."""
    chosen = {n for n, _ in named}
    out = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    out.update({n: b for n, b in model.named_buffers()})
    return out


def _mean_gradient(model, loss_fn, batches, named, mode, dtype) -> dict[str, torch.Tensor]:
    """Sample-weighted mean gradient over ``batches`` by ordinary backward passes."""
    tensors = [p for _, p in named]
    adapter = as_adapter(loss_fn)
    total = sum(batch_size_of(b) for b in batches)
    acc = [torch.zeros_like(p, dtype=dtype) for p in tensors]
    with model_mode(model, mode), torch.enable_grad():
        for batch in batches:
            loss = adapter.loss(model, batch)
            gs = torch.autograd.grad(loss, tensors, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a += g.to(dtype) * (batch_size_of(batch) / total)
    return {n: a for (n, _), a in zip(named, acc)}


def _loop_chunks(model, loss_fn, batches, named, chunk_size, mode):
    """Per-sample gradients by one ordinary backward pass per sample, grouped in chunks."""
    tensors = [p for _, p in named]
    adapter = as_adapter(loss_fn)
    with model_mode(model, mode), torch.enable_grad():
        for batch in batches:
            for piece in chunks(batch, chunk_size):
                rows = []
                for i in range(batch_size_of(piece)):
                    loss = adapter.loss(model, index_batch(piece, slice(i, i + 1)))
                    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
                    rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, tensors)])
                yield {n: torch.stack([r[j] for r in rows]) for j, (n, _) in enumerate(named)}
