"""How a curvature matrix is applied to vectors: the product methods, and the one place that chooses.

Each product maps an operator and a (c, dim) block V to Σ_b n_b M_b V over the operator's
local batches (the operator sums over ranks and divides by the sample count):

- ``double-backward``: H_b V by differentiating g·v through the first-order graph (cached
  by the operator when it may be);
- ``forward-over-reverse``: the jvp of torch.func's gradient function (reverse-over-forward
  where a loss has no forward-mode rule for its backward);
- ``finite-difference``: central differences of exact gradients,
  (g(θ+εv) − g(θ−εv)) / (2ε + ``fd_offset``), an explicit option for replicating seeds;
- ``output-space``: Jᵀ M_out J V for matrices defined in output space (Gauss–Newton,
  Fisher): forward-mode J v, ``op.output_matrix`` applied, one vjp back per row.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lscape import params as lparams
from lscape.batch import batch_size_of
from lscape.curvature._support import grad_rows, unflatten_rows, vjp_out
from lscape.curvature.errors import CurvatureArgumentError

__all__ = ["METHODS", "PRODUCTS", "choose_method", "uses_graph", "double_backward", "forward_over_reverse",
           "finite_difference", "output_space"]

#: the ``method`` values a caller may ask for
METHODS = ("auto", "double-backward", "forward-over-reverse", "finite-difference")


def choose_method(method: str, fixed: str | None = None) -> str:
    """The product an operator uses: its ``fixed`` product if it has one, else ``method`` with
    "auto" resolved to the faster exact product.

    Measured on the benchmark CNN (benchmarks/curvature.py, 2 CPU cores, torch 2.13): with
    a cached first-order graph a double-backward product is one backward pass (about 0.9× a
    gradient); uncached it is about 1.5× a gradient, against about 2× for torch.func
    forward-over-reverse. Double backward is the default either way.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, not {type(method).__name__}")
    method = method.replace("_", "-")
    if method not in METHODS:
        raise CurvatureArgumentError(f"unknown HVP method {method!r}; choose one of {', '.join(METHODS)}", "method")
    if fixed is not None:
        return fixed
    return "double-backward" if method == "auto" else method


def uses_graph(method: str) -> bool:
    """Whether the product reuses a first-order graph per batch (which the operator may cache)."""
    return method == "double-backward"


