"""The training engine: builds a run from its config and trains it.

``Engine(config).run()`` is what ``lscape run`` and ``lscape.run()`` do. Everything that
can be checked is checked in ``prepare()`` before the store is created, so bad input
writes nothing. The hook events are fired in their order by ``lscape.events.EventDriver``;
checkpoints are ``lscape.checkpoint``, resuming ``lscape.resume``, the step's precision, LR
schedule and ``--until-loss`` ``lscape.training``, and what ``lscape measure`` and
``lscape.attach`` share with the engine (plugin set-up, store attributes, evaluation)
``lscape.lifecycle``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pluggy
import torch

from . import __version__, activity
from .batch import batch_size_of, chunks, shard
from .build import (build_adapter, build_data, build_loss, build_model, build_optimizer, check_optimizer_params,
                    require_trust, store_imports)
from .checkpoint import (checkpoint_name, load_checkpoint, plugin_states, save_checkpoint,
                         save_sharded_checkpoint)
from .config import RunConfig
from .context import RunContext, StepState
from .data import BatchStream, close_fetchers, default_workers, derived_seed
from .errors import DivergedError, UsageError, warnings_held
from .events import EventDriver, Interrupted, call_hook
from .lifecycle import (activate_plugins, broadcast, check_workload, default_out, evaluate, gc_frozen,
                        init_distributed, make_plugins, mark_ended, plugin_registry, resolve_plugins, root_attrs,
                        run_device, stop_on_signals)
from .manager import Registry, build_registry, get_plugin_manager
from .probe import Plugin, StepOwner
from .resume import (EXTENDABLE, ResumePlan, ResumePoint, check_length, config_for_resume, extension_attrs,
                     mark_resumed, objects_for, open_planned, plan_resume, restore_state)
from .schedule import Schedule
from .sharding import check_sharded_options, check_sharded_plugins, full_model_state, init_single_group, shard_model
from .store import RunReader, RunStore, store_exists
from .training import NULL_CONTEXT, Precision, UntilLoss, apply_regime, finite, never_negative, set_lr

# ``evaluate``, ``load_checkpoint``, ``call_hook`` and ``Interrupted`` were defined here before
# lscape.lifecycle, lscape.checkpoint and lscape.events held them: the old imports still work
# (the CLI takes ``EXTENDABLE``, lscape.resume's, from here).
__all__ = ["Engine", "RunResult", "Interrupted", "evaluate", "load_checkpoint", "call_hook", "EXTENDABLE"]


@dataclass
class RunResult:
    """Where the run's store is and how the run ended."""

    path: str
    status: str
    steps: int
    error: str | None = None
    #: what the user should know of how it ended (``--until-loss`` not reached before the cap)
    note: str | None = None


