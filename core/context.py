"""What the engine hands to plugins: the run context and the state of the current step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .config import RunConfig
from .store import RunStore

__all__ = ["RunContext", "StepState"]


@dataclass
class RunContext:
    """The long-lived objects of one run (or one ``lscape measure`` call).

    ``optimizer`` is the base ``torch.optim`` optimizer; ``step_owner`` the active
    optimizer-variant plugin, if any. ``cache`` is a dict plugins may share data through
    (e.g. the full training set moved to the device once).
    """

    config: RunConfig
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_set: Any
    eval_set: Any
    device: torch.device
    store: RunStore | None = None
    optimizer: torch.optim.Optimizer | None = None
    step_owner: Any = None
    plugins: dict[str, Any] = field(default_factory=dict)
    registry: Any = None
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    start_time: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)
    stream: Any = None
    rank: int = 0
    world_size: int = 1
    #: the one batch→loss adapter (``lscape.batch.BatchAdapter``): every forward pass on
    #: data goes through ``ctx.adapter.loss(model, batch)`` / ``.output(model, batch)``
    adapter: Any = None

    def __post_init__(self) -> None:
        if self.adapter is None:
            from .batch import BatchAdapter

            self.adapter = BatchAdapter(self.loss_fn)

    @property
    def batch_size(self) -> int:
        """The training batch size in samples (the training set size under ``full``)."""
        if self.config.batch_size == "full":
            return len(self.train_set)
        return int(self.config.batch_size)

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else self.config.lr

    @property
    def is_main(self) -> bool:
        """Whether this process writes the store (rank 0)."""
        return self.rank == 0


@dataclass
class StepState:
    """The current training step.

    ``step`` counts the updates done before this step (0 for the first); ``batch`` is the
    step's minibatch on the device; ``loss`` is the minibatch loss at θ_step once the
    first backward pass ran; ``lr`` the learning rate used for this update; ``time`` the
    wall-clock seconds since the run started; ``epoch_end`` whether it is the last step
    of its epoch.
    """

    step: int
    epoch: int
    batch: Any = None
    loss: float | None = None
    lr: float | None = None
    time: float = 0.0
    epoch_end: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
