"""The diagonal preconditioner of an optimizer, read from its own state, and its edge-of-stability threshold.

An adaptive optimizer moves θ ← θ − η P⁻¹ m: the curvature that its stability depends on is
that of the preconditioned Hessian P⁻¹H (similar to P^{-1/2} H P^{-1/2}, same eigenvalues),
and its threshold is the one of the momentum scheme wrapped around P (Cohen et al. 2022,
"Adaptive Gradient Methods at the Edge of Stability", arXiv:2207.14484). The rules below
state P for each optimizer family exactly as torch's update rule applies it, from the state
the optimizer holds after its last step (the preconditioner that step used):

- ``Adam``, ``AdamW``: torch computes m_t = β₁m + (1−β₁)g, v_t = β₂v + (1−β₂)g², then
  θ ← θ − η/(1−β₁ᵗ) · m_t/(√(v_t/(1−β₂ᵗ)) + ε). So θ ← θ − η P⁻¹ m_t with
  **P = (1 − β₁ᵗ)·(√v̂ + ε)**, v̂ = v_t/(1 − β₂ᵗ): the effective per-coordinate step on m_t is
  η/((1−β₁ᵗ)(√v̂+ε)). With ``amsgrad`` v_t is ``max_exp_avg_sq``. AdamW's decoupled decay
  θ ← (1 − ηλ)θ is not part of P (it shifts the update's Jacobian by −ηλ, as in the paper);
  Adam's coupled ``weight_decay`` adds λ to the gradient, i.e. λI to the Hessian of the
  regularised objective, which the curvature operator of the loss does not include.
- ``RMSprop``: v ← αv + (1−α)g²; **P = √v + ε**, or **P = √(v − ḡ²) + ε** when ``centered``
  (ḡ the running mean of g, ``grad_avg``); no bias correction. Momentum μ acts on P⁻¹g
  (buf ← μ buf + P⁻¹g, θ ← θ − η buf): heavy-ball on the preconditioned problem.
- ``Adagrad``: s ← s + g²; θ ← θ − η/(1 + (t−1)·lr_decay) · g/(√s + ε), so
  **P = (1 + (t−1)·lr_decay)·(√s + ε)** (the learning-rate decay is folded into P so that
  the threshold is stated for the nominal η).
- ``SGD``: **P = I** (a scalar preconditioner: the preconditioned operator is H itself);
  the momentum scheme changes the threshold only.

Per-group learning rates are folded into P: a parameter of a group with learning rate η_g
gets P·η_ref/η_g, so that every coordinate moves as θ ← θ − η_ref P⁻¹(…) with one reference
η_ref (the first param group's ``lr``, or the ``lr`` given; :func:`edge_threshold` uses the same).
``maximize=True`` optimizers ascend L: the matrix whose stability matters is then −H, which
:class:`Preconditioner.sign` records (−1) and :class:`PreconditionedOperator` applies.

The thresholds (:func:`edge_threshold`): for a frozen P, linearised dynamics on a quadratic
with curvature λ along an eigenvector of P⁻¹H are stable iff ηλ is below

- gradient descent, SGD, Adagrad, RMSprop without momentum: **2/η**;
- heavy-ball momentum β (``SGD(momentum=β)``, ``RMSprop(momentum=β)``): **(2 + 2β)/η**;
  with ``dampening`` τ the gradient enters scaled by 1 − τ: **(2 + 2β)/((1 − τ)η)**;
- Nesterov momentum (``SGD(nesterov=True)``): **(2 + 2β)/((1 + 2β)η)**;
- Adam/AdamW: the EMA momentum m ← β₁m + (1−β₁)g is heavy-ball with step η(1−β₁):
  **(2 + 2β₁)/((1 − β₁)η)**, 38/η at β₁ = 0.9 (Cohen et al. 2022, their threshold).

A plugin teaches a new optimizer (Shampoo, Muon, …) with :func:`register_preconditioner`.
lscape's optimizer variants (SAM, SmoothOut, Entropy-SGD in :mod:`lscape.optim`) and any
wrapper holding a ``base_optimizer`` or ``base`` optimizer are read through the optimizer
they wrap (SAM's own edge is the SAM-edge, which ``eos`` computes separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

__all__ = [
    "Preconditioner",
    "PreconditionerRule",
    "EdgeThreshold",
    "preconditioner",
    "edge_threshold",
    "register_preconditioner",
    "preconditioner_rule",
    "base_optimizer",
    "NotSteppedError",
]

DiagFn = Callable[[dict, dict, torch.Tensor], torch.Tensor]
ThresholdFn = Callable[[dict, float], "tuple[float, str]"]


class NotSteppedError(ValueError):
    """The optimizer has not taken a step yet, so its state holds no preconditioner (a
    ``ValueError``; a measurement may simply wait for the first update, unlike the other
    refusals, which do not go away)."""


class EdgeThreshold(NamedTuple):
    """An optimizer's stability threshold for the (preconditioned) sharpness."""

    value: float
    name: str
    formula: str


