"""Helpers the curvature operators share: module state, seeded RNG, parameter and batch
selection, cross-entropy structure. Private to ``lscape.curvature``."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lscape import params as lparams
from lscape.batch import sequence_of_batches
from lscape.curvature.errors import CurvatureArgumentError

__all__ = ["model_state", "seeded_rng", "resolve_params", "as_batches", "unflatten_rows", "grad_rows", "vjp_out",
           "ce_like", "ce_rows", "count_rows"]


# -- module state -------------------------------------------------------------------------


def math_attention():
    """Scaled-dot-product attention through the math kernel (the fused ones have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the selector: nothing to choose
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def model_state(model: nn.Module, mode: str):
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
        with math_attention():
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
def seeded_rng(seed: int, device: torch.device):
    """A forked RNG (CPU and ``device``) seeded with ``seed``; the caller's RNG is untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(seed)
        yield


# -- parameters and batches ---------------------------------------------------------------


def resolve_params(model: nn.Module, params: Any) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs from None, glob pattern(s) or a list of the model's parameters.

    Raises :class:`CurvatureArgumentError` (a ``ValueError``, argument ``params``) for a selection that is empty or holds frozen or foreign tensors.
    """
    if params is None:
        chosen = lparams.select_parameters(model)
    elif isinstance(params, str) or (
        isinstance(params, (list, tuple)) and params and all(isinstance(p, str) for p in params)
    ):
        patterns = [t.strip() for t in params.split(",") if t.strip()] if isinstance(params, str) else list(params)
        try:  # "layer2.*,fc.*" is two patterns
            chosen = lparams.select_parameters(model, include=patterns)
        except ValueError as err:
            try:
                frozen = [n for n, p in lparams.select_parameters(model, include=patterns, requires_grad=False)
                          if not p.requires_grad]
            except ValueError:
                frozen = []
            if frozen:
                raise CurvatureArgumentError(
                    f"params={','.join(patterns)} selects only frozen parameters ({', '.join(frozen[:3])}"
                    f"{', ...' if len(frozen) > 3 else ''}): the curvature operator needs parameters with "
                    f"requires_grad=True", "params") from None
            raise CurvatureArgumentError(f"{err}; list the model's parameters with model.named_parameters()",
                                         "params") from None
    else:
        by_id = {id(p): n for n, p in model.named_parameters()}
        chosen = []
        for p in params:
            if isinstance(p, tuple):  # (name, parameter) pairs from select_parameters
                p = p[1]
            if id(p) not in by_id:
                raise CurvatureArgumentError("a tensor in `params` is not a parameter of the model; pass names or "
                                             "model parameters", "params")
            if not p.requires_grad:
                raise CurvatureArgumentError(f"parameter {by_id[id(p)]} in `params` is frozen (requires_grad=False): "
                                             f"the curvature operator differentiates only trainable parameters", "params")
            chosen.append((by_id[id(p)], p))
    if not chosen:
        raise CurvatureArgumentError("no trainable parameters selected for the curvature operator", "params")
    return chosen


def as_batches(batches: Any) -> Any:
    """A list of batches (one (x, y) pair or one dict is one batch); re-iterables are kept as they are."""
    batches = sequence_of_batches(batches)
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise CurvatureArgumentError("the curvature operator needs at least one batch", "batches")
        return list(batches)
    if iter(batches) is batches:  # a one-shot iterator: materialise so every product sees the same data
        return list(batches)
    return batches


def unflatten_rows(vs: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a (c, d) block into per-parameter blocks shaped (c, *p.shape)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vs[:, offset : offset + n].reshape(vs.shape[0], *t.shape))
        offset += n
    return out


def grad_rows(h: torch.Tensor | None, p: torch.Tensor, c: int) -> torch.Tensor:
    """A batched gradient ``h`` of parameter ``p`` as (c, p.numel()) rows (zeros for None)."""
    if h is None:
        return torch.zeros(c, p.numel(), dtype=p.dtype, device=p.device)
    return h.reshape(c, -1)


def vjp_out(output_of: Callable, primal: dict[str, torch.Tensor]):
    """(output, target) and the pullback of the output tensor only."""
    holder = {}

    def out_only(p):
        out, target = output_of(p)
        holder["target"] = target
        return out

    out, pullback = torch.func.vjp(out_only, primal)
    return (out, holder["target"]), pullback


# -- cross-entropy structure ----------------------------------------------------------------


def ce_like(loss_fn: Any) -> dict | None:
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
    declared = getattr(loss_fn, "ce_like", None)  # a loss that declares itself a mean CE (lscape's `ce`)
    if isinstance(declared, dict):
        return dict(declared)
    return None


def ce_rows(out: torch.Tensor, target: Any, ce: dict | None):
    """(logits as rows (R, C), valid-row mask (R,), number of valid rows) of a CE output."""
    if ce is None:
        raise CurvatureArgumentError("the Monte-Carlo Fisher needs a cross-entropy loss", "loss_fn")
    logits = out.reshape(-1, out.shape[-1])
    if isinstance(target, torch.Tensor) and not target.is_floating_point():
        mask = (target.reshape(-1) != ce["ignore_index"]).to(out.dtype)
    else:
        mask = torch.ones(logits.shape[0], dtype=out.dtype, device=out.device)
    return logits, mask, max(float(mask.sum()), 1.0)


def count_rows(out: torch.Tensor, target: Any, ce: dict | None) -> float:
    """The number of loss rows (samples, or tokens of a sequence output) of a batch's output."""
    if ce is not None:
        return ce_rows(out, target, ce)[2]
    return float(out.reshape(-1, out.shape[-1]).shape[0]) if out.dim() > 1 else float(out.numel())
