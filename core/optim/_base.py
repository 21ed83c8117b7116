"""What every optimizer variant shares: the ``torch.optim.Optimizer`` shell around a base
optimizer, the split of keyword arguments between the two, and the BatchNorm helpers."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["WrappedOptimizer", "batchnorm_stats_frozen", "batchnorm_parameters"]


class WrappedOptimizer(torch.optim.Optimizer):
    """A variant that owns the step and delegates the parameter update to a base optimizer.

    ``WrappedOptimizer(params, base_optimizer, **options)``: ``base_optimizer`` is a
    ``torch.optim.Optimizer`` class, built here over the variant's param groups with the
    options its constructor accepts, or an optimizer already built (``params`` then None or
    the same parameters; ``Variant(base, **options)`` is the same as ``Variant(None, base,
    ...)``). The other options are the variant's: the keyword arguments of ``configure``;
    one that both accept goes to the base, the variant's own then carries ``prefix``.

    The variant is constructed through ``Optimizer.__init__``, and its ``param_groups``,
    ``state`` and ``defaults`` are the base optimizer's objects (relinked whenever the base
    loads a state dict), so learning-rate schedulers, Lightning and the HF Trainer see an
    ordinary optimizer. Subclasses implement ``configure(**options)`` and ``step(closure)``
    with the torch closure convention (the closure zeroes the gradients, runs forward and
    backward and returns the loss), call ``self.base.step()`` for the update, and keep
    their counters in ``self.variant_state`` (``t``: completed steps), which
    ``state_dict``/``load_state_dict`` carry next to the base's state.
    """

    #: prefix of the variant's options whose names the base optimizer's constructor takes too
    prefix: str = ""

    def __init__(self, params: Iterable[Any] | torch.optim.Optimizer | None, base_optimizer: Any = None,
                 **options: Any):
        if base_optimizer is None and "base" in options:
            base_optimizer = options.pop("base")
        if base_optimizer is None and isinstance(params, torch.optim.Optimizer):
            params, base_optimizer = None, params
        built = isinstance(base_optimizer, torch.optim.Optimizer)
        if not (built or isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        base_kwargs, own = split_options(type(self), base_optimizer, options)
        if built:
            if params is not None:
                given = {id(p) for p in _flat_params(params)}
                held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given and given != held:
                    raise ValueError("params differ from the base optimizer's parameters")
            # the base keeps its own groups; these copies only satisfy Optimizer.__init__
            super().__init__([{"params": list(g["params"])} for g in base_optimizer.param_groups], {})
            base = base_optimizer
        else:
            if params is None:
                raise TypeError("building the base optimizer from its class needs params")
            super().__init__(params, {})
            base = base_optimizer(self.param_groups, **base_kwargs)  # the same group dicts
        self.base = base
        self.relink()
        base.register_load_state_dict_post_hook(self._base_loaded)
        self.variant_state: dict[str, Any] = {"t": 0}
        self.stats: dict[str, float] = {}
        self.configure(**own)

    def configure(self, **options: Any) -> None:
        """Take the variant's options (subclasses declare them as keyword arguments)."""
        if options:
            raise TypeError(f"{type(self).__name__} takes no options, got {', '.join(sorted(options))}")

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer (also ``base``)."""
        return self.base

    def relink(self) -> None:
        """Share the base optimizer's ``param_groups``, ``state`` and ``defaults``."""
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def _base_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        # Optimizer.load_state_dict replaces the base's param_groups and state objects
        self.relink()

    @property
    def t(self) -> int:
        """Number of completed outer steps."""
        return self.variant_state["t"]

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter the base optimizer updates, in param-group order."""
        return [p for g in self.base.param_groups for p in g["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (during ``Optimizer.__init__``: to the variant's own list)."""
        if "base" in self.__dict__:
            self.base.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the base optimizer's parameters."""
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus the variant's own counters."""
        return {"base": self.base.state_dict(), "variant": dict(self.variant_state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.base.load_state_dict(state_dict["base"])
        self.variant_state.update(state_dict["variant"])
        self.relink()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # pragma: no cover - subclasses override it
        """Run one update; return the loss at the current point."""
        raise NotImplementedError

    def require_closure(self, closure: Any) -> None:
        """A clear error when ``step`` is called without the closure it needs."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure: it evaluates the loss several times per step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and param_groups: copies need the rest
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def split_options(variant: type, base_optimizer: Any, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into the base optimizer's constructor arguments and the variant's."""
    own = _accepts(variant.configure)
    base_names = _accepts(base_optimizer.__init__) if isinstance(base_optimizer, type) else set()
    base_kwargs, variant_kwargs = {}, {}
    prefix = variant.prefix
    for key, value in options.items():
        plain = key[len(prefix):] if prefix and key.startswith(prefix) else None
        if plain in own:
            variant_kwargs[plain] = value
        elif key in base_names:
            base_kwargs[key] = value
        elif key in own:
            variant_kwargs[key] = value
        elif not isinstance(base_optimizer, type):
            raise TypeError(f"{variant.__name__} got an unknown option {key!r}: options that belong to the "
                            f"base optimizer go to its constructor (it is already built)")
        else:
            raise TypeError(f"{variant.__name__} got an unknown option {key!r} (its own: "
                            f"{', '.join(sorted(own))}; the base optimizer's: {', '.join(sorted(base_names)) or '-'})")
    return base_kwargs, variant_kwargs


def _accepts(fn: Any) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if n not in ("self", "params", "base") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _flat_params(params: Iterable[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out


@contextlib.contextmanager
def batchnorm_stats_frozen(model: nn.Module | None) -> Iterator[None]:
    """Inside the block, forward passes in train mode leave BatchNorm running statistics unchanged.

    The buffers are copied and written back rather than setting ``momentum=0``, so that
    ``num_batches_tracked`` and cumulative averaging (``momentum=None``) are preserved bit
    for bit too.
    """
    saved = []
    if model is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved.append([(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None])
    try:
        yield
    finally:
        with torch.no_grad():
            for bufs in saved:
                for b, copy in bufs:
                    b.copy_(copy)


def batchnorm_parameters(model: nn.Module | None) -> set[int]:
    """``id``s of the affine parameters of every BatchNorm layer in ``model``."""
    if model is None:
        return set()
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False)
    }
