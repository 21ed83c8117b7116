"""Rayleigh–Ritz on the small float64 problem: Ritz pairs, their residuals, which ones are wanted,
and the test that decides whether a verification round may pass."""

from __future__ import annotations

import torch

__all__ = ["ritz", "select", "gap_scale"]


def ritz(T: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values θ, vectors S (columns) and residuals ‖H Q s − θ Q s‖ of every pair.

    T holds the coefficients of H Q on Q column by column (the projection, symmetric up to
    rounding), B those on the remainder block; the residual is √(‖Ts − θs‖² + ‖Bs‖²).
    """
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    inside = T @ S - S * theta
    res = ((inside**2).sum(dim=0) + ((B @ S) ** 2).sum(dim=0)).sqrt()
    return theta, S, res


def select(values: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values, in the order they are reported."""
    if which == "LA":
        return torch.argsort(values, descending=True)[:k]
    if which == "SA":
        return torch.argsort(values)[:k]
    return torch.argsort(values.abs(), descending=True)[:k]


def gap_scale(theta: torch.Tensor) -> torch.Tensor:
    """min(|θ|, √(|θ|·gap)) per Ritz value, gap the distance to the nearest other Ritz value.

    ``tol`` times this is the residual a pair must reach: ‖r‖ ≤ tol·|θ| bounds the eigenvalue
    error by tol·|θ|, and ‖r‖²/gap ≤ tol²·|θ| makes the Ritz value accurate to tol² relative
    even when a near-tied eigenvalue sits closer than ‖r‖ (Kato–Temple: |θ − λ| ≤ ‖r‖²/gap).
    Without the second term a Ritz vector mixing two members of a tie 1e-3 apart passes a
    1e-3 residual test and one member is never resolved.
    """
    a = theta.abs()
    if len(theta) < 2:
        return a
    d = (theta[:, None] - theta[None, :]).abs()
    d.fill_diagonal_(float("inf"))
    gap = d.min(dim=1).values
    return torch.minimum(a, (a * gap).sqrt())
