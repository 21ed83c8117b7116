"""The generalised Gauss–Newton matrix Jᵀ ∇²_out L J."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lscape.curvature._support import ce_like, ce_rows
from lscape.curvature.base import CurvatureOperator

__all__ = ["GaussNewton"]


class GaussNewton(CurvatureOperator):
    """Gauss–Newton Jᵀ ∇²_out L J, positive semi-definite for convex losses.

    For cross-entropy (lscape's ``ce``, ``F.cross_entropy``, a plain ``nn.CrossEntropyLoss``)
    the output Hessian is applied analytically, (p⊙u − p(pᵀu))/R per row, without a
    second-order graph through log-softmax, so memory is one forward's activations plus
    one logits-sized tangent; any other loss of the output gets one more backward.
    """

    name = "ggn"
    product = "output-space"
    needs_output_loss = True

    def output_matrix(self, i: int, out: torch.Tensor, target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        ce = ce_like(self.loss_fn)
        if ce is not None:
            # Analytic cross-entropy Hessian per row: (p⊙u − p(pᵀu)) / R, ignored rows 0.
            logits, mask, rows = ce_rows(out, target, ce)
            p = torch.softmax(logits.detach(), dim=-1)
            scale = (mask / rows)[:, None]

            def ggn_ce(u: torch.Tensor) -> torch.Tensor:
                # p⊙(u − pᵀu), in place on the tangent u (which the caller no longer needs): no
                # logits-sized temporary beyond p and u, whatever the vocabulary
                u2 = u.reshape(-1, u.shape[-1])
                pu = torch.linalg.vecdot(p, u2).unsqueeze(-1)
                return u2.sub_(pu).mul_(p).mul_(scale).reshape(u.shape)

            return ggn_ce
        # ∇_out L with its graph, so that (∇²_out L) u is one more backward for any loss.
        leaf = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (loss_grad,) = torch.autograd.grad(self.adapter.criterion(leaf, target), leaf, create_graph=True)

        def ggn_any(u: torch.Tensor) -> torch.Tensor:
            if not loss_grad.requires_grad:  # the loss is linear in the output
                return torch.zeros_like(u)
            return torch.autograd.grad(loss_grad, leaf, u, retain_graph=True)[0]

        return ggn_any
