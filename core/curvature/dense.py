"""The dense Hessian (or GGN) of a small model and its full eigendecomposition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lscape.curvature._support import resolve_params
from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.operator import HessianOperator

__all__ = ["DEFAULT_MAX_PARAMS", "DenseSpectrum", "dense_matrix", "dense_hessian", "dense_spectrum"]

# A 20k × 20k float64 matrix is 3.2 GB and its eigendecomposition minutes of CPU time:
# beyond that, stochastic Lanczos quadrature (slq_density) is the tool.
DEFAULT_MAX_PARAMS = 20_000


@dataclass
class DenseSpectrum:
    """All eigenvalues (ascending, float64) and optionally the eigenvectors as columns."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None


def dense_matrix(op: Any, max_params: int = DEFAULT_MAX_PARAMS, block: int = 64) -> torch.Tensor:
    """The operator as a dense symmetric (dim, dim) matrix, built ``block`` columns at a time.

    Raises ``ValueError`` above ``max_params`` rows.
    """
    dim = int(op.dim)
    if dim > max_params:
        raise CurvatureArgumentError(
            f"the dense Hessian of {dim} parameters exceeds the limit of {max_params}; "
            "select a parameter subset, raise max_params, or use the stochastic estimators (slq_density)", "max_params"
        )
    dtype = getattr(op, "dtype", torch.float32)
    device = getattr(op, "device", torch.device("cpu"))
    matrix = torch.empty(dim, dim, dtype=dtype, device=device)
    for start in range(0, dim, block):
        stop = min(dim, start + block)
        eye = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        matrix[start:stop] = op.matmat(eye) if hasattr(op, "matmat") else torch.stack([op.matvec(e) for e in eye])
    # Exact products are symmetric up to rounding; symmetrise so eigh sees a symmetric matrix.
    return (matrix + matrix.T) / 2


def dense_hessian(
    model: nn.Module,
    loss_fn,
    batches: Any,
    params: Any = None,
    mode: str = "eval",
    kind: str = "hessian",
    method: str = "auto",
    max_params: int = DEFAULT_MAX_PARAMS,
) -> torch.Tensor:
    """The exact dense Hessian (or GGN) of the size-weighted mean loss over ``batches``.

    Same arguments as :class:`lscape.curvature.HessianOperator`; raises
    ``ValueError`` when the selection has more than ``max_params`` entries.
    """
    dim = sum(p.numel() for _, p in resolve_params(model, params))
    if dim > max_params:
        dense_matrix(_Sized(dim), max_params)  # raises the one clear error
    op = HessianOperator(model, loss_fn, batches, params=params, mode=mode, method=method, kind=kind)
    return dense_matrix(op, max_params)


def dense_spectrum(
    model: nn.Module | None = None,
    loss_fn=None,
    batches: Any = None,
    params: Any = None,
    mode: str = "eval",
    kind: str = "hessian",
    max_params: int = DEFAULT_MAX_PARAMS,
    eigenvectors: bool = False,
    matrix: torch.Tensor | None = None,
) -> DenseSpectrum:
    """All eigenvalues (and optionally eigenvectors) of the dense Hessian, in float64.

    Pass a model, loss and batches, or an already built ``matrix``.
    """
    if matrix is None:
        matrix = dense_hessian(model, loss_fn, batches, params=params, mode=mode, kind=kind, max_params=max_params)
    matrix = matrix.to(torch.float64)
    if eigenvectors:
        values, vectors = torch.linalg.eigh(matrix)
        return DenseSpectrum(values, vectors)
    return DenseSpectrum(torch.linalg.eigvalsh(matrix), None)


class _Sized:
    def __init__(self, dim: int):
        self.dim = dim

