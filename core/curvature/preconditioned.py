"""The preconditioned curvature operator D H D, D = P^{-1/2}, around any curvature operator.

P^{-1/2} H P^{-1/2} is similar to P⁻¹H (P^{1/2} · P⁻¹H · P^{-1/2}), so its eigenvalues are
those of the preconditioned Hessian whose largest one sits at an adaptive optimizer's edge of
stability (Cohen et al. 2022), and it is symmetric, so Lanczos, power iteration, Hutchinson
and the dense helpers apply unchanged. It is the Hessian of φ ↦ L(Dφ) in the coordinates
φ = P^{1/2}θ: eigenvectors and :meth:`PreconditionedOperator.gradient` are in φ-coordinates,
:meth:`PreconditionedOperator.to_parameters` maps a φ-direction back to θ (θ-direction D v).

Cost: one product of the inner operator per product, plus two elementwise scalings.

Two forms: :class:`PreconditionedOperator` wraps any operator and a given P (the library
form); :class:`PreconditionedHessian` is the registered curvature matrix
``kind="preconditioned"`` (a :class:`lscape.curvature.CurvatureOperator` built like every
other kind, with the ``optimizer`` whose state holds P), which every curvature probe uses.
"""

from __future__ import annotations

from typing import Any

import torch

from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.hessian import Hessian
from lscape.curvature.preconditioner import (NotSteppedError, Preconditioner, base_optimizer, preconditioner,
                                             preconditioner_rule)

__all__ = ["PreconditionedOperator", "PreconditionedHessian"]


