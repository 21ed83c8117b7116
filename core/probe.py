"""Base classes of run plugins: ``Plugin``, ``Probe`` (a scheduled measurement) and
``StepOwner`` (an optimizer variant that owns the training step).

A plugin class declares its name, options and outputs; the engine instantiates it with
the resolved options when it is activated and registers the instance with the run's
plugin manager, so its ``@hookimpl`` methods receive the run events.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .context import RunContext, StepState
from .data import derived_seed, fixed_batches, full_batches, shard
from .errors import UsageError
from . import activity
from .hookspecs import hookimpl
from .manager import first_line
from .options import Option, Output, resolve_options
from .schedule import Schedule
from .store import GroupWriter

__all__ = ["Plugin", "Probe", "StepOwner", "preserve_state"]


class Plugin:
    """A run plugin: named, with typed options, optional outputs and hook methods."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    #: active in every run unless disabled with ``--disable NAME``
    always_on: ClassVar[bool] = False
    #: the store group this plugin writes (defaults to its name)
    group_name: ClassVar[str | None] = None
    #: plugins that must be active too (checked before anything is written)
    requires: ClassVar[tuple[str, ...]] = ()
    #: runs on a sharded model (``--strategy fsdp``: parameters and gradients are DTensor
    #: shards); a plugin that does not say so is refused there before anything is written
    sharded: ClassVar[bool] = False
    #: why not, said in that refusal (default: it was not written for sharded parameters)
    sharded_note: ClassVar[str] = ""

    def __init__(self, **options: Any):
        self.opts = resolve_options(self.all_options(), options, self.name)
        self._writers: dict[tuple[int, str | None], GroupWriter] = {}

    @classmethod
    def all_options(cls) -> tuple[Option, ...]:
        """Every option the plugin accepts, its own and the ones its base class adds."""
        return tuple(cls.options)

    def check(self, ctx: RunContext) -> None:
        """Called once the model and data are built, before the store exists: raise
        ``UsageError`` for a setup this plugin cannot measure (a model too big for a dense
        Hessian, a missing input), so bad input writes nothing."""

    def group(self, ctx: RunContext, sub: str | None = None) -> GroupWriter | None:
        """The writer of this plugin's store group (``None`` on ranks that do not write)."""
        if ctx.store is None or not ctx.is_main:
            return None
        key = (id(ctx.store), sub)  # cached: record() runs every step for some plugins
        writer = self._writers.get(key)
        if writer is None:
            name = self.group_name or self.name
            full = f"{name}/{sub}" if sub else name
            writer = ctx.store.group(full, self.outputs, attrs=self.store_attrs() if sub is None else None)
            self._writers[key] = writer
        return writer

    def opened_groups(self) -> list[GroupWriter]:
        """The writers of the groups this plugin has opened so far (none on ranks that do not write)."""
        return list(self._writers.values())

    def store_attrs(self) -> dict[str, Any]:
        """Attributes written on the plugin's group: its options (and schedule)."""
        return {"plugin": self.name, "options": {k: _attr(v) for k, v in vars(self.opts).items()}}

    def record(self, ctx: RunContext, step: int, group: str | None = None, **values: Any) -> None:
        """Append one row to the plugin's group (or its subgroup ``group``)."""
        writer = self.group(ctx, group)
        if writer is not None:
            writer.append(step, **values)

    def state_dict(self) -> dict[str, Any]:
        """Plugin state saved in checkpoints (tensors, numbers, strings); default none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, help, options and outputs, as ``lscape plugins NAME`` shows them."""
        return {
            "name": cls.name,
            "help": cls.help or first_line(cls),
            "kind": cls.kind(),
            "options": [
                {"name": o.name, "type": getattr(o.type, "__name__", str(o.type)), "default": o.default,
                 "help": o.help, "choices": list(o.choices) if o.choices else None}
                for o in cls.all_options()
            ],
            "outputs": [{"name": o.name, "dims": ["step", *o.dims], "dtype": o.dtype, "units": o.units,
                         "long_name": o.long_name} for o in cls.outputs],
        }

    @classmethod
    def kind(cls) -> str:
        return "plugin"


