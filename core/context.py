"""What the engine hands to plugins: the run context and the state of the current step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import RunConfig
from .limits import ProbeBudget, ProbeTimer
from .store import RunStore

if TYPE_CHECKING:  # these modules import this one
    from .batch import BatchAdapter
    from .data import BatchStream, Fetcher
    from .manager import Registry
    from .probe import Plugin, StepOwner

__all__ = ["RunContext", "StepState"]


@dataclass
class RunContext:
    """The long-lived objects of one run (or one ``lscape measure`` call).

    ``optimizer`` is the base ``torch.optim`` optimizer; ``step_owner`` the active
    optimizer-variant plugin, if any; ``stream`` the engine's training batches (None in an
    attached session, whose loop has its own). ``cache`` is the plugins' own: a dict they
    may share data through (e.g. the full training set moved to the device once); the
    engine keeps nothing there.
    """

    config: RunConfig
    model: nn.Module
    #: ``loss_fn(output, target)``; None for the model's own loss (``output.loss``)
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    train_set: Dataset
    eval_set: Dataset | None
    device: torch.device
    store: RunStore | None = None
    optimizer: torch.optim.Optimizer | None = None
    step_owner: StepOwner | None = None
    plugins: dict[str, Plugin] = field(default_factory=dict)
    registry: Registry | None = None
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    start_time: float = 0.0
    cache: dict[Any, Any] = field(default_factory=dict)
    stream: BatchStream | None = None
    rank: int = 0
    world_size: int = 1
    #: the one batch→loss adapter (``lscape.batch.BatchAdapter``): every forward pass on
    #: data goes through ``ctx.adapter.loss(model, batch)`` / ``.output(model, batch)``
    adapter: BatchAdapter = None  # type: ignore[assignment]  # made from loss_fn when not given
    #: DataLoader worker processes for passes over a data set (``--workers``)
    workers: int = 0
    #: loaders kept between evaluation passes (``lscape.data.full_batches(cache=...)``),
    #: closed at the run's end
    fetchers: dict[Any, Fetcher] = field(default_factory=dict)
    #: estimates how long each probe will take, after its first measurement
    probe_timer: ProbeTimer = field(default_factory=ProbeTimer)
    #: the run's ``--probe-budget`` (``lscape.limits.ProbeBudget``); None: every scheduled firing measures
    probe_budget: ProbeBudget | None = None

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
    #: the minibatch as the data gives it (a tuple, a dict, ...), on the device
    batch: Any = None
    #: a detached 0-d tensor (no host sync); a float from a loop that gives one
    loss: torch.Tensor | float | None = None
    lr: float | None = None
    time: float = 0.0
    epoch_end: bool = False
    #: numbers that join the step's row (evaluation metrics, ``global_batch_size``, ...)
    extras: dict[str, Any] = field(default_factory=dict)
