"""The imagenet-grad-noise statistics (Zhang et al. 2022) as pure functions of a model and batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ._per_sample import Batch, LossFn

__all__ = [
    "gradient_norms",
    "minibatch_noise",
    "ResampledHessian",
    "sharpness",
    "seed_power_method",
    "directional_sharpness",
]


def gradient_norms(g: torch.Tensor) -> dict[str, float]:
    """``grad_sq`` = ‖ĝ‖², ``grad_l1`` = ‖ĝ‖₁, ``grad_linf`` = ‖ĝ‖_∞ of a flat gradient."""
    g = g.double()
    return {
        "grad_sq": float(g @ g),
        "grad_l1": float(g.abs().sum()),
        "grad_linf": float(g.abs().max()),
    }


def minibatch_noise(g_hat: torch.Tensor, grads: Iterable[torch.Tensor]) -> dict[str, float]:
    """Means over minibatch gradients g_j: ``noise_sq`` = ‖g_j − ĝ‖², ``stograd_sq`` = ‖g_j‖²,
    ``stograd_linf`` = ‖g_j‖_∞ (the seed's per-minibatch noise, a squared norm)."""
    g_hat = g_hat.double()
    noise = sq = linf = 0.0
    count = 0
    for g in grads:
        g = g.double()
        d = g - g_hat
        noise += float(d @ d)
        sq += float(g @ g)
        linf += float(g.abs().max())
        count += 1
    if count == 0:
        raise ValueError("minibatch_noise needs at least one minibatch gradient")
    return {"noise_sq": noise / count, "stograd_sq": sq / count, "stograd_linf": linf / count}


class ResampledHessian:
    """A Hessian operator that draws fresh batches at every product (the seed's behaviour).

    Each ``matvec`` builds the toolkit's HessianOperator on ``count`` new batches from
    ``draw(count)``; the result is a different random matrix each time, which is why lscape
    uses a fixed operator by default and keeps this only for ``compat=original``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, draw: Callable[[int], list[Batch]], count: int,
                 params: Any = None, mode: str = "train"):
        from lscape.curvature import HessianOperator

        self._make = lambda batches: HessianOperator(model, loss_fn, batches, params=params, mode=mode,
                                                     cache_graph=False)
        self._draw = draw
        self._count = count
        probe = self._make(draw(count))
        self.dim, self.dtype, self.device, self.params = probe.dim, probe.dtype, probe.device, probe.params
        self._first = probe  # the batches drawn for sizing are used by the first product
        self.num_products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H_{B_t} v on the batches of this product."""
        op, self._first = (self._first, None) if self._first is not None else (self._make(self._draw(self._count)), None)
        self.num_products += 1
        return op.matvec(v)


@dataclass
class Sharpness:
    """Result of :func:`sharpness`: the Rayleigh quotient and how the power method ended."""

    value: float
    vector: torch.Tensor
    residual: float
    converged: bool
    num_products: int


def sharpness(op: Any, v0: torch.Tensor, iters: int = 5, tol: float = 1e-2) -> Sharpness:
    """The seed's power method (from sgd.stability): start from ``v0`` (ĝ, not random),
    Rayleigh quotient μ = vᵀHv, at most ``iters`` iterations, stop at relative change < ``tol``.

    ``op`` is a fixed HessianOperator (lscape's default) or a :class:`ResampledHessian`.
    """
    from lscape.curvature import power_iteration

    if float(v0.norm()) == 0.0:
        raise ValueError("the power method cannot start from a zero gradient")
    res = power_iteration(op, k=1, iters=iters, tol=tol, v0=v0)
    return Sharpness(float(res.eigenvalues[0]), res.eigenvectors[0], float(res.residuals[0]),
                     bool(res.converged[0]), res.num_products)


def seed_power_method(op: Any, v0: torch.Tensor, iters: int = 5, tol: float = 1e-2) -> Sharpness:
    """The seed's own ``utils.power_method`` (imagenet-grad-noise), step for step.

    ``mu = 1e-6; v = v0/‖v0‖``; then at most ``iters`` times: ``Av = op(v)``,
    ``mu_pre = mu``, ``mu = vᵀAv``, ``v = Av/‖Av‖``, stop when |mu − mu_pre|/|mu| < ``tol``.
    It returns the Rayleigh quotient of the last product — at most ``iters`` products, no
    extra one when the tolerance is not met — and its stopping test divides by |μ_new|
    (lscape's :func:`sharpness` divides by |μ_old| + 1e-6 and, unconverged, makes one more
    product for the vector it returns). ``vector`` is the v whose quotient ``value`` is,
    ``residual`` ‖Av − μv‖ of it.
    """
    if float(v0.norm()) == 0.0:
        raise ValueError("the power method cannot start from a zero gradient")
    mu = 1e-6
    v = v0 / v0.norm()
    converged, products, residual, vec = False, 0, float("nan"), v
    for _ in range(int(iters)):
        av = op.matvec(v)
        products += 1
        mu_pre = mu
        mu = float(torch.dot(av.double(), v.double()))
        vec, residual = v, float((av - mu * v).norm())
        n = av.norm()
        if float(n) == 0.0:
            converged = True
            break
        v = av / n
        if mu != 0.0 and abs(mu - mu_pre) / abs(mu) < tol:
            converged = True
            break
    return Sharpness(mu, vec, residual, converged, products)


def directional_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    pairs: Sequence[tuple[Batch, Batch]],
    params: Any = None,
    mode: str = "eval",
) -> float:
    """Mean over batch pairs (B, B') of ‖H_{B'} v‖ / ‖g_{B'}‖ with v = g_B / ‖g_B‖."""
    from lscape.curvature import HessianOperator

    total = 0.0
    for b, b2 in pairs:
        g_b = HessianOperator(model, loss_fn, [b], params=params, mode=mode, cache_graph=False).gradient()
        op2 = HessianOperator(model, loss_fn, [b2], params=params, mode=mode)
        g_b2 = op2.gradient()
        v = g_b / g_b.norm()
        total += float(op2.matvec(v).norm() / g_b2.norm())
    return total / len(pairs)
