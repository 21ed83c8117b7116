"""The empirical Fisher (1/R) Σ_r g_r g_rᵀ of per-row loss gradients at the data's labels."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lscape.curvature._fisher import outer_products
from lscape.curvature._support import ce_like, count_rows
from lscape.curvature.base import CurvatureOperator

__all__ = ["EmpiricalFisher"]


class EmpiricalFisher(CurvatureOperator):
    """(1/R) Σ_r g_r g_rᵀ with g_r the gradient of row r's loss (rows: samples, or tokens of a
    sequence output), for any loss of the model's output."""

    name = "empirical-fisher"
    product = "output-space"
    needs_output_loss = True

    def output_matrix(self, i: int, out: torch.Tensor, target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        leaf = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g_out,) = torch.autograd.grad(self.adapter.criterion(leaf, target), leaf)
        # L = (1/R) Σ ℓ_r with rows independent: ∇_{o_r} ℓ_r = R ∇_{o_r} L.
        rows = count_rows(out, target, ce_like(self.loss_fn))
        flat = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.reshape(-1, 1)
        return outer_products(out, [(g_out.reshape(flat.shape) * rows, rows)])