class Probe(Plugin):
    """A measurement taken on a schedule.

    Subclasses set ``name``, ``options``, ``outputs`` and implement ``measure``, which
    returns a dict of array name → value. The engine restores parameters, buffers,
    train/eval modes, ``.grad`` and RNG state after ``measure``, so a probe may use
    autograd on the model freely.
    """

    #: default schedule text (users override with ``schedule=`` or ``every=``)
    schedule: ClassVar[str] = "every:1"
    #: what data ``batches()`` gives: ``minibatch``, ``subset`` (K fixed batches) or ``full``
    data: ClassVar[str] = "minibatch"
    #: when to measure: ``after_backward`` (θ_step, .grad = ∇L_B) or ``step_end`` (θ_{step+1})
    at: ClassVar[str] = "after_backward"
    #: default number of samples of the fixed subset for ``data = subset``
    measure_samples: ClassVar[int] = 1024

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.opts.every is not None and options.get("schedule") is not None:
            raise UsageError(f"{self.name}: give schedule or every, not both")
        if self.opts.every is not None:
            if self.opts.every < 1:
                raise UsageError(f"bad value for {self.name}.every: must be >= 1")
            self.schedule = Schedule.every_n(self.opts.every)  # type: ignore[assignment]
        else:
            self.schedule = Schedule.parse(self.opts.schedule)  # type: ignore[assignment]
        self._batches: list[Any] | None = None
        self._data_attrs: dict[str, Any] = {}

    @classmethod
    def all_options(cls) -> tuple[Option, ...]:
        common = (
            Option("schedule", str, cls.schedule, "when to measure: every:N, at:0,10, log:A:B:N, epoch, time:15m"),
            Option("every", int, None, "shorthand for schedule=every:N"),
            Option("data", str, cls.data, "data to measure on", choices=("minibatch", "subset", "full")),
            Option("measure_samples", int, cls.measure_samples,
                   "samples in the fixed subset for data=subset, whatever --batch-size is", minimum=1),
            Option("batches", int, None, "instead of measure_samples: this many fixed batches of "
                   "measure_batch_size (default: the training batch size) for data=subset", minimum=1),
            Option("measure_batch_size", int, None, "batch size of subset/full measurement passes (memory per "
                   "pass; default: --micro-batch-size, else 256)", minimum=1),
        )
        own = tuple(cls.options)
        own_names = {o.name for o in own}
        return tuple(o for o in common if o.name not in own_names) + own

    @classmethod
    def kind(cls) -> str:
        return "probe"

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["schedule"] = str(self.schedule)
        attrs.update(self._data_attrs)  # what the measurement data actually was
        return attrs

    # -- engine side ---------------------------------------------------------------------

    @hookimpl
    def on_after_backward(self, ctx: RunContext, state: StepState) -> None:
        if self.at == "after_backward" and self.due(state):
            self.fire(ctx, state)

    @hookimpl
    def on_step_end(self, ctx: RunContext, state: StepState) -> None:
        if self.at == "step_end" and self.due(state):
            self.fire(ctx, state)

    def fire(self, ctx: RunContext, state: StepState) -> dict[str, Any]:
        """A scheduled measurement: :meth:`run_measure`, unless the run's ``--probe-budget``
        (``ctx.probe_budget``, :class:`lscape.limits.ProbeBudget`) says it would take the
        probes over their share of training time (then skipped, and counted); its whole time
        (measuring, recording, attributes) is charged to the budget."""
        budget = getattr(ctx, "probe_budget", None)
        if budget is None:
            return self.run_measure(ctx, state)
        if not _rank0_decides(budget.allows(self.name)):  # every rank measures, or none (collectives)
            return {}
        started = time.perf_counter()
        try:
            return self.run_measure(ctx, state)
        finally:
            budget.charge(self.name, time.perf_counter() - started)

    def due(self, state: StepState) -> bool:
        """Whether the schedule asks for a measurement at this step."""
        return self.schedule.due(state.step, epoch_end=state.epoch_end, now=state.time)

    def run_measure(self, ctx: RunContext, state: StepState) -> dict[str, Any]:
        """Measure with the model's state preserved, and record the values. A measurement
        the stopping run abandons (Ctrl-C: ``activity.Stopped``) records nothing. A scheduled
        measurement comes through :meth:`fire` (the run's ``--probe-budget``)."""
        started = time.perf_counter()
        try:
            with activity.doing(self.name), preserve_state(ctx.model):
                values = self.measure(ctx, state) or {}
        except activity.Stopped:
            return {}
        if values:
            if "compute_dtype" not in self._data_attrs:  # said once, in the group's attrs
                dtype = next((p.dtype for p in ctx.model.parameters()), None)
                self._data_attrs.update(compute_dtype=str(dtype).removeprefix("torch."),
                                        training_precision=getattr(ctx.config, "precision", "fp32"))
            self.record(ctx, state.step, **values)
        # a long probe says so once: its first measurement's time times the ones still due
        ctx.probe_timer.first(self, ctx, state.step, time.perf_counter() - started)
        return values

    # -- for subclasses ------------------------------------------------------------------

    def measure(self, ctx: RunContext, state: StepState) -> dict[str, Any]:
        """Return the values of this measurement, by output name."""
        raise NotImplementedError(f"{type(self).__name__}.measure")

    def batches(self, ctx: RunContext, state: StepState) -> list[Any]:
        """The batches this probe measures on, per its ``data`` option.

        ``minibatch``: the current training batch. ``subset``: ``batches`` batches drawn
        once from the training set with the probe's own seed (the training stream is not
        touched). ``full``: the whole training set. Under torchrun each rank gets its shard
        of these batches; the curvature toolkit all-reduces over ranks.
        """
        kind = self.opts.data
        if kind == "minibatch":
            if state.batch is None:
                raise UsageError(f"{self.name}: no current minibatch here; use -o {self.name}.data=subset or full")
            return [state.batch]
        if kind == "subset":
            if self._batches is None:
                self._batches = self.measurement_subset(ctx, purpose=self.name)
            return self._batches
        return self.measurement_full(ctx)

    def measure_batch_size(self, ctx: RunContext) -> int:
        """Samples per measurement batch: ``measure_batch_size``, else ``--micro-batch-size``,
        else 256 (with ``batches=K``: the training batch size, as K training-sized batches)."""
        if self.opts.measure_batch_size:
            return int(self.opts.measure_batch_size)
        if self.opts.batches is not None:
            return ctx.batch_size
        return int(getattr(ctx.config, "micro_batch_size", None) or 256)

    def measurement_subset(self, ctx: RunContext, dataset: Any = None, purpose: str | None = None) -> list[Any]:
        """The fixed measurement subset of ``dataset`` (default: the training set): ``measure_samples``
        samples (or ``batches`` batches) drawn once with a seed derived from the run's seed and
        ``purpose``, so it does not depend on ``--batch-size``; shared through ``ctx.cache`` by
        probes with the same purpose and sizes, and sharded under torchrun."""
        from .data import fixed_subset

        dataset = ctx.train_set if dataset is None else dataset
        split = "train" if dataset is ctx.train_set else "eval" if dataset is ctx.eval_set else str(id(dataset))
        size = self.measure_batch_size(ctx)
        samples = size * self.opts.batches if self.opts.batches is not None else int(self.opts.measure_samples)
        purpose = purpose or self.name
        key = f"subset:{purpose}:{split}:{samples}:{size}:{self.opts.batches is not None}"
        if key not in ctx.cache:
            if self.opts.batches is not None:
                batches = fixed_batches(dataset, size, self.opts.batches, derived_seed(ctx.config.seed, "subset", purpose),
                                        ctx.device, workers=ctx.workers)
            else:
                batches = fixed_subset(dataset, samples, size, derived_seed(ctx.config.seed, "subset", purpose),
                                       ctx.device, workers=ctx.workers)
            ctx.cache[key] = [shard(b, ctx.rank, ctx.world_size) for b in batches]
        batches = ctx.cache[key]
        from .batch import batch_size_of

        self._data_attrs = {"measure_samples": int(sum(batch_size_of(b) for b in batches)) * ctx.world_size,
                            "measure_batch_size": size}
        return batches

    def measurement_full(self, ctx: RunContext, dataset: Any = None) -> list[Any]:
        """The whole of ``dataset`` (default: the training set) in batches of
        ``measure_batch_size``, loaded once and kept on the device through ``ctx.cache``."""
        dataset = ctx.train_set if dataset is None else dataset
        split = "train" if dataset is ctx.train_set else "eval" if dataset is ctx.eval_set else str(id(dataset))
        size = self.measure_batch_size(ctx)
        key = f"full:{split}:{size}"
        if key not in ctx.cache:
            ctx.cache[key] = [shard(b, ctx.rank, ctx.world_size)
                              for b in full_batches(dataset, size, ctx.device, workers=ctx.workers)]
        self._data_attrs = {"measure_samples": len(dataset), "measure_batch_size": size}
        return ctx.cache[key]


