"""The shared shell of lscape's optimizer variants: a base torch.optim optimizer plus state."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["WrappedOptimizer", "batchnorm_stats_frozen", "batchnorm_parameters"]


class WrappedOptimizer:
    """A variant that owns the step but delegates the parameter update to ``base``.

    ``base`` is any :class:`torch.optim.Optimizer`; its param groups, hyper-parameters and
    state (momentum buffers, Adam moments) are the variant's. Subclasses implement
    ``step(closure)`` with the torch closure convention (the closure zeroes the gradients,
    runs forward and backward and returns the loss) and keep their own counters in
    ``self.variant_state`` so that they survive ``state_dict``/``load_state_dict``.
    """

    def __init__(self, base: torch.optim.Optimizer):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        self.base = base
        self.variant_state: dict[str, Any] = {"t": 0}
        self.stats: dict[str, float] = {}

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's param groups (learning-rate schedulers act on these)."""
        return self.base.param_groups

    @property
    def t(self) -> int:
        """Number of completed outer steps."""
        return self.variant_state["t"]

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter the base optimizer updates, in param-group order."""
        return [p for g in self.base.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the base optimizer's parameters."""
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus the variant's own counters."""
        return {"base": self.base.state_dict(), "variant": dict(self.variant_state)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.base.load_state_dict(state["base"])
        self.variant_state.update(state["variant"])

    def step(self, closure):  # pragma: no cover - every subclass overrides it
        """Run one update; return the loss at the current point."""
        raise NotImplementedError

    def _require_closure(self, closure) -> None:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure: it evaluates the loss several times per step")


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
