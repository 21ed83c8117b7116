"""Keskar et al. (2017) ε-sharpness: the largest loss rise in a box around θ, in full space or a subspace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from lscape.batch import as_adapter, batch_size_of
from lscape.params import flat_parameters, set_flat_parameters

__all__ = ["SharpnessResult", "eps_sharpness", "eps_sharpness_repeated", "model_objective", "random_subspace"]

Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


@dataclass
class SharpnessResult:
    """One maximisation: φ in percent, the loss at θ and the best loss found, the best displacement."""

    sharpness: float
    loss: float
    max_loss: float
    displacement: torch.Tensor  # y = A z (or z in full space) at the best point


def eps_sharpness(
    fun: Objective,
    x: torch.Tensor,
    eps: float = 5e-4,
    subspace: torch.Tensor | int | None = None,
    method: str = "lbfgsb",
    iters: int = 10,
    init: str = "random",
    generator: torch.Generator | None = None,
    step: float = 0.5,
    subspace_matrix: str = "smoothout",
) -> SharpnessResult:
    """φ_{x,f}(ε, A) = [max_{y ∈ C_ε} f(x + Ay) − f(x)] / (1 + f(x)) × 100.

    ``fun(v)`` returns ``(f(v), ∇f(v))`` for a flat vector ``v``. Full space (``subspace``
    None): C_ε = {y : |y_i| ≤ ε(|x_i| + 1)}. Subspace: ``subspace`` is an (n, p) matrix A
    or an int p for a random A drawn from ``generator`` by :func:`random_subspace`
    (``subspace_matrix="smoothout"``: the SmoothOut code's A⁺ with U(−1, 1) entries and
    unit rows, A = pinv(A⁺); ``"gaussian"``: A with N(0, 1) entries); then
    C_ε = {z ∈ R^p : |z_i| ≤ ε(|(A⁺x)_i| + 1)}. Because of the box's "+1", φ depends on
    the scale of A: the two choices give different numbers on the same model. The maximisation is inexact, as in the
    paper: ``method="lbfgsb"`` runs scipy's L-BFGS-B on −f (the intended sign: the SmoothOut
    code handed the optimiser the wrong one) for ``iters`` iterations; ``method="pga"`` runs
    ``iters`` steps of projected sign-gradient ascent, each ``step`` × the box half-width.
    The start is uniform in the box (``init="random"``) or at its centre (``"zero"``), and
    the best point evaluated is kept.
    """
    x = x.detach()
    n = x.numel()
    A = A_plus = None
    if isinstance(subspace, int):
        A, A_plus = random_subspace(n, subspace, generator, subspace_matrix)
        A, A_plus = A.to(x.device), A_plus.to(x.device)
    elif subspace is not None:
        A = subspace.to(device=x.device, dtype=torch.float64)
    if A is None:
        half = eps * (x.double().abs() + 1)
    else:
        if A_plus is not None:
            coords = A_plus @ x.double()
        else:
            # A⁺x by least squares; A has few columns, so this is a small solve
            coords = torch.linalg.lstsq(A.cpu(), x.double().cpu().unsqueeze(1)).solution.squeeze(1).to(x.device)
        half = eps * (coords.abs() + 1)

    def lift(z: torch.Tensor) -> torch.Tensor:
        return (z if A is None else A @ z).to(x.dtype)

    def value_grad(z: torch.Tensor) -> tuple[float, torch.Tensor]:
        f, g = fun(x + lift(z))
        g = g.double()
        return float(f), (g if A is None else A.T @ g)

    f0, _ = fun(x)
    f0 = float(f0)
    if init == "random":
        u = torch.rand(half.shape, generator=generator, dtype=torch.float64).to(half.device)
        z = (2 * u - 1) * half
    elif init == "zero":
        z = torch.zeros_like(half)
    else:
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    best = [-np.inf, z.clone()]

    def track(fz: float, zz: torch.Tensor):
        if fz > best[0]:
            best[0], best[1] = fz, zz.clone()

    if method == "pga":
        for _ in range(iters + 1):
            fz, gz = value_grad(z)
            track(fz, z)
            z = torch.clamp(z + step * half * torch.sign(gz), -half, half)
    elif method == "lbfgsb":
        from scipy.optimize import minimize

        def neg(znp):
            zz = torch.as_tensor(znp, dtype=torch.float64, device=half.device)
            fz, gz = value_grad(zz)
            track(fz, zz)
            return -fz, -gz.cpu().numpy()

        h = half.cpu().numpy()
        minimize(neg, z.cpu().numpy(), jac=True, method="L-BFGS-B", bounds=list(zip(-h, h)), options={"maxiter": iters})
    else:
        raise ValueError(f"method must be 'lbfgsb' or 'pga', got {method!r}")
    fmax = max(best[0], f0)
    return SharpnessResult((fmax - f0) / (1 + f0) * 100, f0, fmax, lift(best[1]))


def random_subspace(n: int, p: int, generator: torch.Generator | None = None,
                    kind: str = "smoothout") -> tuple[torch.Tensor, torch.Tensor]:
    """A random p-dimensional subspace of R^n as ``(A, A⁺)``, A (n, p), A⁺ (p, n), float64 on the CPU.

    ``kind="smoothout"`` (the SmoothOut code, ``measure_sharpness.py -m p``): A⁺ has
    U(−1, 1) entries, each of its p rows scaled to unit length, and A = pinv(A⁺) =
    A⁺ᵀ(A⁺A⁺ᵀ)⁻¹ (A⁺ has full row rank almost surely). ``kind="gaussian"``: A has
    N(0, 1) entries and A⁺ = pinv(A).
    """
    if not 1 <= p <= n:
        raise ValueError(f"the subspace dimension must be between 1 and {n}, got {p}")
    if kind == "smoothout":
        A_plus = 2 * torch.rand(p, n, generator=generator, dtype=torch.float64) - 1
        A_plus /= A_plus.norm(dim=1, keepdim=True)
        A = torch.linalg.solve(A_plus @ A_plus.T, A_plus).T
    elif kind == "gaussian":
        A = torch.randn(n, p, generator=generator, dtype=torch.float64)
        A_plus = torch.linalg.solve(A.T @ A, A.T)
    else:
        raise ValueError(f"subspace_matrix must be 'smoothout' or 'gaussian', got {kind!r}")
    return A, A_plus


def eps_sharpness_repeated(fun: Objective, x: torch.Tensor, repeats: int = 5, seed: int = 0, **kw) -> dict[str, float | np.ndarray]:
    """``eps_sharpness`` ``repeats`` times with seeded starts (and subspaces); returns mean, std and the values."""
    g = torch.Generator().manual_seed(int(seed))
    vals = np.array([eps_sharpness(fun, x, generator=g, **kw).sharpness for _ in range(repeats)])
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if repeats > 1 else 0.0, "values": vals}


def model_objective(model, loss_fn, batches, params: Sequence[torch.Tensor]) -> tuple[Objective, torch.Tensor, Callable[[], None]]:
    """``(fun, x0, restore)`` for a model: ``fun(v)`` loads v into ``params`` and returns the
    size-weighted loss over ``batches`` and its gradient; ``restore()`` puts x0 back.

    ``.grad`` of the parameters is left as found.
    """
    params = list(params)
    batches = list(batches)
    x0 = flat_parameters(params)
    adapter = as_adapter(loss_fn)
    total = sum(batch_size_of(b) for b in batches)

    def fun(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        set_flat_parameters(params, v)
        loss = 0.0
        grads = [torch.zeros_like(p) for p in params]
        for batch in batches:
            w = batch_size_of(batch) / total
            with torch.enable_grad():
                li = adapter.loss(model, batch)
                gs = torch.autograd.grad(li, params, allow_unused=True)
            loss += float(li.detach()) * w
            for acc, gi in zip(grads, gs):
                if gi is not None:
                    acc.add_(gi, alpha=w)
        return loss, torch.cat([g.reshape(-1) for g in grads])

    def restore() -> None:
        set_flat_parameters(params, x0)

    return fun, x0, restore