class PreconditionedOperator:
    """``matvec(v) = s · D H (D v)`` with D = P^{-1/2} and s = ``sign`` (−1 for an optimizer
    that maximises), for any operator ``inner`` with a ``matvec`` on flat vectors.

    ``diag`` P as a flat tensor of ``inner.dim`` positive entries in the inner operator's
    parameter order, or a :class:`lscape.curvature.Preconditioner` (from
    :func:`lscape.curvature.preconditioner`, read for ``inner.params``). ``dim``, ``dtype``,
    ``device`` and ``num_products`` are the inner operator's (products are counted once, by
    the inner operator); ``loss``, ``release``, ``params`` and any other attribute are
    delegated to it.
    """

    def __init__(self, inner: Any, diag: torch.Tensor | Preconditioner, sign: float | None = None):
        info = diag if isinstance(diag, Preconditioner) else None
        p = info.diag if info is not None else torch.as_tensor(diag)
        dim = _size(inner)
        if p.shape != (dim,):
            raise ValueError(f"the preconditioner has shape {tuple(p.shape)}, the operator acts on ({dim},)")
        if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
            raise ValueError("the preconditioner must be positive and finite")
        self.inner = inner
        self.preconditioner = info
        self.sign = float(sign if sign is not None else (info.sign if info is not None else 1.0))
        dtype = getattr(inner, "dtype", p.dtype)
        device = getattr(inner, "device", p.device)
        #: D = P^{-1/2}, in the operator's dtype and device
        self.scale = p.detach().to(device=device, dtype=torch.float64).rsqrt().to(dtype)

    @property
    def dim(self) -> int:
        return _size(self.inner)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.inner, "dtype", self.scale.dtype)

    @property
    def device(self) -> torch.device:
        return getattr(self.inner, "device", self.scale.device)

    @property
    def num_products(self) -> int:
        return int(getattr(self.inner, "num_products", 0))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """s · D H D v for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, the operator acts on ({self.dim},)")
        d = self.scale.to(v.dtype)
        out = self.inner.matvec(d * v)
        return (self.sign * self.scale.to(out.dtype)) * out

    __call__ = matvec

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """s · D H D V for a block of flat vectors ``vs`` (c, dim), as rows."""
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise ValueError(f"block has shape {tuple(vs.shape)}, expected (c, {self.dim})")
        scaled = vs * self.scale.to(vs.dtype)
        if hasattr(self.inner, "matmat"):
            out = self.inner.matmat(scaled)
        else:
            out = torch.stack([self.inner.matvec(row) for row in scaled])
        return (self.sign * self.scale.to(out.dtype)) * out

    def gradient(self) -> torch.Tensor:
        """The gradient in φ-coordinates, D ∇L (times the sign)."""
        g = self.inner.gradient()
        return (self.sign * self.scale.to(g.dtype)) * g

    def to_parameters(self, v: torch.Tensor) -> torch.Tensor:
        """The parameter-space direction D v of a φ-space vector (an eigenvector, say)."""
        return self.scale.to(v.dtype) * v

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found here: delegate (loss, release, params, names, model, ...)
        if name in ("inner", "scale", "sign", "preconditioner"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        rule = self.preconditioner.rule if self.preconditioner is not None else "diag"
        return f"PreconditionedOperator({rule}, sign={self.sign:+g}, inner={self.inner!r})"


class PreconditionedHessian(Hessian):
    """The preconditioned Hessian s·P^{-1/2} H P^{-1/2} as a curvature matrix (``kind="preconditioned"``).

    P is read with :func:`lscape.curvature.preconditioner` from ``optimizer``'s state at its
    last step, for the operator's parameters, with per-group learning rates folded in against
    the reference ``lr`` (default: the first group's); s = −1 for ``maximize=True``. Its
    eigenvalues are those of P⁻¹H, the matrix whose λ_max sits at an adaptive optimizer's edge
    of stability (:func:`lscape.curvature.edge_threshold`). Products are the Hessian's (any
    ``method``) between two elementwise scalings; :meth:`gradient` and eigenvectors are in
    the coordinates φ = P^{1/2}θ (:meth:`to_parameters` maps back). ``preconditioner`` holds
    what was read (rule, formula, step); ``matrix`` says it in words.

    Raises :class:`lscape.curvature.CurvatureArgumentError` (argument ``"optimizer"``) for a
    missing optimizer, one without a rule, or a parameter it does not hold, and
    :class:`lscape.curvature.NotSteppedError` (a ``ValueError``) before its first step.
    """

    name = "preconditioned"
    needs_optimizer = True

    def __init__(self, *args: Any, optimizer: Any = None, lr: float | None = None, **kwargs: Any):
        self.check_optimizer(optimizer)
        super().__init__(*args, **kwargs)
        try:
            self.preconditioner = preconditioner(optimizer, self.params, lr)
        except NotSteppedError:
            raise
        except ValueError as err:
            raise CurvatureArgumentError(str(err), "optimizer") from None
        self.sign = float(self.preconditioner.sign)
        #: D = P^{-1/2} in the parameters' dtype
        self.scale = self.preconditioner.diag.to(device=self.device, dtype=torch.float64).rsqrt().to(self.dtype)

    @classmethod
    def check_optimizer(cls, optimizer: Any) -> None:
        if optimizer is None:
            raise CurvatureArgumentError("kind=preconditioned needs the optimizer whose state holds the "
                                         "preconditioner", "optimizer")
        try:
            preconditioner_rule(optimizer)
        except ValueError as err:
            raise CurvatureArgumentError(str(err), "optimizer") from None

    @classmethod
    def describe_matrix(cls, optimizer: Any = None) -> dict[str, str]:
        """``matrix``, ``preconditioner_rule`` and ``preconditioner_formula`` for ``optimizer``."""
        if optimizer is None:
            return {"matrix": "P^-1/2 H P^-1/2"}
        rule = preconditioner_rule(optimizer)
        sign = "-" if any(g.get("maximize", False) for g in base_optimizer(optimizer).param_groups) else ""
        return {"matrix": f"{sign}P^-1/2 H P^-1/2 ({rule.name})", "preconditioner_rule": rule.name,
                "preconditioner_formula": rule.formula}

    @property
    def matrix(self) -> str:
        """What the matrix is, in words (stored by the probes)."""
        minus = "-" if self.sign < 0 else ""
        return f"{minus}P^-1/2 H P^-1/2 ({self.preconditioner.rule})"

    def apply(self, vs: torch.Tensor) -> torch.Tensor:
        d = self.scale.to(vs.dtype)
        out = super().apply(vs * d)
        return out.mul_(self.sign * self.scale.to(out.dtype))

    def gradient(self) -> torch.Tensor:
        """The gradient in φ-coordinates, s·D ∇L."""
        g = super().gradient()
        return (self.sign * self.scale.to(g.dtype)) * g

    def to_parameters(self, v: torch.Tensor) -> torch.Tensor:
        """The parameter-space direction D v of a φ-space vector (an eigenvector, say)."""
        return self.scale.to(v.dtype) * v


def _size(op: Any) -> int:
    """The length of the operator's flat vectors (``dim``, or ``numel`` where an operator names it so)."""
    size = getattr(op, "dim", None)
    if size is None:
        size = getattr(op, "numel", None)
    if callable(size):
        size = size()
    if size is None:
        raise TypeError(f"{type(op).__name__} has no dim (length of its flat vectors): not a curvature operator")
    return int(size)
