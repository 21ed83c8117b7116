"""Entropy-SGD (Chaudhari et al. 2017): descend the local entropy, estimated by Langevin dynamics."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..params import unflatten
from ._base import WrappedOptimizer

__all__ = ["EntropySGD"]


class EntropySGD(WrappedOptimizer):
    """Entropy-SGD around a base optimizer (the paper's: SGD, Nesterov momentum 0.9).

    ``EntropySGD(params, torch.optim.SGD, L=20, lr=1.0, momentum=0.9, nesterov=True)``
    builds the base over ``params``: ``momentum``, ``nesterov``, ``weight_decay`` and
    ``dampening`` go to it, and the Langevin loop's overrides are ``langevin_momentum``,
    ``langevin_nesterov``, ``langevin_weight_decay``, ``langevin_dampening`` (like
    ``langevin_lr``). ``EntropySGD(base, L=20, momentum=0.5)`` wraps an optimizer already
    built; there ``momentum`` and its kin are the Langevin loop's. Entropy-SGD's closure
    must draw a NEW minibatch at every call (it makes L + 1 calls per step).

    ``step(closure)`` calls the closure L + 1 times and the closure must evaluate a NEW
    minibatch each call. With x the parameters at the start of the step::

        loss = closure()                               # reported loss, gradient ∇f at x
        γ = gamma · (1 + scoping)^t                    # t = completed steps (incremented)
        x' = x; μ = x; m = 0
        L times:  closure() at x'                      # new minibatch
                  d = ∇f(x') + wd·x';  m = mom·m + d;  d = d + mom·m   (Nesterov)
                  d = d − γ(x − x') + (noise/√(0.5·η'))·ξ,   ξ ~ N(0, I)
                  x' = x' − η'·d;  μ = beta·μ + (1 − beta)·x'
        x restored; p.grad = x − μ  (L > 0)            # the local-entropy gradient / γ
        base.step()                                    # outer momentum, weight decay, lr

    ``mom``, Nesterov, dampening and ``wd`` of the Langevin loop default to each param
    group's ``momentum``, ``nesterov``, ``dampening`` and ``weight_decay`` (as the original
    shares them); pass ``momentum``, ``nesterov``, ``dampening`` or ``weight_decay`` to
    override. With dampening τ the Langevin buffer is m = mom·m + (1 − τ)·d. L = 0 is the
    base optimizer exactly.

    ``compat="original"`` reproduces the published ``python/optim.py`` where it differs
    from the method: (1) the outer momentum buffer starts as a copy of the first gradient
    ∇f(x₀) instead of torch's first-step ``buf = d``, so the first update is
    x₀ − lr(1 + mom + mom²)g₀ for L = 0 with Nesterov (needs an SGD base); (2) without
    Nesterov the Langevin direction *is* the momentum buffer (``dw = mdw``), so the coupling
    and noise terms accumulate in it; (3) t is never incremented, so γ stays ``gamma``
    whatever ``scoping`` says. After each step (while ``track_stats`` is true) ``stats`` holds ``grad_norm`` ‖∇f(x)‖,
    ``dist_mu`` ‖x − μ‖, ``cos`` cos(∇f, x − μ), ``noise_norm`` (norm of the last
    Langevin noise term), ``mean_dist`` mean over the L steps of ‖x − x'_l‖ and
    ``gamma`` (γ used in this step).
    """

    prefix = "langevin_"

    def __init__(self, params: Iterable[Any] | torch.optim.Optimizer | None, base_optimizer: Any = None,
                 L: int = 0, **kwargs: Any):
        super().__init__(params, base_optimizer, L=L, **kwargs)

    def configure(
        self,
        L: int = 0,
        gamma: float = 1e-4,
        scoping: float = 1e-3,
        noise: float = 1e-4,
        langevin_lr: float = 0.1,
        beta: float = 0.75,
        momentum: float | None = None,
        nesterov: bool | None = None,
        weight_decay: float | None = None,
        generator: torch.Generator | None = None,
        dampening: float | None = None,
        compat: str = "none",
    ) -> None:
        """The Entropy-SGD options (see the class docstring)."""
        base = self.base
        if L < 0:
            raise ValueError(f"L must be >= 0, got {L}")
        if compat not in ("none", "original"):
            raise ValueError(f"compat must be 'none' or 'original', got {compat!r}")
        if compat == "original" and not isinstance(base, torch.optim.SGD):
            raise ValueError("compat='original' reproduces the original's own SGD update: the base must be "
                             f"torch.optim.SGD, not {type(base).__name__}")
        self.compat = compat
        self.dampening = dampening
        self.L = int(L)
        self.gamma = float(gamma)
        self.scoping = float(scoping)
        self.noise = float(noise)
        self.langevin_lr = float(langevin_lr)
        self.beta = float(beta)
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.generator = generator
        #: compute ``stats`` in the next steps (a few extra vector passes per Langevin step)
        self.track_stats = True

    @property
    def gamma_t(self) -> float:
        """γ for the next step: gamma · (1 + scoping)^t (gamma with compat="original")."""
        if self.compat == "original":
            return self.gamma
        return self.gamma * (1.0 + self.scoping) ** self.t

    def step(self, closure=None):
        """One Entropy-SGD update; returns the loss of the first closure call (at x)."""
        self.require_closure(closure)
        loss = closure()
        gamma = self.gamma_t
        if self.compat == "original":
            self._seed_outer_buffer()
        if self.L == 0:
            self.stats = {"grad_norm": _norm([p.grad for p in self.parameters() if p.grad is not None]),
                          "gamma": gamma} if self.track_stats else {}
            self.base.step()
            self.variant_state["t"] += 1
            return loss

        track = self.track_stats
        groups = [self._langevin_group(g) for g in self.base.param_groups if g["params"]]
        with torch.no_grad():
            for lg in groups:
                lg["x"] = [p.detach().clone() for p in lg["params"]]
                lg["mu"] = [p.detach().clone() for p in lg["params"]]
                lg["m"] = [torch.zeros_like(p) for p in lg["params"]] if lg["mom"] else None
                lg["xi_flat"], lg["xi"] = _noise_buffer(lg["params"]) if self.noise else (None, None)
                if track:
                    lg["grad_f"] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lg["params"]]
        lr = self.langevin_lr
        noise_scale = self.noise / math.sqrt(0.5 * lr)
        # norms stay tensors inside the loop: no device synchronisation per Langevin step
        dist_sum = torch.zeros((), dtype=torch.float64)
        noise_sq = torch.zeros((), dtype=torch.float64)
        for step in range(self.L):
            closure()
            with torch.no_grad():
                dist_sq = torch.zeros((), dtype=torch.float64)
                for lg in groups:
                    xp = lg["params"]
                    d = [torch.zeros_like(p) if p.grad is None else p.grad for p in xp]
                    if lg["wd"]:
                        torch._foreach_add_(d, xp, alpha=lg["wd"])
                    aliased = False
                    if lg["m"] is not None:
                        torch._foreach_mul_(lg["m"], lg["mom"])
                        torch._foreach_add_(lg["m"], d, alpha=1.0 - lg["damp"])
                        if lg["nesterov"]:
                            torch._foreach_add_(d, lg["m"], alpha=lg["mom"])
                        elif self.compat == "original":
                            d, aliased = lg["m"], True  # the original's dw = mdw: what follows enters the buffer
                        else:
                            d = [m.clone() for m in lg["m"]]
                    if self.noise:
                        if lg["xi_flat"] is not None:
                            # one fill of a reused flat buffer: far cheaper than a randn per tensor on CPU
                            lg["xi_flat"].normal_(generator=self.generator)
                            xi = lg["xi"]
                        else:
                            xi = [torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                                  for p in xp]
                        torch._foreach_add_(d, xi, alpha=noise_scale)
                        if track and step == self.L - 1:
                            noise_sq = noise_sq + noise_scale**2 * _sq(xi)
                    if aliased:
                        # the coupling term goes into d (= the buffer) before the update
                        torch._foreach_add_(d, torch._foreach_sub(lg["x"], xp), alpha=-gamma)
                        torch._foreach_add_(xp, d, alpha=-lr)
                    else:
                        # x' − η'(d − γ(x − x')) = lerp(x', x, η'γ) − η'd: the coupling term in one pass
                        torch._foreach_lerp_(xp, lg["x"], lr * gamma)
                        torch._foreach_add_(xp, d, alpha=-lr)
                    torch._foreach_lerp_(lg["mu"], xp, 1.0 - self.beta)
                    if track:
                        dist_sq = dist_sq + _sq(torch._foreach_sub(lg["x"], xp))
                if track:
                    dist_sum = dist_sum + dist_sq.sqrt()
        with torch.no_grad():
            for lg in groups:
                torch._foreach_copy_(lg["params"], lg["x"])
                for p, x, mu in zip(lg["params"], lg["x"], lg["mu"]):
                    p.grad = x - mu
        if track:
            with torch.no_grad():
                grad_f = [g for lg in groups for g in lg["grad_f"]]
                step_dir = [p.grad for lg in groups for p in lg["params"]]
                gn, dn = _norm(grad_f), _norm(step_dir)
                dot = float(sum((a * b).sum() for a, b in zip(grad_f, step_dir)))
            self.stats = {
                "grad_norm": gn,
                "dist_mu": dn,
                "cos": dot / (gn * dn) if gn > 0 and dn > 0 else 0.0,
                "noise_norm": math.sqrt(float(noise_sq)),
                "mean_dist": float(dist_sum) / self.L,
                "gamma": gamma,
            }
        else:
            self.stats = {}
        self.base.step()
        self.variant_state["t"] += 1
        return loss

    def _seed_outer_buffer(self) -> None:
        """compat="original": before the first outer update, the momentum buffer is a copy of
        ∇f(x₀) (the original's ``state['mdw'] = deepcopy(w.grad)``), so torch's SGD then
        computes buf = mom·∇f(x₀) + (1 − dampening)·d as the original does."""
        if self.t != 0:
            return
        for group in self.base.param_groups:
            if not group.get("momentum"):
                continue
            for p in group["params"]:
                state = self.base.state[p]
                if p.grad is not None and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = p.grad.detach().clone()

    def _langevin_group(self, group: dict) -> dict:
        mom = self.momentum if self.momentum is not None else group.get("momentum", 0.0)
        nesterov = self.nesterov if self.nesterov is not None else group.get("nesterov", True)
        wd = self.weight_decay if self.weight_decay is not None else group.get("weight_decay", 0.0)
        damp = self.dampening if self.dampening is not None else group.get("dampening", 0.0)
        return {"params": list(group["params"]), "mom": float(mom or 0.0), "nesterov": bool(nesterov),
                "wd": float(wd or 0.0), "damp": float(damp or 0.0)}


def _noise_buffer(params: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """A flat buffer and per-parameter views into it, when all parameters share dtype and device."""
    if len({(p.dtype, p.device) for p in params}) != 1:
        return None, None
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    return flat, unflatten(flat, params)


def _sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared norm over all tensors, as a CPU float64 scalar tensor (0 for none)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum().cpu()


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(float(_sq(tensors)))
