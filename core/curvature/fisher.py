"""The Monte-Carlo Fisher: per-row loss gradients at labels drawn from the model's softmax."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lscape.curvature._fisher import outer_products
from lscape.curvature._support import ce_like, ce_rows
from lscape.curvature.base import CurvatureOperator
from lscape.curvature.errors import CurvatureArgumentError

__all__ = ["MonteCarloFisher"]


class MonteCarloFisher(CurvatureOperator):
    """(1/R) Σ_r ĝ_r ĝ_rᵀ with ĝ_r the gradient of the loss at a label drawn from the model's
    softmax (cross-entropy only), ``mc_samples`` draws per row from a fixed seed, so the
    operator is one fixed matrix (unbiased for the Gauss–Newton matrix)."""

    name = "fisher"
    product = "output-space"
    needs_output_loss = True

    def __init__(self, *args: Any, mc_samples: int = 1, **kwargs: Any):
        if int(mc_samples) < 1:
            raise CurvatureArgumentError(f"mc_samples must be at least 1, not {mc_samples}", "mc_samples")
        self.mc_samples = int(mc_samples)
        super().__init__(*args, **kwargs)

    @classmethod
    def check_loss(cls, adapter: Any) -> None:
        super().check_loss(adapter)
        if ce_like(adapter.loss_fn) is None:
            raise CurvatureArgumentError("kind=fisher (Monte-Carlo Fisher) samples labels from a softmax: it needs a "
                                         "cross-entropy loss; use kind=empirical-fisher or kind=ggn for other losses",
                                         "loss_fn")

    def output_matrix(self, i: int, out: torch.Tensor, target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        logits, mask, rows = ce_rows(out, target, ce_like(self.loss_fn))
        p = torch.softmax(logits.detach().double(), dim=-1)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + 7919 * i + 17)
        samples = []
        for _ in range(self.mc_samples):
            drawn = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(p.device)
            e = p.clone()
            e[torch.arange(len(drawn), device=p.device), drawn] -= 1.0  # ∇ of −log softmax at the draw
            samples.append(((e * mask[:, None]).to(out.dtype), rows))
        return outer_products(out, samples)