@dataclass
class PreconditionerRule:
    """How to read P and the threshold for one optimizer family.

    ``name`` short family name (recorded next to the measurement); ``formula`` P in words;
    ``diag(state, group, param)`` P for one parameter (its shape, or a scalar) from the
    optimizer's per-parameter ``state`` and its param ``group``, not including the group's
    learning rate; ``threshold(group, lr)`` → (value, formula) of the edge for that group's
    hyperparameters at learning rate ``lr``; ``hyper(group)`` the hyperparameters the
    threshold depends on (groups must agree on them for one threshold).
    """

    name: str
    formula: str
    diag: DiagFn
    threshold: ThresholdFn
    hyper: Callable[[dict], tuple] = lambda group: ()
    #: whether the rule needs per-parameter state (SGD's P = I does not)
    needs_state: bool = True


@dataclass
class Preconditioner:
    """P as a flat vector in the order of the parameters it was read for.

    ``diag`` (dim,) P with per-group learning rates folded in (float64 unless the
    parameters are lower precision); ``lr`` the reference η the thresholds go with;
    ``rule`` the family name; ``formula`` the rule in words; ``optimizer`` the class read
    (after unwrapping); ``step`` the optimizer's step count t; ``sign`` −1 for
    ``maximize=True`` optimizers (the stability matrix is −H), else 1.
    """

    diag: torch.Tensor
    lr: float
    rule: str
    formula: str
    optimizer: str
    step: int
    sign: float = 1.0

    def inverse_sqrt(self) -> torch.Tensor:
        """D = P^{-1/2}, the scaling of :class:`lscape.curvature.PreconditionedOperator`."""
        return self.diag.rsqrt()


_RULES: dict[type, PreconditionerRule] = {}


def register_preconditioner(optimizer_class: type, rule: PreconditionerRule | DiagFn, *,
                            name: str | None = None, formula: str | None = None) -> None:
    """Teach the preconditioned curvature a new optimizer class (subclasses match too).

    ``rule`` a :class:`PreconditionerRule`, or a plain ``diag(state, group, param)`` function
    (P for one parameter, without the learning rate); a plain function gets the
    gradient-descent threshold 2/η (say otherwise with a full rule)."""
    if not isinstance(optimizer_class, type):
        raise TypeError(f"register_preconditioner takes an optimizer class, not {optimizer_class!r}")
    if not isinstance(rule, PreconditionerRule):
        if not callable(rule):
            raise TypeError(f"a preconditioner rule is a PreconditionerRule or a function, not {rule!r}")
        rule = PreconditionerRule(name=name or optimizer_class.__name__.lower(),
                                  formula=formula or f"P from {optimizer_class.__name__}'s state",
                                  diag=rule, threshold=_gd_threshold)
    _RULES[optimizer_class] = rule


def base_optimizer(optimizer: Any) -> Any:
    """The optimizer whose state holds the moments: unwraps ``base_optimizer``/``base``
    attributes (lscape.optim's SAM, SmoothOut, Entropy-SGD and similar wrappers) until a
    class with a registered rule, or a plain optimizer, is reached."""
    seen = set()
    while _lookup(type(optimizer)) is None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = None
        for attr in ("base_optimizer", "base"):
            candidate = getattr(optimizer, attr, None)
            if isinstance(candidate, torch.optim.Optimizer) and candidate is not optimizer:
                inner = candidate
                break
        if inner is None:
            break
        optimizer = inner
    return optimizer


