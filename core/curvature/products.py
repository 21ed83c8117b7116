"""How a curvature matrix is applied to vectors: the product methods, and the one place that chooses.

Each product maps an operator and a (c, dim) block V to Σ_b n_b M_b V over the operator's
local batches (:func:`reduce_product` sums over ranks and divides by the sample count):

- ``double-backward``: H_b V by differentiating g·v through the first-order graph (cached
  by the operator when it may be);
- ``forward-over-reverse``: the jvp of torch.func's gradient function (reverse-over-forward
  where a loss has no forward-mode rule for its backward);
- ``finite-difference``: central differences of gradients on the parameters in place,
  (g(θ+εv) − g(θ−εv)) / (2ε + ``fd_offset``), ε from a per-dtype rule scaled to ‖θ‖/‖v‖,
  optionally Richardson-extrapolated, with an error estimate (``op.product_error``);
  it needs gradients only (what a sharded model offers);
- ``output-space``: Jᵀ M_out J V for matrices defined in output space (Gauss–Newton,
  Fisher): forward-mode J v, ``op.output_matrix`` applied, one vjp back per row.

``method="auto"`` is resolved on the operator's first product by :func:`ladder`: the
autograd products are checked against finite differences along one vector and the first
that agrees is kept, else finite differences; the choice and why are recorded on the
operator (``method``, ``method_reason``, ``method_check``).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch

from lscape import params as lparams
from lscape.batch import batch_size_of
from lscape.curvature import distributed
from lscape.curvature._support import grad_rows, unflatten_rows, vjp_out
from lscape.curvature.errors import CurvatureArgumentError

__all__ = ["METHODS", "PRODUCTS", "LADDER", "choose_method", "uses_graph", "double_backward", "forward_over_reverse",
           "finite_difference", "output_space", "ladder", "reduce_product", "fd_step", "unit_roundoff",
           "forget_decisions"]

#: the ``method`` values a caller may ask for
METHODS = ("auto", "double-backward", "forward-over-reverse", "finite-difference")


def choose_method(method: str, fixed: str | None = None) -> str:
    """The product an operator uses: its ``fixed`` product if it has one, else ``method``.

    ``"auto"`` stays ``"auto"`` here: the operator resolves it on its first product with
    :func:`ladder`, which prefers double backward (measured on the benchmark CNN,
    benchmarks/curvature.py, 2 CPU cores, torch 2.13: with a cached first-order graph a
    double-backward product is one backward pass, about 0.9× a gradient; uncached about
    1.5×, against about 2× for torch.func forward-over-reverse and 2× (4× with
    Richardson) for finite differences).
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, not {type(method).__name__}")
    method = method.replace("_", "-")
    if method not in METHODS:
        raise CurvatureArgumentError(f"unknown HVP method {method!r}; choose one of {', '.join(METHODS)}", "method")
    if fixed is not None:
        return fixed
    return method


def uses_graph(method: str) -> bool:
    """Whether the product reuses a first-order graph per batch (which the operator may cache);
    ``"auto"`` usually resolves to double backward."""
    return method in ("double-backward", "auto")