def double_backward(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b H_b V by differentiating g·v; V's rows are batched through autograd's vmap."""
    total = torch.zeros_like(vs)
    for weight, grads in op.first_order_graphs():
        total += weight * _double_backward_batch(op.params, grads, vs)
    return total


def _double_backward_batch(params: list[torch.Tensor], grads: list[torch.Tensor], vs: torch.Tensor) -> torch.Tensor:
    live = [(g, j) for j, g in enumerate(grads) if g.requires_grad]
    out = torch.zeros_like(vs)
    if not live:  # the loss is linear in these parameters
        return out
    parts = unflatten_rows(vs, params)
    outputs = [g for g, _ in live]
    cotangents = [parts[j] for _, j in live]

    def one_row(r: int) -> torch.Tensor:
        hv = torch.autograd.grad(outputs, params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
        return lparams.flatten(hv, like=params).detach()

    if vs.shape[0] == 1:
        return one_row(0).unsqueeze(0)
    if vs.device.type == "cpu":
        # Measured: on CPU autograd's batched (vmapped) backward of a CNN is ~1.7x slower
        # than one backward per row, so rows go one at a time there.
        for r in range(vs.shape[0]):
            out[r] = one_row(r)
        return out
    try:
        hv = torch.autograd.grad(outputs, params, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True)
        return torch.cat([grad_rows(h, p, vs.shape[0]) for h, p in zip(hv, params)], dim=1).detach()
    except RuntimeError:
        # Some operators have no batching rule: fall back to one row at a time.
        for r in range(vs.shape[0]):
            out[r] = one_row(r)
        return out


def forward_over_reverse(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b H_b V as the directional derivative (jvp) of the gradient function (grad).

    Some losses have no forward-mode rule for their backward (``F.mse_loss`` raises
    "ZeroTensors are immutable" in torch 2.x): those batches use reverse-over-forward
    (the gradient of the jvp), the same exact product, and say so in ``op.fallback``.
    """
    total = torch.zeros_like(vs)
    for i, batch in enumerate(op.iter_batches()):
        total += batch_size_of(batch) * _forward_over_reverse_batch(op, i, batch, vs)
    return total


def _forward_over_reverse_batch(op: Any, i: int, batch: Any, vs: torch.Tensor) -> torch.Tensor:
    _, loss_of = op.functional(batch)
    primal = {n: p.detach() for n, p in op.named_params}
    grad_fn = torch.func.grad(loss_of)

    def tangent_of(v_flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(op.names, lparams.unflatten(v_flat, op.params)))

    def hvp_for(v_flat: torch.Tensor) -> torch.Tensor:
        _, hv = torch.func.jvp(grad_fn, (primal,), (tangent_of(v_flat),))
        return lparams.flatten([hv[n] for n in op.names])

    def hvp_rev(v_flat: torch.Tensor) -> torch.Tensor:
        tangent = tangent_of(v_flat)
        hv = torch.func.grad(lambda p: torch.func.jvp(loss_of, (p,), (tangent,))[1])(primal)
        return lparams.flatten([hv[n] for n in op.names])

    def rows(hvp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if vs.shape[0] == 1 or vs.device.type == "cpu":  # vmap is slower than a loop on CPU
            out = []
            for v in vs:
                with op.batch_rng(i):  # the same dropout mask for every row
                    out.append(hvp(v))
            return torch.stack(out).detach()
        with op.batch_rng(i):
            # One dropout mask for all rows: they are columns of the same matrix.
            return torch.func.vmap(hvp, randomness="same")(vs).detach()

    if op.fallback is None:
        try:
            return rows(hvp_for)
        except RuntimeError as err:
            if "ZeroTensor" not in str(err):
                raise
            op.fallback = "forward-over-reverse has no rule for this loss: reverse-over-forward used"
    return rows(hvp_rev)


def finite_difference(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b (g_b(θ + εv) − g_b(θ − εv)) / (2ε + offset) with exact gradients g_b."""
    total = torch.zeros_like(vs)
    primal = {n: p.detach() for n, p in op.named_params}
    eps = op.fd_eps
    for i, batch in enumerate(op.iter_batches()):
        _, loss_of = op.functional(batch)
        grad_fn = torch.func.grad(loss_of)
        out = torch.zeros_like(vs)
        for r in range(vs.shape[0]):
            tangent = dict(zip(op.names, lparams.unflatten(vs[r], op.params)))
            with op.batch_rng(i):
                plus = grad_fn({n: primal[n] + eps * tangent[n] for n in op.names})
            with op.batch_rng(i):
                minus = grad_fn({n: primal[n] - eps * tangent[n] for n in op.names})
            diff = lparams.flatten([plus[n] - minus[n] for n in op.names])
            out[r] = (diff / (2 * eps + op.fd_offset)).detach()
        total += batch_size_of(batch) * out
    return total


def output_space(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b Jᵀ M_out J V for the operator's output-space matrix (``op.output_matrix``):
    forward-mode J v, M_out applied in output space, then one vjp per row."""
    total = torch.zeros_like(vs)
    primal = {n: p.detach() for n, p in op.named_params}
    for i, batch in enumerate(op.iter_batches()):
        output_of, _ = op.functional(batch)
        out_rows = torch.zeros_like(vs)
        with op.batch_rng(i):
            (out, target), pullback = vjp_out(output_of, primal)
        apply_m = op.output_matrix(i, out.detach(), target)
        del out  # the output-space matrix keeps what it needs (softmax probabilities for CE)
        for r in range(vs.shape[0]):
            tangent = dict(zip(op.names, lparams.unflatten(vs[r], op.params)))
            with op.batch_rng(i):
                jv = torch.func.jvp(lambda p: output_of(p)[0], (primal,), (tangent,))[1]  # primal output freed
            (back,) = pullback(apply_m(jv))
            del jv
            out_rows[r] = lparams.flatten([back[n] for n in op.names]).detach()
        total += batch_size_of(batch) * out_rows
    return total


#: product name → function(op, V) returning Σ_b n_b M_b V over the operator's local batches
PRODUCTS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "double-backward": double_backward,
    "forward-over-reverse": forward_over_reverse,
    "finite-difference": finite_difference,
    "output-space": output_space,
}
