"""Curvature toolkit: curvature operators (Hessian, Gauss–Newton, Fisher), Lanczos, trace and
density estimators, dense spectra.

Usable on any model, loss and batches without the engine::

    from lscape.curvature import HessianOperator, lanczos
    op = HessianOperator(model, loss_fn, [(x, y)])          # kind="ggn", "fisher", ...
    top = lanczos(op, k=5, tol=1e-4)
    top.eigenvalues, top.residuals, top.num_products

Layout: ``base.py`` (:class:`CurvatureOperator`, what every matrix shares), one file per
matrix (``hessian.py``, ``ggn.py``, ``fisher.py``, ``empirical_fisher.py``, ``preconditioned.py``), ``registry.py``
(the ``kind`` table), ``products.py`` (how a matrix is applied to vectors), ``operator.py``
(the ``HessianOperator`` factory).
"""

from lscape.curvature import distributed
from lscape.curvature.base import CurvatureOperator
from lscape.curvature.dense import DEFAULT_MAX_PARAMS, DenseSpectrum, dense_hessian, dense_matrix, dense_spectrum
from lscape.curvature.density import SpectralDensity, gaussian_density, slq_density
from lscape.curvature.empirical_fisher import EmpiricalFisher
from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.fisher import MonteCarloFisher
from lscape.curvature.ggn import GaussNewton
from lscape.curvature.hessian import Hessian
from lscape.curvature.sharded import ShardedHessian
from lscape.curvature.lanczos import EigenResult, lanczos, power_iteration
from lscape.curvature.operator import KINDS, METHODS, MODES, HessianOperator, gradient
from lscape.curvature.registry import OPERATORS, collect_operators, operator_class, operator_names, register_operator
from lscape.curvature.trace import TraceEstimate, hutchinson, hutchpp
from lscape.curvature.preconditioner import (EdgeThreshold, NotSteppedError, Preconditioner, PreconditionerRule,
                                             edge_threshold, preconditioner, preconditioner_rule,
                                             register_preconditioner)
from lscape.curvature.preconditioned import PreconditionedHessian, PreconditionedOperator
from lscape.curvature.tracking import TrackResult, Tracker, cold_solve, disagree, track_eigenpair
from lscape.curvature.directional import (BatchSharpness, CriticalSharpness, DirectionalCurvature, batch_sharpness,
                                          critical_sharpness, directional_curvature, random_batches)

__all__ = [
    "HessianOperator",
    "gradient",
    "CurvatureOperator",
    "CurvatureArgumentError",
    "Hessian",
    "ShardedHessian",
    "GaussNewton",
    "MonteCarloFisher",
    "EmpiricalFisher",
    "OPERATORS",
    "register_operator",
    "operator_names",
    "operator_class",
    "collect_operators",
    "KINDS",
    "METHODS",
    "MODES",
    "lanczos",
    "power_iteration",
    "EigenResult",
    "hutchinson",
    "hutchpp",
    "TraceEstimate",
    "slq_density",
    "gaussian_density",
    "SpectralDensity",
    "dense_matrix",
    "dense_hessian",
    "dense_spectrum",
    "DenseSpectrum",
    "DEFAULT_MAX_PARAMS",
    "distributed",
    "Preconditioner",
    "PreconditionerRule",
    "EdgeThreshold",
    "preconditioner",
    "edge_threshold",
    "register_preconditioner",
    "preconditioner_rule",
    "NotSteppedError",
    "PreconditionedOperator",
    "PreconditionedHessian",
    "BatchSharpness",
    "batch_sharpness",
    "random_batches",
    "DirectionalCurvature",
    "directional_curvature",
    "CriticalSharpness",
    "critical_sharpness",
    "track_eigenpair",
    "cold_solve",
    "disagree",
    "Tracker",
    "TrackResult",
]