def double_backward(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b H_b V by differentiating g·v; V's rows are batched through autograd's vmap.

    One backward pass through each batch's first-order graph per row (cached by the operator
    when it may be: then a product costs that backward alone) and one concatenation of the
    per-parameter results; the batch sums are accumulated in place (no zero block, no scaled copy)."""
    total = None
    for weight, grads in op.first_order_graphs():
        part = _double_backward_batch(op.params, grads, vs)
        if total is None:
            total = part.mul_(weight) if weight != 1.0 else part
        else:
            total.add_(part, alpha=weight)
    return total if total is not None else torch.zeros_like(vs)


def _double_backward_batch(params: list[torch.Tensor], grads: list[torch.Tensor], vs: torch.Tensor) -> torch.Tensor:
    live = [(g, j) for j, g in enumerate(grads) if g.requires_grad]
    if not live:  # the loss is linear in these parameters
        return torch.zeros_like(vs)
    parts = unflatten_rows(vs, params)
    outputs = [g for g, _ in live]
    cotangents = [parts[j] for _, j in live]

    def one_row(r: int) -> torch.Tensor:
        hv = torch.autograd.grad(outputs, params, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
        return lparams.flatten(hv, like=params).detach()

    if vs.shape[0] == 1:
        return one_row(0).unsqueeze(0)
    out = torch.empty_like(vs)
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


# -- finite differences -------------------------------------------------------------------
#
# Central differences of gradients, taken on the parameters in place: θ is moved to θ ± εv,
# the operator's own gradient path runs there (its batches, mode and dropout masks, and
# the all-reduce over ranks), and θ is put back by copying a saved copy of the selected
# parameters (never by subtracting εv again, which would not round-trip exactly).
#
# Step (ε, :func:`fd_step`): for a scalar function f the central difference
# (f′(x+h) − f′(x−h))/2h has truncation error h²|f⁗|/6 and roundoff error about u|f′|/h
# (u the unit roundoff of the dtype); their sum is smallest at h ∝ u^{1/3}·scale(x), the
# textbook h = u^{1/3}·max(1, |x|). Along a direction v in parameter space the scale of x
# is that of a typical parameter entry, rms(θ) = ‖θ‖/√dim, not ‖θ‖:
#     ε = FD_SCALE · u^{1/3} · max(1, rms(θ)) / ‖v‖,
# so the step ‖εv‖ = FD_SCALE·u^{1/3}·max(1, rms θ) does not grow with the width. Scaling
# by ‖θ‖ (which grows as √dim) made the truncation error, ∝ ‖εv‖², grow with the number
# of parameters: measured on a tanh MLP of 648k parameters (benchmarks/distributed.py
# --eps), the top eigenvector's Rayleigh quotient was 5.0e-4 relatively off with
# ‖εv‖ = u^{1/3}‖θ‖ = 0.089 and 1.6e-6 with this rule (‖εv‖ = 3.9e-3), against exact
# double-backward products. The Richardson combination
# (4 D(ε/2) − D(ε))/3 cancels the ε² term; its error is O(ε⁴) + O(u/ε), smallest at
# ε ∝ u^{1/5}: the same rule with the power 1/5. float32: u^{1/3} ≈ 3.9e-3,
# u^{1/5} ≈ 3.6e-2; float64: u^{1/3} ≈ 4.8e-6, u^{1/5} ≈ 6.1e-4.
#
# Error estimate: ‖D(ε) − D(ε/2)‖, the difference between the step and half the step. It
# sees both error sources without a model of either: truncation shrinks by 4 from ε to
# ε/2, so the difference is ¾ of D(ε)'s truncation error; roundoff doubles, so the
# difference is about the roundoff of D(ε/2); a kink crossed by the step (ReLU) gives an
# error linear in ε, half of which the difference sees. To leading order it bounds the
# error of the Richardson value too (whose truncation is O(ε⁴)). The operator keeps the
# relative estimate ‖D(ε) − D(ε/2)‖ / ‖product‖ as ``product_error`` (the largest seen):
# an eigenvalue computed from these products is off by about product_error·‖M‖ at most.

#: c in ε = c·u^p·max(1, rms θ)/‖v‖, p = 1/3 (central differences) or 1/5 (Richardson)
FD_SCALE = 1.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the machine epsilon of a floating dtype (2⁻²⁴ for float32, 2⁻⁵³ for float64)."""
    return torch.finfo(dtype).eps / 2


def fd_step(op: Any, v_norm: float) -> float:
    """The finite-difference step ε for a direction of norm ``v_norm``: ``op.fd_eps`` when the
    caller fixed one (applied to v as given), ``op.fd_length``/‖v‖ when a probe's ``fd_eps``
    option fixed the length of the move, else FD_SCALE·u^p·max(1, rms(θ))/‖v‖ (see
    above), rms(θ) = ‖θ‖/√(global dim) and u the unit roundoff of the dtype the gradients
    are computed in (``op.fd_dtype`` when set: a bf16 mixed-precision policy, else ``op.dtype``)."""
    if op.fd_eps is not None:
        return op.fd_eps
    if getattr(op, "fd_length", None) is not None:  # a probe's fd_eps option: the length of the move εv
        return op.fd_length / v_norm
    power = 1 / 5 if op.fd_richardson else 1 / 3
    rms = theta_norm(op) / max(int(getattr(op, "global_dim", op.dim)), 1) ** 0.5
    dtype = getattr(op, "fd_dtype", None) or op.dtype
    return FD_SCALE * unit_roundoff(dtype) ** power * max(1.0, rms) / v_norm