def preconditioner_rule(optimizer: Any) -> PreconditionerRule:
    """The rule for ``optimizer`` (after unwrapping); ValueError for an optimizer without one."""
    base = base_optimizer(optimizer)
    rule = _lookup(type(base))
    if rule is None:
        raise ValueError(f"no preconditioner rule for optimizer {type(base).__name__}; "
                         f"register one with lscape.curvature.register_preconditioner")
    return rule


def preconditioner(optimizer: Any, params: Sequence[torch.Tensor] | None = None, lr: float | None = None) -> Preconditioner:
    """P read from ``optimizer``'s state at its last step, flat in the order of ``params``.

    ``params`` the parameters of the curvature operator (``op.params``), default every
    parameter the optimizer holds, group by group; ``lr`` the reference learning rate
    (default: the first param group's ``lr``, as in :func:`edge_threshold`). Raises ValueError for an
    optimizer without a rule, one that has not stepped yet, or a parameter it does not hold.
    """
    base = base_optimizer(optimizer)
    rule = preconditioner_rule(base)
    where = {}
    for group in base.param_groups:
        for p in group["params"]:
            where.setdefault(id(p), group)
    if params is None:
        params = [p for group in base.param_groups for p in group["params"]]
    params = [p[1] if isinstance(p, tuple) else p for p in params]
    if not params:
        raise ValueError("the preconditioner needs at least one parameter")
    for i, p in enumerate(params):
        if id(p) not in where:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not held by the optimizer "
                             f"{type(base).__name__}: build the curvature operator over the optimizer's parameters")
    states = [base.state.get(p, {}) for p in params]
    steps = [_step(s) for s in states]
    if rule.needs_state and (not any(states) or max(steps) == 0):
        raise NotSteppedError(f"the {type(base).__name__} optimizer has not stepped yet: its state holds no "
                         f"preconditioner (measure after at least one optimizer step)")
    ref = float(lr) if lr is not None else _float(base.param_groups[0]["lr"])
    if ref <= 0:
        raise ValueError(f"the reference learning rate must be positive, not {ref}")
    parts = []
    for p, state in zip(params, states):
        group = where[id(p)]
        if rule.needs_state and (not state or _step(state) == 0):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has no {type(base).__name__} state "
                             f"(it received no gradient at the steps taken): it has no preconditioner")
        d = torch.as_tensor(rule.diag(state, group, p), device=p.device)
        d = d.detach().to(torch.float64 if p.dtype in (torch.float32, torch.float64) else p.dtype)
        d = d.expand(p.shape) if d.dim() == 0 else d.reshape(p.shape)
        parts.append((d * (ref / _float(group["lr"]))).reshape(-1))
    diag = torch.cat(parts)
    if not bool(torch.isfinite(diag).all()) or bool((diag <= 0).any()):
        raise ValueError(f"the {rule.name} preconditioner read from the optimizer state is not positive and "
                         f"finite (eps = 0 with a zero second moment?)")
    sign = -1.0 if any(bool(where[id(p)].get("maximize", False)) for p in params) else 1.0
    return Preconditioner(diag=diag, lr=ref, rule=rule.name, formula=rule.formula, optimizer=type(base).__name__,
                          step=max(steps) if steps else 0, sign=sign)


def edge_threshold(optimizer: Any, lr: float | None = None) -> EdgeThreshold:
    """The stability threshold of ``optimizer`` for λ_max(P⁻¹H): (value, name, formula).

    ``lr`` the reference η (default: the first group's ``lr``; the value is the threshold
    for P as :func:`preconditioner` folds the groups' learning rates). ValueError when the
    groups disagree on the hyperparameters the threshold depends on (β₁, momentum, …).
    """
    base = base_optimizer(optimizer)
    rule = preconditioner_rule(base)
    groups = base.param_groups
    eta = float(lr) if lr is not None else _float(groups[0]["lr"])
    if eta <= 0:
        raise ValueError(f"the learning rate must be positive for a stability threshold, not {eta}")
    hypers = {rule.hyper(g) for g in groups}
    if len(hypers) > 1:
        raise ValueError(f"the {type(base).__name__} parameter groups have different {rule.name} hyperparameters "
                         f"{sorted(hypers)}: there is no single stability threshold")
    value, formula = rule.threshold(groups[0], eta)
    return EdgeThreshold(float(value), f"threshold_{rule.name}", formula)


