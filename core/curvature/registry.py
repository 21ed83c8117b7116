"""The one table of curvature matrices: ``kind`` name → operator class.

Every probe's ``kind`` choices, :func:`lscape.curvature.HessianOperator` and
``lscape plugins`` read it. A built-in matrix is one file in this package and one line in
``OPERATORS`` below; a third-party package registers its own with
:func:`register_operator`, or through the ``register_curvature_operators(register)`` hook
of an lscape plugin module (see docs/hooks.md), which :func:`collect_operators` calls.
"""

from __future__ import annotations

from typing import Any

from lscape.curvature.base import CurvatureOperator
from lscape.curvature.empirical_fisher import EmpiricalFisher
from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.fisher import MonteCarloFisher
from lscape.curvature.ggn import GaussNewton
from lscape.curvature.hessian import Hessian
from lscape.curvature.preconditioned import PreconditionedHessian

__all__ = ["OPERATORS", "register_operator", "operator_names", "operator_class", "collect_operators"]

#: kind name → operator class (a subclass of CurvatureOperator), in the order choices are shown
OPERATORS: dict[str, type[CurvatureOperator]] = {
    "hessian": Hessian,
    "ggn": GaussNewton,
    "fisher": MonteCarloFisher,
    "empirical-fisher": EmpiricalFisher,
    "preconditioned": PreconditionedHessian,
}


def register_operator(name: str, cls: type[CurvatureOperator], replace: bool = False) -> None:
    """Make ``cls`` the matrix ``kind=name`` (for every probe and ``HessianOperator``).

    Registering the same class again is a no-op; another class under a taken name raises
    ``ValueError`` unless ``replace``.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a curvature matrix name must be a non-empty string without surrounding spaces, not {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, CurvatureOperator)):
        raise TypeError(f"curvature matrix {name!r} must be a subclass of lscape.curvature.CurvatureOperator, "
                        f"not {cls!r}")
    current = OPERATORS.get(name)
    if current is not None and current is not cls and not replace:
        raise ValueError(f"curvature matrix {name!r} is already registered ({current.__module__}.{current.__qualname__})")
    if not cls.name:
        cls.name = name
    OPERATORS[name] = cls


def operator_names() -> tuple[str, ...]:
    """The registered ``kind`` names, built-ins first."""
    return tuple(OPERATORS)


def operator_class(kind: str) -> type[CurvatureOperator]:
    """The class registered as ``kind`` (underscores read as dashes); ``ValueError`` if none is."""
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, not {type(kind).__name__}")
    name = kind.replace("_", "-") if kind not in OPERATORS else kind
    if name not in OPERATORS:
        raise CurvatureArgumentError(f"unknown curvature kind {kind!r}; choose one of {', '.join(OPERATORS)}", "kind")
    return OPERATORS[name]


def collect_operators(pm: Any) -> tuple[str, ...]:
    """Call every ``register_curvature_operators`` hook of the plugin manager ``pm`` with
    :func:`register_operator`; returns the names now registered."""
    hook = getattr(pm.hook, "register_curvature_operators", None)
    if hook is not None:
        hook(register=register_operator)
    return operator_names()
