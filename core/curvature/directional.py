"""Curvature along one direction: batch sharpness (one HVP per batch) and critical sharpness (forwards only).

**Batch sharpness** (Andreyev & Beneventano 2024, "Edge of Stochastic Stability: Revisiting
the Edge of Stability for SGD", arXiv:2412.20553): the directional curvature of each
mini-batch loss L_B along its own gradient g_B = ∇L_B,

    BS = E_B[ g_Bᵀ H_B g_B / ‖g_B‖² ],

the expectation over mini-batches B of the training batch size. Under mini-batch SGD with
step η it is this quantity, not λ_max of the full-batch Hessian, that settles at 2/η. The
paper's text calls it "the expected directional curvature of mini-batch Hessians along their
corresponding stochastic gradients"; the authors' code (github.com/arseniqum/
edge-of-stochastic-stability, ``utils/measure.py:calculate_averaged_grad_H_grad``) estimates
the **mean of the per-batch ratios** by default (``expectation_inside=False``), with the ratio
of means E[gᵀHg]/E[‖g‖²] as an option, drawing each batch as ``batch_size`` samples taken
uniformly without replacement from the training set, independently for every estimate, until
the relative standard error falls below a tolerance. :func:`batch_sharpness` returns both
estimators (``value`` is the mean of ratios) over the batches it is given: pass the
training loader's next batches, or :func:`random_batches` for the authors' sampling.
Cost: per batch one gradient and one Hessian-vector product.

**Critical sharpness** (Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for
Analyzing the Training Dynamics of LLMs", arXiv:2601.16979): λ_c = 2/η_c, with η_c the
smallest learning rate at which the optimizer's actual update u (θ_next = θ + η u) increases
the loss, L(θ + η_c u) > L(θ), found by a line search on forward passes only. For a
quadratic loss η_c = 2(−gᵀu)/(uᵀHu), so λ_c = uᵀHu/(−gᵀu): for gradient descent (u = −g)
the Rayleigh quotient of H at g, for an adaptive step the curvature along the update
normalised by the descent it promises. The authors' code (github.com/facebookresearch/
scalable-curvature, ``utils/measure_critical_lr.py``) doubles or halves a guess until the loss
change flips sign, then bisects to a relative bracket of 2⁻⁴; they report 5–6 forwards given
a good guess. :func:`critical_sharpness` does the same, with the guess from a three-point
quadratic model along u when none is given, within a budget of 10 loss evaluations, and
returns the bracket and the quadratic-model value uᵀHu/(−gᵀu) next to it. No HVP.

:func:`directional_curvature` is the plain finite-difference curvature uᵀHu/‖u‖² along any
direction from 3 (or, with Richardson extrapolation, 5) loss evaluations.

The loss evaluations move the operator's parameters in place (under ``no_grad``) and put the
exact original values back; an operator with a cached graph is released afterwards. One loss
evaluation is one forward pass per batch of the operator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from lscape import params as lparams
from lscape.curvature.operator import HessianOperator

__all__ = [
    "BatchSharpness",
    "batch_sharpness",
    "random_batches",
    "DirectionalCurvature",
    "directional_curvature",
    "CriticalSharpness",
    "critical_sharpness",
]


# -- batch sharpness -------------------------------------------------------------------------


@dataclass
class BatchSharpness:
    """``value`` mean over batches of g_Bᵀ H_B g_B / ‖g_B‖² (the authors' default estimator);
    ``ratio_of_means`` Σ g_BᵀH_Bg_B / Σ ‖g_B‖²; ``ratios`` the per-batch quotients (float64);
    ``stderr`` standard error of ``value`` (nan for one batch); ``num_batches``;
    ``num_products`` Hessian-vector products spent (one per batch)."""

    value: float
    ratio_of_means: float
    ratios: torch.Tensor
    stderr: float
    num_batches: int
    num_products: int


def batch_sharpness(
    model: torch.nn.Module,
    loss_fn: Any,
    batches: Iterable[Any],
    params: Any = None,
    mode: str = "eval",
    operator: Callable[..., Any] | None = None,
    **operator_kwargs: Any,
) -> BatchSharpness:
    """Batch sharpness E_B[g_BᵀH_Bg_B/‖g_B‖²] over ``batches`` (each one mini-batch B).

    ``operator(model, loss_fn, [batch], params=..., mode=..., **operator_kwargs)`` builds the
    curvature operator of one batch (default :class:`lscape.curvature.HessianOperator`; any
    registered operator with ``gradient()`` and ``matvec``). A batch with a zero gradient is
    skipped (its quotient is undefined); ValueError when no batch is left.
    """
    make = operator or HessianOperator
    ghg, gg = [], []
    products = 0
    for batch in batches:
        op = make(model, loss_fn, [batch], params=params, mode=mode, **operator_kwargs)
        g = op.gradient()
        norm2 = float(torch.dot(g.double(), g.double()))
        if norm2 == 0.0:
            continue
        hg = op.matvec(g)
        products += 1
        ghg.append(float(torch.dot(g.double(), hg.double())))
        gg.append(norm2)
        if hasattr(op, "release"):
            op.release()
    if not gg:
        raise ValueError("batch sharpness needs at least one batch with a non-zero gradient")
    num = torch.tensor(ghg, dtype=torch.float64)
    den = torch.tensor(gg, dtype=torch.float64)
    ratios = num / den
    n = len(ratios)
    stderr = float(ratios.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return BatchSharpness(value=float(ratios.mean()), ratio_of_means=float(num.sum() / den.sum()), ratios=ratios,
                          stderr=stderr, num_batches=n, num_products=products)


def random_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, num_batches: int,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_batches`` mini-batches drawn as the authors draw them: each ``batch_size``
    samples uniformly without replacement, independently of the other batches."""
    n = len(inputs)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the {n} samples, not {batch_size}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be positive, not {num_batches}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        out.append((inputs[idx], targets[idx]))
    return out


# -- moving along a line ---------------------------------------------------------------------


class _Line:
    """L(θ + t u) for the operator's parameters, counting loss evaluations; restores θ on close."""

    def __init__(self, op: Any, direction: torch.Tensor):
        params = list(getattr(op, "params", None) or [])
        if not params:
            raise ValueError("the operator exposes no parameters (op.params) to move along a direction")
        dim = lparams.numel(params)
        if direction.shape != (dim,):
            raise ValueError(f"direction has shape {tuple(direction.shape)}, the operator's parameters ({dim},)")
        if not bool(torch.isfinite(direction).all()):
            raise ValueError("the direction has non-finite entries")
        self.op = op
        self.params = params
        self.origin = [p.detach().clone() for p in params]
        self.parts = lparams.unflatten(direction.detach().to(params[0].dtype), params)
        self.evals = 0

    def __call__(self, t: float) -> float:
        with torch.no_grad():
            for p, p0, d in zip(self.params, self.origin, self.parts):
                p.copy_(p0)
                if t:
                    p.add_(d.to(device=p.device, dtype=p.dtype), alpha=t)
        self.evals += 1
        return float(self.op.loss())

    def close(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.origin):
                p.copy_(p0)
        if hasattr(self.op, "release"):
            self.op.release()  # a cached graph saw the moved parameters


def _default_h(dtype: torch.dtype, richardson: bool) -> float:
    """Step length in parameter space balancing truncation against rounding: eps^(1/4) for the
    O(h²) central difference, eps^(1/6) for the O(h⁴) Richardson extrapolation."""
    eps = torch.finfo(dtype).eps
    return eps ** (1 / 6) if richardson else eps ** 0.25


@dataclass
class DirectionalCurvature:
    """``value`` uᵀHu/‖u‖² by finite differences; ``h`` the step length used (along u/‖u‖);
    ``num_loss_evals`` loss evaluations (3, or 5 with Richardson); ``slope`` gᵀu/‖u‖²
    (central difference); ``richardson`` whether the O(h⁴) extrapolation was used."""

    value: float
    h: float
    num_loss_evals: int
    slope: float
    richardson: bool


def directional_curvature(op: Any, direction: torch.Tensor, h: float | None = None,
                          richardson: bool = False) -> DirectionalCurvature:
    """uᵀHu/‖u‖² of the operator's loss along ``direction`` u from loss values alone.

    Central second difference (L(θ+hû) − 2L(θ) + L(θ−hû))/h² on the unit direction û, error
    O(h²) + O(eps·L/h²), with h = eps^(1/4) by default; ``richardson=True`` combines steps h
    and 2h, (4D(h) − D(2h))/3, error O(h⁴), h = eps^(1/6) by default (5 evaluations).
    """
    norm = float(direction.double().norm())
    if norm == 0.0:
        raise ValueError("the direction is zero")
    line = _Line(op, direction)
    try:
        step = float(h) if h is not None else _default_h(line.params[0].dtype, richardson)
        if step <= 0:
            raise ValueError(f"the finite-difference step h must be positive, not {step}")
        t = step / norm
        l0, lp, lm = line(0.0), line(t), line(-t)
        d1 = (lp - 2 * l0 + lm) / step**2
        slope = (lp - lm) / (2 * step)
        value = d1
        if richardson:
            lp2, lm2 = line(2 * t), line(-2 * t)
            d2 = (lp2 - 2 * l0 + lm2) / (2 * step) ** 2
            value = (4 * d1 - d2) / 3
            slope = (8 * (lp - lm) - (lp2 - lm2)) / (12 * step)
        return DirectionalCurvature(value=value, h=step, num_loss_evals=line.evals, slope=slope / norm,
                                    richardson=richardson)
    finally:
        line.close()


# -- critical sharpness ----------------------------------------------------------------------


@dataclass
class CriticalSharpness:
    """``value`` λ_c = 2/η_c at the middle of the final bracket of η_c; ``lower``/``upper``
    bounds on λ_c (2/η_upper, 2/η_lower; upper is inf when no η without a loss increase was
    found); ``eta_bracket`` (η_lower, η_upper); ``quadratic`` uᵀHu/(−gᵀu) from the three-point
    model along u (nan when not computed or not a descent direction); ``num_loss_evals``
    loss evaluations (each one forward pass per batch); ``converged`` whether the bracket
    met ``rtol`` within the budget."""

    value: float
    lower: float
    upper: float
    eta_bracket: tuple[float, float]
    quadratic: float
    num_loss_evals: int
    converged: bool
    losses: list[tuple[float, float]] = field(default_factory=list)


def critical_sharpness(
    op: Any,
    update: torch.Tensor,
    lr_guess: float | None = None,
    max_loss_evals: int = 10,
    rtol: float = 1 / 16,
    growth: float | None = None,
    h: float | None = None,
) -> CriticalSharpness:
    """Critical sharpness 2/η_c along ``update`` u (the step per unit learning rate:
    θ_next = θ + η u; for SGD u = −g, for Adam u = −P⁻¹m).

    Line search as in the authors' code: from the guess η₀, multiply (no increase) or divide
    (increase) by ``growth`` until L(θ + ηu) − L(θ) changes sign, then bisect until the
    bracket's relative width 1 − η_lo/η_hi ≤ ``rtol`` (2⁻⁴, the authors' default) or
    ``max_loss_evals`` evaluations (L(θ) included) are spent. Without ``lr_guess`` the guess
    is the quadratic model's η_q = 2(−gᵀu)/(uᵀHu) from L(θ ± hû) (2 evaluations; growth 1.1
    around it, squared after each step that does not bracket), which is also returned as
    ``quadratic`` = 2/η_q; with a guess the growth is a constant 2, as in the authors' code.
    """
    if max_loss_evals < 3:
        raise ValueError(f"max_loss_evals must be at least 3, not {max_loss_evals}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), not {rtol}")
    norm = float(update.double().norm())
    if norm == 0.0:
        raise ValueError("the update direction is zero")
    line = _Line(op, update)
    losses: list[tuple[float, float]] = []
    try:
        l0 = line(0.0)
        losses.append((0.0, l0))
        quadratic = float("nan")
        guess = float(lr_guess) if lr_guess is not None else None
        if guess is None:
            step = float(h) if h is not None else _default_h(line.params[0].dtype, False)
            t = step / norm
            lp, lm = line(t), line(-t)
            losses += [(t, lp), (-t, lm)]
            curv = (lp - 2 * l0 + lm) / t**2  # uᵀHu
            slope = (lp - lm) / (2 * t)  # gᵀu
            if slope < 0 and curv > 0:
                quadratic = curv / -slope
                guess = 2 / quadratic
            elif slope >= 0:
                raise ValueError("the update is not a descent direction at this point (gᵀu ≥ 0): the loss "
                                 "increases for every learning rate and the critical sharpness is infinite")
            else:
                raise ValueError("the loss is concave along the update (uᵀHu ≤ 0): no quadratic guess of the "
                                 "critical learning rate; pass lr_guess")
            grow = growth if growth is not None else 1.1
        else:
            if guess <= 0:
                raise ValueError(f"lr_guess must be positive, not {guess}")
            grow = growth if growth is not None else 2.0
        if grow <= 1:
            raise ValueError(f"growth must exceed 1, not {grow}")
        # around the quadratic guess the factor squares after each step that does not bracket
        # (1.1, 1.21, 1.46, 2.14, ...), so a poor guess still brackets within the budget
        accelerate = lr_guess is None
        lo, hi = 0.0, math.inf
        eta = guess
        converged = False
        while line.evals < max_loss_evals:
            value = line(eta)
            losses.append((eta, value))
            if value > l0:
                hi = eta
            else:
                lo = eta
            if lo > 0 and hi < math.inf:
                if 1 - lo / hi <= rtol:
                    converged = True
                    break
                eta = (lo + hi) / 2
            else:
                eta = eta * grow if hi == math.inf else eta / grow
                if accelerate:
                    grow *= grow
        if hi == math.inf:  # never increased: η_c > lo
            mid, lower, upper = math.nan, 0.0, 2 / lo
        elif lo == 0:  # increased at every η tried: η_c < hi
            mid, lower, upper = math.nan, 2 / hi, math.inf
        else:
            mid, lower, upper = 4 / (lo + hi), 2 / hi, 2 / lo
        return CriticalSharpness(value=mid, lower=lower, upper=upper, eta_bracket=(lo, hi), quadratic=quadratic,
                                 num_loss_evals=line.evals, converged=converged, losses=losses)
    finally:
        line.close()
