"""Sharpness-aware minimisation (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ._base import WrappedOptimizer, batchnorm_stats_frozen

__all__ = ["SAM", "sam_edge"]


class SAM(WrappedOptimizer):
    """Normalised SAM around any base optimizer, the same minibatch for both passes.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` builds the base over
    ``params``; ``SAM(base, rho=0.05)`` wraps an optimizer already built. Options:
    ``rho``, ``adaptive``, ``eta``, ``eps`` (``sam_eps`` when the base takes an ``eps``),
    ``model``, ``asam_bias``; the rest go to the base optimizer's constructor.

    One step, with g = ∇L_B(θ) from the first closure call::

        e = ρ g / (‖g‖ + eps)                      (SAM)
        e = ρ T²g / (‖T g‖ + eps),  T = |θ| + eta  (ASAM, ``adaptive=True``, elementwise)
        second closure call at θ + e   ->  p.grad = ∇L_B(θ + e)
        θ restored exactly, then base.step()       (momentum, weight decay: the base's)

    ρ per parameter group: a base param group with a ``"rho"`` entry uses it (davda54/sam's
    per-group ``rho``); ‖g‖ (or ‖Tg‖) stays the norm over all parameters, so
    e_p = ρ_group(p) · g_p / (‖g‖ + eps).

    ASAM's T for parameters that are not weights: ``asam_bias="scaled"`` (default, davda54/sam)
    scales every parameter; ``"unscaled"`` is Kwon et al.'s own code (SamsungLabs/ASAM), where
    only parameters whose name contains ``weight`` get T = |θ| + eta and the others (biases)
    T = 1; it needs ``model`` for the names.

    When ``model`` is given, BatchNorm running statistics are updated by the first pass
    (at θ) only: the pass at the perturbed point θ + e leaves them as they were, so they
    move once per step, as in plain training. ρ = 0 is the base optimizer exactly.

    After each step ``stats`` holds ``grad_norm`` (‖g‖ of the minibatch gradient at θ, the
    quantity in the SAM-edge formula) and ``perturbation_norm`` (‖e‖).
    """

    prefix = "sam_"

    def __init__(self, params: Iterable[Any] | torch.optim.Optimizer | None, base_optimizer: Any = None,
                 rho: float = 0.05, **kwargs: Any):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)

    def configure(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        eps: float = 1e-5,
        model: nn.Module | None = None,
        asam_bias: str = "scaled",
    ) -> None:
        """The SAM options (see the class docstring)."""
        base = self.base
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        for i, group in enumerate(base.param_groups):
            if "rho" in group and not (isinstance(group["rho"], (int, float)) and group["rho"] >= 0):
                raise ValueError(f"param group {i}: rho must be a number >= 0, got {group['rho']!r}")
        if asam_bias not in ("scaled", "unscaled"):
            raise ValueError(f"asam_bias must be 'scaled' or 'unscaled', got {asam_bias!r}")
        if asam_bias == "unscaled" and model is None:
            raise ValueError("asam_bias='unscaled' needs the model: it picks the weights by parameter name")
        self.asam_bias = asam_bias
        self._unscaled = ({id(p) for n, p in model.named_parameters() if "weight" not in n}
                          if asam_bias == "unscaled" else set())
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.eps = float(eps)
        self.model = model
        self._cache: dict[str, list[torch.Tensor]] = {}

    def step(self, closure=None):
        """One SAM update; returns the loss at θ (before the step)."""
        self.require_closure(closure)
        loss = closure()
        params, rhos = [], []
        for group in self.base.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    rhos.append(float(group.get("rho", self.rho)))
        with torch.no_grad():
            grads = [p.grad for p in params]
            grad_norm = _global_norm(grads)
            if self.adaptive:
                scale = torch._foreach_add(torch._foreach_abs(params), self.eta)
                if self._unscaled:  # Kwon et al.: T = 1 for parameters that are not weights
                    scale = [torch.ones_like(t) if id(p) in self._unscaled else t for p, t in zip(params, scale)]
                scaled = torch._foreach_mul(grads, scale)
                denom = _global_norm(scaled)
                e = torch._foreach_mul(scaled, scale)
            else:
                denom = grad_norm
                e = self._buffers("e", grads)
                torch._foreach_copy_(e, grads)
            # a tensor factor keeps the step free of device synchronisation
            if len(set(rhos)) <= 1:
                torch._foreach_mul_(e, (rhos[0] if rhos else self.rho) / (denom + self.eps))
            else:
                for rho in sorted(set(rhos)):
                    torch._foreach_mul_([t for t, r in zip(e, rhos) if r == rho], rho / (denom + self.eps))
            # kept as tensors; converted to floats only when someone reads ``stats``
            self._norms = (grad_norm, _global_norm(e))
            # copy back instead of subtracting e: restores θ bit for bit
            saved = self._buffers("saved", params)
            torch._foreach_copy_(saved, params)
            torch._foreach_add_(params, e)
        with batchnorm_stats_frozen(self.model):
            closure()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
        self.base.step()
        self.variant_state["t"] += 1
        return loss

    def _buffers(self, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        # reused across steps: fresh allocations every step cost page faults on CPU
        cached = self._cache.get(key)
        if cached is None or len(cached) != len(like) or any(c.shape != t.shape or c.dtype != t.dtype or c.device != t.device
                                                             for c, t in zip(cached, like)):
            cached = self._cache[key] = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        return cached

    @property
    def stats(self) -> dict[str, float]:
        """``grad_norm`` ‖g‖ and ``perturbation_norm`` ‖e‖ of the last step (computed on read)."""
        if self._norms is None:
            return {}
        grad_norm, pert_norm = self._norms
        return {"grad_norm": float(grad_norm), "perturbation_norm": float(pert_norm)}

    @stats.setter
    def stats(self, value) -> None:
        self._norms = None


def sam_edge(grad_norm: float, lr: float, rho: float) -> float:
    """The SAM-edge (Long & Bartlett 2023): the root λ of ηλ(1 + ρλ/‖g‖) = 2.

    ``(‖g‖ / 2ρ)(√(1 + 8ρ/(η‖g‖)) − 1)``, and 2/η when ρ = 0 (plain gradient descent).
    """
    if rho == 0:
        return 2.0 / lr
    if grad_norm <= 0:
        return 0.0
    x = 8.0 * rho / (lr * grad_norm)
    # (√(1+x) − 1) = x / (√(1+x) + 1) avoids cancellation when x is small
    return grad_norm / (2.0 * rho) * x / (math.sqrt(1.0 + x) + 1.0)


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
