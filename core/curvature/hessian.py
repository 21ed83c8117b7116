"""The Hessian ∇²L(θ) of the loss."""

from __future__ import annotations

from lscape.curvature.base import CurvatureOperator

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    """The Hessian of the size-weighted mean loss: exact products by double backward (the
    default; cached first-order graph), forward-over-reverse, or central finite differences
    of exact gradients (``method``)."""

    name = "hessian"