class Engine:
    """One training run. ``prepare()`` validates and builds, ``run()`` trains."""

    def __init__(self, config: RunConfig, pm: pluggy.PluginManager | None = None, trust_store: bool = False,
                 objects: dict[str, Any] | None = None):
        self.config = config
        self.pm = pm
        #: Python objects given for model/data/loss/optimizer/adapter (``lscape.run(model=module)``)
        self.objects = dict(objects or {})
        #: import the module:factory names a resumed store's config holds (see require_trust)
        self.trust_store = trust_store
        self.registry: Registry | None = None
        self.ctx: RunContext | None = None
        self.plugins: list[Plugin] = []
        #: fires the hook events in order and counts steps and epochs (made by ``prepare``)
        self.events: EventDriver | None = None
        self._prepared = False
        self._stop_requested = False
        self._mid_step = False
        self._extension: dict[str, Any] = {}
        self._versions: dict[str, str] = {}
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._divergence: tuple[int, float] = (0, float("nan"))
        self._nan_every = 1
        self._owns_group = False
        self._resumed = ResumePoint()
        self._plan: ResumePlan | None = None
        self._until_loss = UntilLoss()
        self._note: str | None = None
        self._sharded = False
        #: the checkpoint this process saved (or resumed from) last
        self._saved: str | None = None

    @property
    def step(self) -> int:
        """The number of updates done."""
        return self.events.step if self.events is not None else 0

    @property
    def epoch(self) -> int:
        """The epoch of the current (or last) step."""
        return self.events.epoch if self.events is not None else 0

    # -- building ------------------------------------------------------------------------

    def prepare(self) -> RunContext:
        """Validate the config and build model, data, optimizer and plugins (no store yet).
        Warnings raised meanwhile are shown once the checks pass (a refusal is one line)."""
        with warnings_held():
            return self._prepare()

    def _prepare(self) -> RunContext:
        cfg = self.config
        if cfg.resume:
            cfg, self._extension = config_for_resume(cfg)
            self.config = cfg
        cfg.validate()
        # the process group is ours to destroy at the end when this engine sets it up
        self._owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
            torch.distributed.is_available() and torch.distributed.is_initialized())
        rank, world = init_distributed(cfg.device)
        self._sharded = cfg.strategy == "fsdp"
        try:
            return self._build(cfg, rank, world)
        except BaseException:
            if self._owns_group and torch.distributed.is_initialized():  # an in-process lscape.run() that failed
                torch.distributed.destroy_process_group()
            raise

    def _build(self, cfg: RunConfig, rank: int, world: int) -> RunContext:
        if self.pm is None:
            self.pm = get_plugin_manager()
        if cfg.resume:  # a store can come from anyone: import only what the user trusts
            require_trust(cfg.resume, store_imports(cfg, build_registry(self.pm).activatable()), self.trust_store,
                          RunReader(cfg.resume).attrs)
        self.registry = reg = plugin_registry(self.pm, cfg.plugins)
        if cfg.out is None and not cfg.resume:
            cfg.out = broadcast(default_out(cfg) if rank == 0 else None)
        if not cfg.resume and store_exists(cfg.out):
            raise UsageError(f"{cfg.out} already exists; pass --resume {cfg.out} to continue it, or choose another --out")
        device = run_device(cfg.device, rank, world)
        plugin_classes, modules = resolve_plugins(self.pm, reg, cfg)
        if self._sharded:
            check_sharded_plugins(cls for _, cls in plugin_classes)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        built = objects_for(cfg, self.objects)
        train, evaluation = build_data(built["data"], cfg.data_opts, reg.datasets, cfg.data_seed)
        model = build_model(built["model"], cfg.model_opts, reg.models, train).to(device)
        if self._sharded:  # before the optimizer: it holds the sharded (DTensor) parameters
            if world == 1 and not torch.distributed.is_initialized():  # FSDP2 needs a process group
                init_single_group(cfg.device)
                self._owns_group = True
            shard_model(model, cfg.precision)
        loss_fn = build_loss(built["loss"], reg.losses)
        if cfg.until_loss is not None and cfg.until_loss < 0 and never_negative(loss_fn):
            raise UsageError(f"--until-loss {cfg.until_loss:g} can never be reached: the loss '{cfg.loss}' is never "
                             "negative (give a target >= 0)")
        adapter = build_adapter(built["adapter"], loss_fn)
        optimizer = build_optimizer(built["optimizer"], [p for p in model.parameters() if p.requires_grad], cfg.lr,
                                    cfg.momentum, cfg.weight_decay,
                                    {**({"nesterov": True} if cfg.nesterov else {}), **cfg.optimizer_opts},
                                    reg.optimizers)
        if isinstance(built["optimizer"], torch.optim.Optimizer):
            check_optimizer_params(optimizer, model)
        batch_size = None if cfg.batch_size == "full" else int(cfg.batch_size)
        workers = default_workers(device) if cfg.workers is None else cfg.workers
        stream = BatchStream(train, batch_size, derived_seed(cfg.seed, "train-stream"), device, cfg.drop_last,
                             workers=workers, pin_memory=device.type == "cuda")
        ctx = RunContext(config=cfg, model=model, loss_fn=loss_fn, train_set=train, eval_set=evaluation,
                         device=device, optimizer=optimizer, registry=reg, stream=stream,
                         steps_per_epoch=stream.steps_per_epoch, rank=rank, world_size=world, adapter=adapter,
                         workers=workers)
        if cfg.probe_budget is not None:
            from .limits import ProbeBudget

            ctx.probe_budget = ProbeBudget(cfg.probe_budget)
        self._precision = Precision(cfg.precision, device, sharded=self._sharded)
        self._nan_every = cfg.nan_check_every or (50 if device.type == "cuda" else 1)
        self._forward = model
        if world > 1 and not self._sharded:  # a sharded model reduces its own gradients
            from torch.nn.parallel import DistributedDataParallel

            # DDP averages gradients in every backward pass (each closure call of a step
            # owner reduces once); probes use the bare module and the toolkit's reduction.
            self._forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            # only the training forward is compiled; probes run the plain module
            backend = "inductor" if cfg.compile is True else str(cfg.compile)
            self._forward = torch.compile(self._forward, backend=backend)
        if stream.steps_per_epoch is None and cfg.steps is None and cfg.time_limit is None:
            raise UsageError("the training data is an IterableDataset (no length): give --steps or --time-limit")
        ctx.total_steps = cfg.steps if cfg.steps is not None else (
            cfg.total_epochs * stream.steps_per_epoch if cfg.total_epochs is not None else None)
        if cfg.lr_schedule.startswith("cosine") and ctx.total_steps is None:
            raise UsageError("--lr-schedule cosine needs --steps or --epochs to know its length")
        self.plugins = make_plugins(plugin_classes, cfg.plugin_options, ctx)
        if self._sharded:
            check_sharded_options(self.plugins)
        owners = sorted((p for p in self.plugins if isinstance(p, StepOwner)), key=lambda p: -p.batches_per_step())
        if cfg.steps is None and cfg.total_epochs is not None and owners and owners[0].batches_per_step() > 1:
            # --epochs are passes over the data whatever the step owner draws per step
            ctx.total_steps = owners[0].steps_for_epochs(cfg.total_epochs, stream.steps_per_epoch)
        check_workload(ctx)
        self._versions = activate_plugins(self.pm, reg, ctx, self.plugins, modules)
        if self._precision.scaler is not None and ctx.step_owner is not None:
            raise UsageError(f"--precision fp16 (a GradScaler) does not combine with the step owner "
                             f"'{ctx.step_owner.name}'; use --precision bf16")
        if cfg.resume:  # read only: every refusal comes before the store is touched
            check_length(cfg, ctx.total_steps, self._extension)
            self._plan = plan_resume(cfg.resume)
            self._resumed = restore_state(self._plan, ctx, self.plugins, self._precision.scaler)
            self._plan.state = None  # loaded: not a second copy of the model and optimizer for the whole run
        self.ctx = ctx
        self.events = EventDriver(self.pm, ctx, on_new_epoch=lambda epoch: apply_regime(cfg.regime, optimizer, epoch))
        self._prepared = True
        if world > 1:
            torch.distributed.barrier()  # every rank checked --out before rank 0 creates it
        return ctx

    def request_stop(self) -> bool:
        """Stop after the current step (what the first SIGINT/SIGTERM does, with the probe in
        progress abandoned: ``lifecycle.stop_on_signals``); returns whether a stop was asked
        for already."""
        asked, self._stop_requested = self._stop_requested, True
        return asked

    def root_attrs(self) -> dict[str, Any]:
        """The root attributes of this run's new store (``lscape measure`` adds its own)."""
        return {**root_attrs(self.config, self.ctx.device, self._versions), "total_steps": self.ctx.total_steps}

    # -- running -------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until the steps, epochs or time limit are used up; always flushes the store."""
        if not self._prepared:
            self.prepare()
        ctx, cfg, events = self.ctx, self.config, self.events
        assert ctx is not None and events is not None
        if cfg.resume:
            # one writer: a second --resume is refused; the rows after the checkpoint go (rank 0)
            store = open_planned(self._plan, lock=ctx.is_main) if ctx.is_main else RunStore.open(cfg.resume, lock=False)
            point = self._resumed
            self._saved = self._plan.name
            # the epoch goes on unless the checkpoint was taken at an epoch's end
            events.restore(point.step, point.epoch, epoch_open=point.step != 0 and ctx.stream.position != 0)
            if ctx.is_main:
                ctx.store = store
                mark_resumed(store, **extension_attrs(self._extension, cfg, store, self.step, ctx.total_steps))
        elif ctx.is_main:
            ctx.store = RunStore.create(cfg.out, self.root_attrs())
        status, error = "running", None
        # SIGINT/SIGTERM stop the loop after the step; the objects alive now (torch, the
        # model, the data) live for the whole run: out of the garbage collector's full passes
        with stop_on_signals(self.request_stop), gc_frozen():
            try:
                ctx.start_time = time.time() - self._resumed.elapsed
                events.run_start()
                status = self._loop(ctx)
                if self._stop_requested:
                    status = "interrupted"
                elif cfg.until_loss is not None and not self._until_loss.hit and self.step > 0:
                    self._note = self._until_loss.capped(ctx, self.step - 1, self._cap())
            except (KeyboardInterrupt, Interrupted, activity.Stopped):
                status = "interrupted"
            except DivergedError as e:
                status, error = "diverged", str(e)
            except Exception as e:  # a plugin or the model failed: record, then re-raise
                status, error = "failed", str(e)
                events.exception(e)
                self._finish(status, error)
                raise
            self._finish(status, error)
        if self._note and ctx.is_main:
            print(f"[lscape] {self._note}", file=sys.stderr)
        if ctx.world_size > 1:
            # no rank leaves (and tears its process group down) while rank 0 still writes the
            # final checkpoint: a rank exiting early aborted in gloo ("terminate called ...")
            torch.distributed.barrier()
            if self._owns_group:
                torch.distributed.destroy_process_group()
        return RunResult(str(cfg.out), status, self.step, error, self._note)

    def _cap(self) -> str:
        """What ends this run when its ``--until-loss`` target does not, in the user's words."""
        cfg, ctx = self.config, self.ctx
        if cfg.steps is not None:
            return f"--steps {cfg.steps}"
        if cfg.time_limit is not None and (ctx.total_steps is None or self.step < ctx.total_steps):
            return f"--time-limit {cfg.time_limit:g}s"
        if cfg.epochs is not None:
            return f"--epochs {cfg.epochs}"
        return f"{cfg.UNTIL_LOSS_EPOCHS} epochs (the default cap)"

    def _finish(self, status: str, error: str | None) -> None:
        ctx = self.ctx
        assert ctx is not None and self.events is not None
        try:
            self.events.run_end(status)
        except activity.Stopped:  # a plugin's work at the end, abandoned by the stop
            pass
        except Exception as e:  # the store must still be flushed and marked
            status, error = "failed", error or str(e)
        if ctx.stream is not None:
            ctx.stream.close()  # persistent loader workers
        close_fetchers(ctx.fetchers)
        if ctx.store is None and not self._sharded:  # ranks other than 0 write nothing
            return
        if status in ("completed", "interrupted", "diverged") and not self._mid_step:
            # "latest" is the model the run ended with, unless the latest checkpoint already is it
            # (under fsdp every rank writes its shards, so every rank knows)
            if self._saved != checkpoint_name(self.step):
                self.save_checkpoint()
        if ctx.store is None:
            return
        if ctx.probe_budget is not None:
            record_budget(ctx)
        mark_ended(ctx.store, status, error, self.step)
        ctx.store.close()  # releases the writer lock

    def _loop(self, ctx: RunContext) -> str:
        cfg, events = self.config, self.events
        stream = ctx.stream
        eval_schedule = Schedule.parse(cfg.eval_schedule)
        ckpt_schedule = Schedule.parse(cfg.checkpoint_schedule)
        owner = ctx.step_owner
        model, optimizer = ctx.model, ctx.optimizer
        while not self._stop_requested:
            if ctx.world_size > 1:  # every rank stops at the same step, or the others would hang
                flag = torch.tensor([1.0 if self._stop_requested else 0.0])
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item() > 0:
                    self._stop_requested = True
                    break
            if ctx.total_steps is not None and self.step >= ctx.total_steps:
                return "completed"
            elapsed = time.time() - ctx.start_time
            if cfg.time_limit is not None and elapsed >= cfg.time_limit:
                return "completed"
            self._mid_step = True  # an abandoned step (a third signal) leaves no consistent state to save
            budget = ctx.probe_budget
            if budget is not None:
                step_started = time.perf_counter()
                budget.begin_step()
            batch, epoch, epoch_end = stream.next()
            state_size = batch_size_of(batch)
            batch = shard(batch, ctx.rank, ctx.world_size)
            step = self.step
            state = events.begin_step(lambda e: StepState(
                step=step, epoch=e, batch=batch, lr=set_lr(cfg, optimizer, step, e, ctx.total_steps), time=elapsed, epoch_end=epoch_end,
                extras={"global_batch_size": state_size}), epoch=epoch)
            if not model.training:  # submodules a user froze in eval mode stay so
                model.train()
            closure = self._closure(ctx, state)
            every = self._nan_every
            if owner is None:
                loss = closure()
                scaler = self._precision.scaler
                if scaler is not None:
                    scaler.step(optimizer)  # skips non-finite steps itself
                    scaler.update()
                elif cfg.on_nan == "continue" or every > 1 or finite(loss):
                    optimizer.step()
            else:
                loss = owner.step(closure, ctx, state)
                state.loss = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
                if not epoch_end and stream.epoch > epoch:
                    # a step owner drawing fresh batches (Entropy-SGD) crossed an epoch boundary
                    # inside its step: this step ends that epoch for evaluation and checkpoints
                    epoch_end = state.epoch_end = True
            # NaN/inf checks cost a host sync: every step on CPU, every `every` steps on CUDA
            # (the window's losses are kept on the device and the first bad one is named)
            if every == 1:
                diverged = not finite(state.loss)
                if diverged:
                    self._divergence = (step, float(state.loss))
            else:
                self._pending_losses.append((step, state.loss))
                diverged = (step + 1) % every == 0 and self._diverged_since()
            if diverged:
                state.extras["diverged"] = True
            if eval_schedule.due(step, epoch_end=epoch_end, now=time.time() - ctx.start_time) \
                    and ctx.eval_set is not None and not self._stop_requested:  # a stopping run skips it
                events.evaluate(evaluate(ctx))
            events.end_step()
            if budget is not None:
                budget.add_step(time.perf_counter() - step_started)
            self._mid_step = False
            if diverged and cfg.on_nan == "stop":
                at, value = self._divergence
                late = f" (noticed at step {step}: --nan-check-every {every})" if at != step else ""
                raise DivergedError(f"loss became {value} at step {at}{late}; stopped (on_nan = stop)")
            if ckpt_schedule.due(step, epoch_end=epoch_end, now=time.time() - ctx.start_time) and (
                    ctx.is_main or self._sharded):
                self.save_checkpoint()
            if cfg.until_loss is not None and self.step % cfg.until_loss_every == 0 and not self._stop_requested and \
                    self._until_loss.reached(ctx, self.step - 1):
                return "completed"
        return "interrupted"

    def _closure(self, ctx: RunContext, state: StepState) -> Callable[[], torch.Tensor]:
        model, adapter, optimizer = self._forward, ctx.adapter, ctx.optimizer
        fresh = ctx.step_owner is not None and ctx.step_owner.fresh_batches
        world = ctx.world_size
        micro = self.config.micro_batch_size
        precision = self._precision
        events = self.events
        sharded = ctx.model if self._sharded else None
        calls = 0

        def closure() -> torch.Tensor:
            """Zero the gradients, forward and backward over the batch (in micro-batches),
            return the batch-mean loss as a detached 0-d tensor on the device (no host sync)."""
            nonlocal calls
            if calls == 0 or not fresh:
                batch, n_global = state.batch, state.extras["global_batch_size"]
            else:
                batch, _, _ = ctx.stream.next()
                n_global = batch_size_of(batch)
                batch = shard(batch, ctx.rank, world)
            optimizer.zero_grad(set_to_none=True)
            n_local = batch_size_of(batch)
            # Under DDP each rank's mean is weighted by its share of the global batch, so the
            # ranks' averaged gradient is the global batch's gradient.
            scale = n_local * world / n_global if world > 1 else 1.0
            pieces = chunks(batch, micro)
            total = None
            for i, piece in enumerate(pieces):
                weight = batch_size_of(piece) / n_local if len(pieces) > 1 else 1.0
                last = i == len(pieces) - 1
                # one all-reduce per step under DDP, after the last chunk
                sync = model.no_sync() if world > 1 and not last and hasattr(model, "no_sync") else NULL_CONTEXT
                if sharded is not None and len(pieces) > 1:  # FSDP2: reduce-scatter after the last chunk only
                    sharded.set_requires_gradient_sync(last)
                with sync:
                    with precision.autocast():
                        loss = adapter.loss(model, piece)
                    precision.backward(loss if weight * scale == 1.0 else loss * (weight * scale))
                part = loss.detach().float() * weight if len(pieces) > 1 else loss.detach()
                total = part if total is None else total + part
            if world > 1:
                total = (total.float() * n_local).reshape(1)
                torch.distributed.all_reduce(total)
                total = total[0] / n_global
            value = total.reshape(())
            calls += 1
            events.after_backward(value)  # the step's first backward pass only
            return value

        return closure

    def _diverged_since(self) -> bool:
        """Whether a loss since the last check was non-finite (one host sync for the window);
        remembers the first such step and value in ``_divergence``."""
        pending, self._pending_losses = self._pending_losses, []
        if not pending:
            return False
        values = torch.stack([v.reshape(()).float() for _, v in pending]).cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel() == 0:
            return False
        first = int(bad[0, 0])
        self._divergence = (pending[first][0], float(values[first]))
        return True

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Save everything resume needs into the store (``lscape.checkpoint``). Under
        ``--strategy fsdp`` every rank calls it (model and optimizer shards go through
        Distributed Checkpoint); otherwise rank 0 alone."""
        ctx = self.ctx
        assert ctx is not None and (ctx.store is not None or self._sharded)
        self._saved = checkpoint_name(self.step)
        sharded = None
        if self._sharded:
            model_state = full_model_state(ctx.model)  # gathered on rank 0, for measure/landscape
            sharded = save_sharded_checkpoint(ctx.store, str(self.config.out), self.step, ctx.model, ctx.optimizer,
                                              ctx.world_size)
            if ctx.store is None:
                return self._saved
        scaler = self._precision.scaler
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "elapsed": time.time() - ctx.start_time,
            "model": model_state if sharded else ctx.model.state_dict(),
            "optimizer": None if sharded else ctx.optimizer.state_dict(),
            "sharded": sharded,
            "stream": ctx.stream.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "plugins": plugin_states(self.plugins),
            "probe_budget": ctx.probe_budget.state_dict() if ctx.probe_budget is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "lscape_version": __version__,
        }
        if ctx.probe_budget is not None and ctx.store is not None:
            record_budget(ctx)  # the overhead so far, also in a run killed later
        return save_checkpoint(ctx.store, state, self.step, self.epoch)


def record_budget(ctx: RunContext) -> None:
    """The realised probe overhead under ``--probe-budget`` into the store's root attributes
    (``probe_overhead``, ``probe_seconds``, ``train_seconds``, ``probe_fired``,
    ``probe_skipped``) and each probe's skipped firings into its group's attrs
    (``budget_skipped``)."""
    budget = ctx.probe_budget
    ctx.store.update_attrs(**budget.attrs())
    for plugin in ctx.plugins.values():
        writer = getattr(plugin, "_writers", {}).get((id(ctx.store), None))  # its own group, if it wrote one
        if writer is not None and plugin.name in budget.fired:
            writer.group.attrs["budget_skipped"] = int(budget.skipped.get(plugin.name, 0))
