"""``HessianOperator``: the public factory of curvature operators, and ``gradient``.

``HessianOperator(model, loss_fn, batches, kind=..., method=..., ...)`` returns the
operator class registered as ``kind`` (:mod:`lscape.curvature.registry`) built with the
remaining arguments; every operator has the flat-vector contract of
:class:`lscape.curvature.base.CurvatureOperator` (``matvec``, ``matmat``, ``gradient``,
``loss``, ``release``, ``dim``, ``num_products``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lscape.batch import BatchAdapter
from lscape.curvature.base import MODES, CurvatureOperator, LossFn
from lscape.curvature.errors import CurvatureArgumentError
from lscape.curvature.products import METHODS, choose_method
from lscape.curvature.sharded import ShardedHessian, check_sharded, is_sharded_model
from lscape.curvature.registry import OPERATORS, operator_class

__all__ = ["HessianOperator", "gradient", "METHODS", "KINDS", "MODES"]

#: the built-in matrices (every registered one: :func:`lscape.curvature.operator_names`)
KINDS = tuple(OPERATORS)


def HessianOperator(  # noqa: N802 - the public name of the factory since version 0.1
    model: nn.Module,
    loss_fn: LossFn | BatchAdapter,
    batches: Any,
    params: Any = None,
    mode: str = "eval",
    method: str = "auto",
    kind: str = "hessian",
    cache_graph: bool | None = None,
    seed: int = 0,
    chunk: int | None = None,
    fd_eps: float | None = None,
    fd_offset: float = 0.0,
    fd_richardson: bool = False,
    mc_samples: int = 1,
    optimizer: Any = None,
) -> CurvatureOperator:
    """The Hessian (or Gauss–Newton matrix, or a Fisher matrix) of a model's loss as a linear operator.

    ``model`` any ``nn.Module``; ``loss_fn`` a batch-mean ``loss_fn(output, target)`` or a
    :class:`lscape.batch.BatchAdapter` (``ctx.adapter`` in a probe; dict batches, HF models,
    the model's own loss); ``batches`` a list of batches (a single ``(x, y)`` tuple or dict,
    or any re-iterable such as a DataLoader over the full training set); ``params`` None (all
    trainable parameters), glob patterns for :func:`lscape.params.select_parameters`
    (``"fc1.*"``, ``["layer1", "layer2"]``), or a list of the model's parameters; ``mode``
    ``"eval"`` or ``"train"`` (the module mode during products); ``method``
    ``"double-backward"``, ``"forward-over-reverse"``, ``"finite-difference"`` (central
    differences of gradients on the parameters in place, (g(θ+εv) − g(θ−εv)) / (2ε +
    ``fd_offset``), ε = ``fd_eps`` or, when None, u^{1/3}·max(1, rms θ)/‖v‖ (u^{1/5} with
    ``fd_richardson``, which combines ε and ε/2 to O(ε⁴)); the estimated relative error is
    ``op.product_error``) or ``"auto"`` (the default: on the first product the autograd
    products are checked against finite differences along one vector, and the first that
    agrees is used, else finite differences; ``op.method``, ``op.method_reason`` and
    ``op.describe()`` say which and why); ``kind`` a registered matrix:

    - ``"hessian"`` (:class:`lscape.curvature.hessian.Hessian`);
    - ``"ggn"``: Gauss–Newton Jᵀ ∇²_out L J (:class:`lscape.curvature.ggn.GaussNewton`);
    - ``"empirical-fisher"``: (1/R) Σ_r g_r g_rᵀ with g_r the gradient of row r's loss
      (:class:`lscape.curvature.empirical_fisher.EmpiricalFisher`);
    - ``"fisher"``: the Monte-Carlo Fisher with ``mc_samples`` label draws per row from a
      fixed seed, cross-entropy only (:class:`lscape.curvature.fisher.MonteCarloFisher`);
    - ``"preconditioned"``: P^{-1/2} H P^{-1/2} with P read from ``optimizer``'s state
      (:class:`lscape.curvature.preconditioned.PreconditionedHessian`; Adam/AdamW, RMSprop,
      Adagrad, SGD, or any optimizer taught with :func:`lscape.curvature.register_preconditioner`);
    - any matrix added with :func:`lscape.curvature.register_operator`.

    On a model sharded by FSDP2 (``--strategy fsdp``) the operator is a
    :class:`lscape.curvature.sharded.ShardedHessian`: the Hessian by finite differences of the
    model's own gradients, on vectors sharded like the parameters (``dim`` local entries of
    ``global_dim``); other kinds and forced autograd methods are refused (``ValueError``).

    ``optimizer`` the training optimizer, passed to a matrix that reads it (a class with
    ``needs_optimizer``, such as ``"preconditioned"``) and ignored by the others.

    The GGN and the Fisher matrices need the loss as a function of a tensor output
    (``adapter.criterion``): they are refused for the model's own loss.

    ``cache_graph`` keeps the first-order graph of each batch so that a product costs one
    extra backward pass instead of a forward and two backwards (default: when there are at
    most 8 batches held in a list and no ``chunk``). A cached operator describes the
    parameters at its first product: build a new operator after the parameters change.
    ``chunk`` splits every batch into pieces of at most that many samples
    (:func:`lscape.batch.chunks`), so memory scales with one chunk; exact for per-sample
    mean losses. After each product ``peak_memory`` holds the peak bytes allocated on a CUDA
    device during it (None on the CPU). Bad arguments raise ``ValueError``
(:class:`lscape.curvature.errors.CurvatureArgumentError`, naming the argument) or ``TypeError``.
    """
    cls = operator_class(kind)
    if is_sharded_model(model):  # FSDP2: the Hessian by finite differences on sharded vectors
        check_sharded(cls.name or kind, choose_method(method))
        return ShardedHessian(model, loss_fn, batches, params=params, mode=mode, method=method, seed=seed,
                              chunk=chunk, fd_eps=fd_eps, fd_offset=fd_offset, fd_richardson=fd_richardson)
    extra: dict[str, Any] = {}
    if mc_samples != 1:
        if "mc_samples" not in _init_keywords(cls):
            raise CurvatureArgumentError(f"mc_samples applies to Monte-Carlo matrices (kind=fisher), not "
                                         f"kind={cls.name}", "mc_samples")
        extra["mc_samples"] = mc_samples
    if cls.needs_optimizer:
        extra["optimizer"] = optimizer
    return cls(model, loss_fn, batches, params=params, mode=mode, method=method, cache_graph=cache_graph,
               seed=seed, chunk=chunk, fd_eps=fd_eps, fd_offset=fd_offset, fd_richardson=fd_richardson,
               **extra)


def gradient(
    model: nn.Module,
    loss_fn: LossFn | BatchAdapter,
    batches: Any,
    params: Any = None,
    mode: str = "eval",
) -> Any:
    """The size-weighted mean gradient of the loss over ``batches`` as a flat vector.

    Same conventions as :func:`HessianOperator`; ``.grad``, modes and buffers are untouched.
    """
    return HessianOperator(model, loss_fn, batches, params=params, mode=mode, cache_graph=False).gradient()


def _init_keywords(cls: type) -> set[str]:
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names