# -- the rules ----------------------------------------------------------------------------


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _step(state: dict) -> int:
    step = state.get("step", 0)
    return int(_float(step)) if step is not None else 0


def _lookup(cls: type) -> PreconditionerRule | None:
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer:
            return None
        if klass in _RULES:
            return _RULES[klass]
    return None


def _gd_threshold(group: dict, lr: float) -> tuple[float, str]:
    return 2.0 / lr, "2/η"


def _heavy_ball(beta: float, lr: float, symbol: str) -> tuple[float, str]:
    if beta == 0:
        return _gd_threshold({}, lr)
    return (2 + 2 * beta) / lr, f"(2 + 2{symbol})/η"


def _adam_diag(state: dict, group: dict, param: torch.Tensor) -> torch.Tensor:
    beta1, beta2 = (_float(b) for b in group["betas"])
    t = _step(state)
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    v_hat = v.detach().double() / (1 - beta2 ** t)
    return (1 - beta1 ** t) * (v_hat.sqrt() + _float(group["eps"]))


def _adam_threshold(group: dict, lr: float) -> tuple[float, str]:
    beta1 = _float(group["betas"][0])
    return (2 + 2 * beta1) / ((1 - beta1) * lr), "(2 + 2β₁)/((1 − β₁)η)"


def _rmsprop_diag(state: dict, group: dict, param: torch.Tensor) -> torch.Tensor:
    v = state["square_avg"].detach().double()
    if group.get("centered", False):
        g = state["grad_avg"].detach().double()
        v = v - g * g
    return v.clamp_min(0).sqrt() + _float(group["eps"])


def _adagrad_diag(state: dict, group: dict, param: torch.Tensor) -> torch.Tensor:
    decay = 1 + (_step(state) - 1) * _float(group.get("lr_decay", 0.0))
    return decay * (state["sum"].detach().double().sqrt() + _float(group["eps"]))


def _sgd_threshold(group: dict, lr: float) -> tuple[float, str]:
    beta = _float(group.get("momentum", 0.0))
    tau = _float(group.get("dampening", 0.0))
    if beta == 0:
        return _gd_threshold(group, lr)
    if group.get("nesterov", False):
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr), "(2 + 2β)/((1 + 2β)η) (Nesterov)"
    if tau:
        return (2 + 2 * beta) / ((1 - tau) * lr), "(2 + 2β)/((1 − τ)η) (heavy ball, dampening τ)"
    return (2 + 2 * beta) / lr, "(2 + 2β)/η (heavy ball)"


register_preconditioner(torch.optim.Adam, PreconditionerRule(
    "adam", "P = (1 − β₁ᵗ)(√v̂ + ε), v̂ = v/(1 − β₂ᵗ)", _adam_diag, _adam_threshold,
    hyper=lambda g: (_float(g["betas"][0]),)))
register_preconditioner(torch.optim.AdamW, PreconditionerRule(
    "adamw", "P = (1 − β₁ᵗ)(√v̂ + ε), v̂ = v/(1 − β₂ᵗ)", _adam_diag, _adam_threshold,
    hyper=lambda g: (_float(g["betas"][0]),)))
register_preconditioner(torch.optim.RMSprop, PreconditionerRule(
    "rmsprop", "P = √v + ε (centered: √(v − ḡ²) + ε)", _rmsprop_diag,
    lambda g, lr: _heavy_ball(_float(g.get("momentum", 0.0)), lr, "μ"),
    hyper=lambda g: (_float(g.get("momentum", 0.0)),)))
register_preconditioner(torch.optim.Adagrad, PreconditionerRule(
    "adagrad", "P = (1 + (t − 1)·lr_decay)(√s + ε)", _adagrad_diag, _gd_threshold))
register_preconditioner(torch.optim.SGD, PreconditionerRule(
    "sgd", "P = I", lambda state, group, param: torch.ones((), dtype=torch.float64), _sgd_threshold,
    hyper=lambda g: (_float(g.get("momentum", 0.0)), _float(g.get("dampening", 0.0)), bool(g.get("nesterov", False))),
    needs_state=False))
