"""lscape's optimizer variants as plain optimizers for any training loop: ``lscape.optim``.

SAM/ASAM (Foret et al. 2021; Kwon et al. 2021), SmoothOut/AdaSmoothOut (Wen et al. 2018) and
Entropy-SGD (Chaudhari et al. 2017), with the ``torch.optim`` closure convention::

    opt = lscape.optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)      # the loss at θ, before the update

``base_optimizer`` is a ``torch.optim.Optimizer`` class (built over ``params`` with the
keyword arguments it accepts) or an optimizer already built over them (``params=None``).
Every other keyword is the variant's (the options of the classes in
``lscape.plugins.optim``); a name both accept (Adam's ``eps``, SGD's ``momentum``) goes to
the base, and the variant's is given with its prefix: ``sam_eps``, ``langevin_momentum``,
``smoothout_...``. The variants are
``torch.optim.Optimizer`` instances to the outside world: learning-rate schedulers,
Lightning's ``configure_optimizers`` and the HF Trainer take them; ``param_groups`` and
``state`` are the base optimizer's, ``state_dict`` holds the base's state and the variant's
counters. Entropy-SGD's closure must draw a NEW minibatch at every call (it makes L + 1
calls per step); SmoothOut's ``step`` also takes a list of closures, one per ghost chunk.

The algorithms are the classes in ``lscape.plugins.optim`` (the ``sam``, ``smoothout`` and
``entropy-sgd`` plugins wrap the same code), so a loop using them updates exactly as an
``lscape run --plugin sam`` does.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Iterable

import torch

from lscape.plugins.optim.entropy_sgd import EntropySGD as _EntropySGD
from lscape.plugins.optim.sam import SAM as _SAM
from lscape.plugins.optim.smoothout import SmoothOut as _SmoothOut

__all__ = ["SAM", "SmoothOut", "EntropySGD"]


def _base_optimizer(params: Iterable[Any] | None, base_optimizer: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer: built from a class over ``params``, or the instance given."""
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if kwargs:
            raise TypeError(f"options {', '.join(sorted(kwargs))} belong to the base optimizer's constructor: pass "
                            f"its class (torch.optim.SGD) to build it here, or build it with them")
        if params is not None:
            given = {id(p) for p in _flat_params(params)}
            held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given and given != held:
                raise ValueError("params differ from the base optimizer's parameters")
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        if params is None:
            raise TypeError("building the base optimizer from its class needs params")
        return base_optimizer(params, **kwargs)
    raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")


def _flat_params(params: Iterable[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out


def _accepts(fn: Any) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if n not in ("self", "params", "base") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class _Plain(torch.optim.Optimizer):
    """What makes a variant a ``torch.optim.Optimizer`` to schedulers and frameworks: the
    base optimizer's ``param_groups``, ``state`` and ``defaults``, and the hook tables the
    ``Optimizer`` API expects (not ``Optimizer.__init__``, which would copy the groups)."""

    #: prefix of the variant's options whose names the base optimizer takes too
    prefix: str = ""

    def _setup(self, variant: type, params: Any, base_optimizer: Any, kwargs: dict[str, Any]) -> None:
        """Split ``kwargs`` between the base and the variant, build both."""
        self._init_plain()
        own = _accepts(variant.__init__)
        base_names = _accepts(base_optimizer.__init__) if isinstance(base_optimizer, type) else set()
        base_kwargs, variant_kwargs = {}, {}
        for key, value in kwargs.items():
            plain = key[len(self.prefix):] if key.startswith(self.prefix) else None
            if plain in own:
                variant_kwargs[plain] = value
            elif key in base_names:
                base_kwargs[key] = value
            elif key in own:
                variant_kwargs[key] = value
            elif not isinstance(base_optimizer, type):
                raise TypeError(f"{type(self).__name__} got an unknown option {key!r}: options that belong to the "
                                f"base optimizer go to its constructor (it is already built)")
            else:
                raise TypeError(f"{type(self).__name__} got an unknown option {key!r} (its own: "
                                f"{', '.join(sorted(own))}; the base optimizer's: {', '.join(sorted(base_names)) or '-'})")
        variant.__init__(self, _base_optimizer(params, base_optimizer, base_kwargs), **variant_kwargs)

    def _init_plain(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def state(self):  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value) -> None:
        self.base.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.base.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)


class SAM(_SAM, _Plain):
    """Sharpness-aware minimisation around any base optimizer; ``adaptive=True`` is ASAM.

    ``step(closure)``: g = ∇L(θ) from the first call, e = ρ g/(‖g‖ + eps) (ASAM: ρ T²g/‖Tg‖,
    T = |θ| + eta), the second call at θ + e, θ restored exactly, then the base step with
    ∇L(θ + e). With ``model`` given, BatchNorm running statistics move at θ only. ``stats``
    holds ``grad_norm`` and ``perturbation_norm`` of the last step. Options: ``rho``,
    ``adaptive``, ``eta``, ``eps`` (``sam_eps`` when the base takes an ``eps``), ``model``,
    and the rest of ``lscape.plugins.optim.SAM``'s.
    """

    prefix = "sam_"

    def __init__(self, params: Iterable[Any] | None, base_optimizer: Any, rho: float = 0.05, **kwargs: Any):
        self._setup(_SAM, params, base_optimizer, {"rho": rho, **kwargs})


class SmoothOut(_SmoothOut, _Plain):
    """SmoothOut (``shape="none"``) and AdaSmoothOut (``shape="filter"``) around any base optimizer.

    ``step(closure)`` (or a list of closures, one per ghost chunk, with ``weights=``): noise
    τ of amplitude ``ss·coef_t`` on the weights, the closure, the noise removed exactly, the
    gradients averaged and clipped to ``clip``, then the base step. Options: ``ss``,
    ``schedule``, ``total_steps``, ``shape``, ``distribution``, ``denoise``, ``clip``,
    ``model``, ``exclude_batchnorm``, ``generator``, and the rest of
    ``lscape.plugins.optim.SmoothOut``'s (prefix ``smoothout_`` on a name clash).
    """

    prefix = "smoothout_"

    def __init__(self, params: Iterable[Any] | None, base_optimizer: Any, ss: float = 0.006, **kwargs: Any):
        self._setup(_SmoothOut, params, base_optimizer, {"ss": ss, **kwargs})


class EntropySGD(_EntropySGD, _Plain):
    """Entropy-SGD around any base optimizer (the paper's: SGD with Nesterov momentum).

    ``step(closure)`` calls the closure L + 1 times, each on a NEW minibatch: once at x for
    the reported loss, then L Langevin steps; the local-entropy gradient x − μ goes to the
    base step. ``L=0`` is the base optimizer exactly. Options: ``L``, ``gamma``,
    ``scoping``, ``noise``, ``langevin_lr``, ``beta``, ``generator``, and the rest of
    ``lscape.plugins.optim.EntropySGD``'s. The Langevin loop shares the base's ``momentum``,
    ``nesterov`` and ``weight_decay`` (keyword arguments of the base, like ``lr``) unless
    ``langevin_momentum``, ``langevin_nesterov`` or ``langevin_weight_decay`` override them.
    """

    prefix = "langevin_"

    def __init__(self, params: Iterable[Any] | None, base_optimizer: Any, L: int = 0, **kwargs: Any):
        self._setup(_EntropySGD, params, base_optimizer, {"L": L, **kwargs})