def _rank0_decides(allowed: bool) -> bool:
    """Rank 0's decision on every rank under torch.distributed (the clocks differ per rank, and
    a measurement's products are collectives); the decision itself otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return allowed
    box = [bool(allowed)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class StepOwner(Plugin):
    """An optimizer variant that owns the training step (SAM, SmoothOut, Entropy-SGD).

    The engine calls ``setup(ctx)`` once (``ctx.optimizer`` is the base optimizer) and
    then ``step(closure, ctx, state)`` each step instead of its own forward/backward/
    update. ``closure()`` zeroes the gradients, runs forward and backward on a batch and
    returns the loss (a float); its first call in a step uses ``state.batch`` and fires
    ``on_after_backward``; later calls reuse the batch, or draw fresh minibatches from
    the training stream when ``fresh_batches`` is true. ``step`` returns the loss at θ.
    """

    fresh_batches: ClassVar[bool] = False

    @classmethod
    def kind(cls) -> str:
        return "step owner"

    def batches_per_step(self) -> int:
        """Minibatches one step consumes from the training stream (1 unless ``fresh_batches``):
        ``--epochs`` counts passes over the data, so a run lasts epochs·steps_per_epoch/this steps."""
        return 1

    def steps_for_epochs(self, epochs: int, steps_per_epoch: int) -> int:
        """Steps of a run of ``epochs`` passes over ``steps_per_epoch`` minibatches:
        ⌈epochs·steps_per_epoch / batches_per_step()⌉ (an owner that ends its last step of
        each epoch early says so here)."""
        return max(1, -(-epochs * steps_per_epoch // self.batches_per_step()))

    def setup(self, ctx: RunContext) -> None:
        """Build whatever the variant needs around ``ctx.optimizer``."""

    def step(self, closure, ctx: RunContext, state: StepState) -> float:
        raise NotImplementedError(f"{type(self).__name__}.step")


@contextlib.contextmanager
def preserve_state(model: nn.Module) -> Iterator[None]:
    """Restore parameters, buffers, train/eval modes, ``.grad`` and the RNG on exit.

    Restoring copies values back in place, so optimizer references stay valid and the
    result is bit-for-bit what it was.
    """
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value, grad in params:
                p.copy_(value)
                if grad is None:
                    p.grad = None
                elif p.grad is None or p.grad.shape != grad.shape:
                    p.grad = grad
                else:
                    p.grad.copy_(grad)
            for b, value in buffers:
                b.copy_(value)
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _attr(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None), list, dict)) else str(value)