def theta_norm(op: Any) -> float:
    """‖θ‖ of the selected parameters, computed once per operator and identical on every rank
    (squares summed over ranks when the parameters are sharded across them, ``op.sharded``)."""
    if op.theta_norm is None:
        sq = sum(float(torch.sum(p.detach().double() ** 2)) for p in op.params)
        total = torch.tensor([sq], dtype=torch.float64, device=op.device)
        op.theta_norm = float(distributed.all_reduce_(total, op="sum" if op.sharded else "mean")[0]) ** 0.5
    return op.theta_norm


@contextlib.contextmanager
def shifted_parameters(op: Any):
    """Yield ``move(step, parts)``, which sets θ ← θ₀ + step·v in place (``parts``: v per
    parameter); θ₀ is restored bit-exactly on exit by copying a saved copy back. Writes go
    through ``.data``, so no autograd version counter moves (a cached graph that saved a
    parameter stays valid once θ₀ is back)."""
    saved = [p.detach().clone() for p in op.params]

    def move(step: float, parts: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s, t in zip(op.params, saved, parts):
                torch.add(s, t, alpha=step, out=p.data)

    try:
        yield move
    finally:
        with torch.no_grad():
            for p, s in zip(op.params, saved):
                p.data.copy_(s)


def _central(op: Any, move: Callable, parts: list[torch.Tensor], step: float) -> torch.Tensor:
    move(step, parts)
    plus = op.gradient_sum()
    move(-step, parts)
    minus = op.gradient_sum()
    return (plus - minus) / (2 * step + op.fd_offset)


def fd_rows(op: Any, vs: torch.Tensor, estimate: Any = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Local central differences Σ_b n_b D_b(ε) of the rows of ``vs`` (gradients at θ ± εv, the
    parameters moved in place), and D(ε/2) for the rows in ``estimate`` ({row: local sum})."""
    out = torch.zeros_like(vs)
    halves: dict[int, torch.Tensor] = {}
    norms = distributed.row_norms(vs, sharded=op.sharded)
    with shifted_parameters(op) as move:
        for r in range(vs.shape[0]):
            v_norm = float(norms[r])
            if v_norm == 0:
                if r in estimate:
                    halves[r] = torch.zeros_like(vs[r])
                continue
            parts = lparams.unflatten(vs[r], op.params)
            step = fd_step(op, v_norm)
            out[r] = _central(op, move, parts, step)
            if r in estimate:
                halves[r] = _central(op, move, parts, step / 2)
    return out, halves


def finite_difference(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """Σ_b n_b M_b V by central differences of gradients, the parameters moved in place.

    (g(θ+εv) − g(θ−εv)) / (2ε + ``fd_offset``) with ε from :func:`fd_step`. With
    ``op.fd_richardson`` every row is (4 D(ε/2) − D(ε))/3 and carries its error estimate;
    otherwise the operator's first product also computes D(ε/2) on its first row, for the
    estimate only. The estimate's rows wait in ``op.pending_error`` for
    :func:`reduce_product`, which reduces them with the product and updates
    ``op.product_error``.
    """
    rows = range(vs.shape[0]) if op.fd_richardson else ([0] if op.product_error is None else [])
    out, halves = fd_rows(op, vs, estimate=set(rows))
    if halves:
        idx = sorted(halves)
        diff = torch.stack([out[r] - halves[r] for r in idx])
        if op.fd_richardson:
            for r in idx:
                out[r] = (4 * halves[r] - out[r]) / 3
        op.pending_error = (idx, diff)
    return out


def reduce_product(op: Any, total: torch.Tensor) -> torch.Tensor:
    """A product's local rows summed over ranks and divided by the sample count. Error rows left
    by a finite-difference product (``op.pending_error``) travel in the same all-reduce, and
    ``op.product_error`` becomes the largest relative estimate ‖D(ε) − D(ε/2)‖/‖Mv‖ seen."""
    pending, op.pending_error = op.pending_error, None
    if pending is None:
        return distributed.all_reduce_(total).div_(op.num_samples)
    idx, diff = pending
    c = total.shape[0]
    both = distributed.all_reduce_(torch.cat([total, diff])).div_(op.num_samples)
    total, diff = both[:c], both[c:]
    err = distributed.row_norms(diff, sharded=op.sharded)
    size = distributed.row_norms(total[idx], sharded=op.sharded)
    rel = torch.where(size > 0, err / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(err))
    op.product_error = max(op.product_error or 0.0, float(rel.max()))
    return total


# -- the ladder -----------------------------------------------------------------------------
#
# method="auto" decides on the operator's first product which product to trust, along the
# first vector v of that product:
#
#   1. a finite-difference reference F v = (4 D(ε/2) − D(ε))/3 from gradients only (the
#      operator's own step rule), with its error estimate e = ‖D(ε) − D(ε/2)‖: four
#      gradient passes, once;
#   2. the double-backward product A v (the first product's answer, when kept) is kept if
#          ‖A v − F v‖ ≤ LADDER_SAFETY·e + u^{1/3}·max(‖A v‖, ‖F v‖);
#   3. otherwise, or when A raises, forward-over-reverse is tried the same way; then finite
#      differences for every product.
#
# The relative floor u^{1/3} (3.9e-3 in float32, 4.8e-6 in float64) keeps a lucky small
# estimate (D(ε) and D(ε/2) agreeing by chance) from rejecting an exact product; it is
# also the resolution of the test: a missing second-order path that changes Hv by less
# than that relative amount goes unseen. A silently dropped path (an autograd.Function
# whose backward is @once_differentiable: double backward treats its backward as
# constant, without an error) changes Hv by O(1) relative. The decision is cached per
# model object (weakly: it goes with the model) and per (matrix, mode, parameters, dtype,
# device, loss, fd options), so later operators on the same model skip the check. Where
# finite differences are too inaccurate to judge (tolerance ≥ INCONCLUSIVE relative: kinks
# crossed by the step) the autograd product is kept and the reason says it is unverified.

#: the disagreement allowed, in units of the finite-difference error estimate
LADDER_SAFETY = 10.0

#: a relative tolerance at or above this makes the check inconclusive: the autograd product is
#: kept, marked unverified (``method_check["conclusive"]`` False). Piecewise-linear models
#: (ReLU, max-pooling) get there in float32: the step crosses kinks, and the jumps of the
#: gradient there give finite differences an O(1) error whatever the step (measured: a
#: ReLU CNN with BatchNorm, estimate 0.5, disagreement 0.97)
INCONCLUSIVE = 0.5

#: the autograd products tried, in order, before finite differences
LADDER = ("double-backward", "forward-over-reverse")

_DECISIONS: "weakref.WeakKeyDictionary[Any, dict[tuple, dict[str, Any]]]" = weakref.WeakKeyDictionary()


def ladder_floor(dtype: torch.dtype) -> float:
    """The relative disagreement always allowed by the ladder: u^{1/3} of the dtype."""
    return unit_roundoff(dtype) ** (1 / 3)


def forget_decisions(model: Any = None) -> None:
    """Drop the cached ladder decisions of ``model`` (of every model when None)."""
    if model is None:
        _DECISIONS.clear()
    else:
        _DECISIONS.pop(model, None)


def _decision_key(op: Any) -> tuple:
    loss = op.loss_fn
    loss_name = "model" if loss is None else \
        f"{getattr(loss, '__module__', '')}.{getattr(loss, '__qualname__', type(loss).__qualname__)}"
    return (type(op).__qualname__, op.mode, tuple(op.names), str(op.dtype), op.device.type, loss_name,
            op.fd_eps, op.fd_richardson)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def ladder(op: Any, vs: torch.Tensor) -> torch.Tensor:
    """The first product of a ``method="auto"`` operator: choose the product (see above), set
    ``op.method``, ``op.method_reason`` and ``op.method_check``, and return M V reduced."""
    try:
        cache = _DECISIONS.setdefault(op.model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache
        cache = {}
    key = _decision_key(op)
    if key in cache:
        decided = cache[key]
        op.method = decided["method"]
        op.method_reason = decided["reason"] + " (decided on the first operator of this model)"
        op.method_check = dict(decided["check"])
        if op.method == "finite-difference":
            op.product_error = decided["check"]["fd_error"] if not op.fd_richardson else None
        return reduce_product(op, PRODUCTS[op.method](op, vs))

    d1, halves = fd_rows(op, vs[:1], estimate={0})
    both = reduce_product(op, torch.cat([d1, halves[0].unsqueeze(0)]))
    plain, half = both[:1], both[1:]
    reference = (4 * half - plain) / 3
    fd_err = float(distributed.row_norms(plain - half, sharded=op.sharded)[0])
    ref_norm = float(distributed.row_norms(reference, sharded=op.sharded)[0])
    floor = ladder_floor(op.dtype)
    check: dict[str, Any] = {"fd_error": fd_err / ref_norm if ref_norm > 0 else 0.0, "safety": LADDER_SAFETY,
                             "floor": floor}
    notes = []
    for name in LADDER:
        try:
            out = reduce_product(op, PRODUCTS[name](op, vs))
        except Exception as err:  # noqa: BLE001 - an autograd product that fails sends the operator down the ladder
            op.release()
            check[name] = {"raised": _first_line(err)}
            notes.append(f"{name} raised {_first_line(err)}")
            continue
        a_norm = float(distributed.row_norms(out[:1], sharded=op.sharded)[0])
        gap = float(distributed.row_norms(out[:1] - reference, sharded=op.sharded)[0])
        scale = max(a_norm, ref_norm)
        tolerance = LADDER_SAFETY * fd_err + floor * scale
        rel, rel_tol = (gap / scale, tolerance / scale) if scale > 0 else (0.0, 0.0)
        check[name] = {"disagreement": rel, "tolerance": rel_tol}
        if gap <= tolerance:
            check["conclusive"] = rel_tol < INCONCLUSIVE
            if check["conclusive"]:
                notes.append(f"{name} agrees with finite differences of gradients on the first product (relative "
                             f"disagreement {rel:.2g} <= tolerance {rel_tol:.2g}; finite-difference error "
                             f"estimate {check['fd_error']:.2g})")
            else:
                notes.append(f"{name} kept unverified: finite differences of gradients are too inaccurate here "
                             f"to check it (error estimate {check['fd_error']:.2g}, relative disagreement "
                             f"{rel:.2g}; kinks such as ReLU or max-pooling crossed by the step, whose jumps "
                             f"finite differences see and the Hessian does not)")
            return _decide(op, cache, key, name, "; ".join(notes), check, out)
        op.release()
        notes.append(f"{name} disagrees with finite differences of gradients by {rel:.2g} relative (tolerance "
                     f"{rel_tol:.2g}): a second-order path is missing (e.g. an autograd.Function whose backward "
                     f"is @once_differentiable)")
    notes.append(f"finite differences of gradients used (estimated relative error {check['fd_error']:.2g})")
    op.product_error = check["fd_error"] if not op.fd_richardson else None
    out = reduce_product(op, finite_difference(op, vs))
    return _decide(op, cache, key, "finite-difference", "; ".join(notes), check, out)


def _decide(op: Any, cache: dict, key: tuple, method: str, reason: str, check: dict, out: torch.Tensor) -> torch.Tensor:
    op.method, op.method_reason, op.method_check = method, reason, check
    cache[key] = {"method": method, "reason": reason, "check": dict(check)}
    return out


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
