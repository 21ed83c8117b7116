"""The training engine: builds a run from its config, trains, fires the hook events.

``Engine(config).run()`` is what ``lscape run`` and ``lscape.run()`` do. Everything that
can be checked is checked in ``prepare()`` before the store is created, so bad input
writes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import platform
import signal
import sys
import time
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pluggy
import torch

from . import __version__
from .batch import batch_size_of, chunks, shard
from .build import build_adapter, build_data, build_loss, build_model, build_optimizer, require_trust, store_imports
from .config import RunConfig, parse_step_schedule
from .context import RunContext, StepState
from .data import BatchStream, close_fetchers, default_workers, derived_seed, full_batches
from .errors import DivergedError, PluginError, UsageError, UserCodeError, did_you_mean, message_line
from .manager import Registry, build_registry, get_plugin_manager, load_module, source_version
from .probe import Plugin, StepOwner
from .schedule import Schedule
from .store import RunReader, RunStore, store_exists, written_rows

__all__ = ["Engine", "RunResult", "Interrupted", "evaluate"]


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM (SIGINT raises ``KeyboardInterrupt``)."""


@dataclass
class RunResult:
    """Where the run's store is and how the run ended."""

    path: str
    status: str
    steps: int
    error: str | None = None


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
        self.step = 0
        self.epoch = 0
        self._prepared = False
        self._stop_requested = False
        self._versions: dict[str, str] = {}
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._divergence: tuple[int, float] = (0, float("nan"))
        self._nan_every = 1
        self._owns_group = False

    # -- building ------------------------------------------------------------------------

    def prepare(self) -> RunContext:
        """Validate the config and build model, data, optimizer and plugins (no store yet)."""
        cfg = self.config
        if cfg.resume:
            cfg, self._extension = _config_for_resume(cfg)
            self.config = cfg
        cfg.validate()
        # the process group is ours to destroy at the end when this engine sets it up
        self._owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
            torch.distributed.is_available() and torch.distributed.is_initialized())
        rank, world = _init_distributed(cfg.device)
        if self.pm is None:
            self.pm = get_plugin_manager()
        if cfg.resume:  # a store can come from anyone: import only what the user trusts
            require_trust(cfg.resume, store_imports(cfg, build_registry(self.pm).activatable()), self.trust_store)
        self.registry = reg = plugin_registry(self.pm, cfg.plugins)
        if cfg.out is None and not cfg.resume:
            cfg.out = _broadcast(_default_out(cfg) if rank == 0 else None)
        if not cfg.resume and store_exists(cfg.out):
            raise UsageError(f"{cfg.out} already exists; pass --resume {cfg.out} to continue it, or choose another --out")
        device = _device(cfg.device, rank, world)
        plugin_classes, modules = self._resolve_plugins(reg)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        built = _objects_for(cfg, self.objects)
        train, evaluation = build_data(built["data"], cfg.data_opts, reg.datasets, cfg.data_seed)
        model = build_model(built["model"], cfg.model_opts, reg.models, train).to(device)
        loss_fn = build_loss(built["loss"], reg.losses)
        adapter = build_adapter(built["adapter"], loss_fn)
        optimizer = build_optimizer(built["optimizer"], [p for p in model.parameters() if p.requires_grad], cfg.lr,
                                    cfg.momentum, cfg.weight_decay,
                                    {**({"nesterov": True} if cfg.nesterov else {}), **cfg.optimizer_opts},
                                    reg.optimizers)
        batch_size = None if cfg.batch_size == "full" else int(cfg.batch_size)
        workers = default_workers(device) if cfg.workers is None else cfg.workers
        stream = BatchStream(train, batch_size, derived_seed(cfg.seed, "train-stream"), device, cfg.drop_last,
                             workers=workers, pin_memory=device.type == "cuda")
        ctx = RunContext(config=cfg, model=model, loss_fn=loss_fn, train_set=train, eval_set=evaluation,
                         device=device, optimizer=optimizer, registry=reg, stream=stream,
                         steps_per_epoch=stream.steps_per_epoch, rank=rank, world_size=world, adapter=adapter)
        ctx.cache["workers"] = workers
        self._precision = Precision(cfg.precision, device)
        self._nan_every = cfg.nan_check_every or (50 if device.type == "cuda" else 1)
        self._forward = model
        if world > 1:
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
        per_step = max([p.batches_per_step() for p in self.plugins if isinstance(p, StepOwner)] or [1])
        if cfg.steps is None and cfg.total_epochs is not None and per_step > 1:
            # --epochs are passes over the data whatever the step owner draws per step
            ctx.total_steps = max(1, -(-cfg.total_epochs * stream.steps_per_epoch // per_step))
        _check_workload(ctx)
        self._versions = activate_plugins(self.pm, reg, ctx, self.plugins, modules)
        if self._precision.scaler is not None and ctx.step_owner is not None:
            raise UsageError(f"--precision fp16 (a GradScaler) does not combine with the step owner "
                             f"'{ctx.step_owner.name}'; use --precision bf16")
        self.ctx = ctx
        self._prepared = True
        if world > 1:
            torch.distributed.barrier()  # every rank checked --out before rank 0 creates it
        return ctx

    def _resolve_plugins(self, reg: Registry) -> tuple[list[tuple[str, type]], set[str]]:
        return resolve_plugins(self.pm, reg, self.config)

    # -- running -------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train until the steps, epochs or time limit are used up; always flushes the store."""
        if not self._prepared:
            self.prepare()
        ctx = self.ctx
        cfg = self.config
        assert ctx is not None and self.pm is not None
        if cfg.resume:
            store = RunStore.open(cfg.resume, lock=ctx.is_main)  # one writer: a second --resume is refused
            self._load_latest_checkpoint(store)
            if ctx.is_main:
                ctx.store = store
                ctx.store.update_attrs(status="running", resumed_at=_now(), **_extension_attrs(self))
                ctx.store.clear_attrs("error")  # an earlier failure's reason no longer applies
        elif ctx.is_main:
            ctx.store = RunStore.create(cfg.out, self._root_attrs())
        hook = self.pm.hook
        status, error = "running", None
        previous = _install_signal_handlers(self)
        # The objects alive now (torch, the model, the data) live for the whole run: keep
        # them out of the garbage collector's full passes, which otherwise cost a few
        # percent of a small model's step time. gc.unfreeze() at the end undoes it.
        gc.freeze()
        try:
            ctx.start_time = time.time() - float(ctx.cache.get("elapsed", 0.0))
            self._call(hook.on_run_start, ctx=ctx)
            status = self._loop(ctx)
            if self._stop_requested:
                status = "interrupted"
        except (KeyboardInterrupt, Interrupted):
            status = "interrupted"
        except DivergedError as e:
            status, error = "diverged", str(e)
        except Exception as e:  # a plugin or the model failed: record, then re-raise
            status, error = "failed", str(e)
            try:
                self._call(hook.on_exception, ctx=ctx, error=e)
            except Exception:
                pass
            self._finish(status, error)
            _restore_signal_handlers(previous)
            gc.unfreeze()
            raise
        self._finish(status, error)
        _restore_signal_handlers(previous)
        gc.unfreeze()
        if ctx.world_size > 1:
            # no rank leaves (and tears its process group down) while rank 0 still writes the
            # final checkpoint: a rank exiting early aborted in gloo ("terminate called ...")
            torch.distributed.barrier()
            if self._owns_group:
                torch.distributed.destroy_process_group()
        return RunResult(str(cfg.out), status, self.step, error)

    def _finish(self, status: str, error: str | None) -> None:
        ctx = self.ctx
        assert ctx is not None and self.pm is not None
        try:
            self._call(self.pm.hook.on_run_end, ctx=ctx, status=status)
        except Exception as e:  # the store must still be flushed and marked
            status, error = "failed", error or str(e)
        if ctx.stream is not None:
            ctx.stream.close()  # persistent loader workers
        close_fetchers(ctx.cache)
        if ctx.store is None:  # ranks other than 0 write nothing
            return
        if status in ("completed", "interrupted", "diverged") and not getattr(self, "_mid_step", False):
            self._final_checkpoint()  # "latest" is the model the run ended with
        mark_ended(ctx.store, status, error, self.step)
        ctx.store.close()  # releases the writer lock

    def _final_checkpoint(self) -> None:
        """A checkpoint of the state the run ended in, unless the latest one already is it."""
        root = self.ctx.store.root
        latest = root["checkpoints"].attrs.get("latest") if "checkpoints" in root.group_keys() else None
        if latest != f"step_{self.step:09d}":
            self.save_checkpoint()

    def _loop(self, ctx: RunContext) -> str:
        cfg = self.config
        hook = self.pm.hook
        stream = ctx.stream
        eval_schedule = Schedule.parse(cfg.eval_schedule)
        ckpt_schedule = Schedule.parse(cfg.checkpoint_schedule)
        owner = ctx.step_owner
        model, optimizer = ctx.model, ctx.optimizer
        last_epoch = None if self.step == 0 or stream.position == 0 else stream.epoch
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
            self._mid_step = True  # a second signal inside a step leaves no consistent state to save
            batch, epoch, epoch_end = stream.next()
            state_size = batch_size_of(batch)
            batch = shard(batch, ctx.rank, ctx.world_size)
            if epoch != last_epoch:
                self.epoch = epoch
                self._apply_regime(epoch)
                self._call(hook.on_epoch_start, ctx=ctx, epoch=epoch)
                last_epoch = epoch
            lr = self._set_lr(self.step, epoch)
            state = StepState(step=self.step, epoch=epoch, batch=batch, lr=lr, time=elapsed, epoch_end=epoch_end,
                              extras={"global_batch_size": state_size})
            self._call(hook.on_step_start, ctx=ctx, state=state)
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
                elif cfg.on_nan == "continue" or every > 1 or _finite(loss):
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
                diverged = not _finite(state.loss)
                if diverged:
                    self._divergence = (self.step, float(state.loss))
            else:
                self._pending_losses.append((self.step, state.loss))
                diverged = (self.step + 1) % every == 0 and self._diverged_since()
            if diverged:
                state.extras["diverged"] = True
            if eval_schedule.due(self.step, epoch_end=epoch_end, now=time.time() - ctx.start_time) \
                    and ctx.eval_set is not None:
                metrics = evaluate(ctx)
                state.extras.update(metrics)
                self._call(hook.on_evaluate, ctx=ctx, state=state, metrics=metrics)
            self._call(hook.on_step_end, ctx=ctx, state=state)
            self.step += 1
            if epoch_end:
                self._call(hook.on_epoch_end, ctx=ctx, epoch=epoch)
            self._mid_step = False
            if diverged and cfg.on_nan == "stop":
                at, value = self._divergence
                late = f" (noticed at step {self.step - 1}: --nan-check-every {every})" if at != self.step - 1 else ""
                raise DivergedError(f"loss became {value} at step {at}{late}; stopped (on_nan = stop)")
            if ckpt_schedule.due(self.step - 1, epoch_end=epoch_end, now=time.time() - ctx.start_time) \
                    and ctx.is_main:
                self.save_checkpoint()
            if cfg.until_loss is not None and self.step % cfg.until_loss_every == 0 and self._until_loss_reached():
                return "completed"
        return "interrupted"

    def _until_loss_reached(self) -> bool:
        """``--until-loss``: the training loss on a fixed subset (``UNTIL_LOSS_SAMPLES`` samples,
        eval mode, no gradients) after this step, recorded in group ``until-loss``; True once
        it is at or below the target (the reason goes into the root attributes)."""
        ctx, cfg = self.ctx, self.config
        from .data import fixed_subset

        if "until-loss" not in ctx.cache:
            size = int(cfg.micro_batch_size or max(ctx.batch_size, 256))
            ctx.cache["until-loss"] = fixed_subset(ctx.train_set, UNTIL_LOSS_SAMPLES, size,
                                                   derived_seed(cfg.seed, "until-loss"), ctx.device)
        modes = [(m, m.training) for m in ctx.model.modules()]
        ctx.model.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for batch in ctx.cache["until-loss"]:
                    k = batch_size_of(batch)
                    total += float(ctx.adapter.loss(ctx.model, batch)) * k
                    n += k
        finally:
            for m, training in modes:
                m.training = training
        loss = total / max(n, 1)
        if ctx.store is not None:
            ctx.store.group("until-loss").append(self.step - 1, loss=loss)
        if loss > cfg.until_loss:
            return False
        if ctx.store is not None:
            ctx.store.update_attrs(stopped_by={"until_loss": cfg.until_loss, "loss": loss, "step": self.step - 1,
                                               "samples": n})
        return True

    def _closure(self, ctx: RunContext, state: StepState):
        model, adapter, optimizer = self._forward, ctx.adapter, ctx.optimizer
        fresh = ctx.step_owner is not None and ctx.step_owner.fresh_batches
        world = ctx.world_size
        micro = self.config.micro_batch_size
        precision = self._precision
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
                sync = model.no_sync() if world > 1 and not last and hasattr(model, "no_sync") else _NULL
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
            if calls == 0:
                state.loss = value
                self._call(self.pm.hook.on_after_backward, ctx=ctx, state=state)
            calls += 1
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

    def _set_lr(self, step: int, epoch: int) -> float:
        cfg = self.config
        optimizer = self.ctx.optimizer
        kind = cfg.lr_schedule.split(":", 1)[0]
        if kind == "constant":
            return float(optimizer.param_groups[0]["lr"])
        if kind == "step":
            milestones, gamma = parse_step_schedule(cfg.lr_schedule)
            lr = cfg.lr * gamma ** sum(epoch >= m for m in milestones)
        else:  # cosine over the whole run
            total = max(1, self.ctx.total_steps or 1)
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, total) / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _apply_regime(self, epoch: int) -> None:
        # Every entry with key <= epoch applies, in order; settings are sticky.
        regime = self.config.regime
        if not regime:
            return
        for key, settings in regime.items():
            if int(key) <= epoch:
                for group in self.ctx.optimizer.param_groups:
                    for name, value in settings.items():
                        if name in group:
                            group[name] = value

    def _call(self, hook: Any, **kwargs: Any) -> Any:
        """Fire a hook; an exception from a plugin becomes ``PluginError`` naming it."""
        return call_hook(hook, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Save everything resume needs into the store, then flush every writer."""
        ctx = self.ctx
        assert ctx is not None and ctx.store is not None
        ctx.store.flush()
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "elapsed": time.time() - ctx.start_time,
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "stream": ctx.stream.state_dict(),
            "scaler": self._precision.scaler.state_dict() if self._precision.scaler is not None else None,
            "plugins": plugin_states(self.plugins),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "lscape_version": __version__,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
        group = ctx.store.root.require_group("checkpoints")
        name = f"step_{self.step:09d}"
        group.create_array(name, shape=data.shape, chunks=(min(len(data), 2**22),), dtype=np.uint8,
                           dimension_names=["byte"], attributes={"step": self.step, "epoch": self.epoch},
                           overwrite=True)[:] = data
        group.attrs.update({"latest": name})
        return name

    def _load_latest_checkpoint(self, store: RunStore) -> None:
        ctx = self.ctx
        state = load_checkpoint(store.root)
        if state is None:  # killed before its first checkpoint: redo it from step 0, as the new run did
            print(f"[lscape] {store.path} has no checkpoint yet: restarting it from step 0", file=sys.stderr)
            if ctx.is_main:
                _truncate_after(store, 0)
            return
        ctx.model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.stream.load_state_dict(state["stream"])
        if self._precision.scaler is not None and state.get("scaler"):
            self._precision.scaler.load_state_dict(state["scaler"])
        load_plugin_states(self.plugins, state["plugins"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        ctx.cache["elapsed"] = float(state["elapsed"])
        if ctx.is_main:
            _truncate_after(store, self.step)

    def _root_attrs(self) -> dict[str, Any]:
        return {**root_attrs(self.config, self.ctx.device, self._versions), "total_steps": self.ctx.total_steps}


_NULL = contextlib.nullcontext()


def _finite(value: Any) -> bool:
    """Whether a loss (float or tensor) is finite; a host sync for a device tensor."""
    return math.isfinite(float(value))


class Precision:
    """Training precision: ``fp32``, or autocast to ``bf16``/``fp16`` (fp16 with a GradScaler,
    whose state is checkpointed). Probes run outside it, in the parameters' dtype."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> Any:
        if self.dtype is None:
            return _NULL
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def evaluate(ctx: RunContext, dataset: Any = None) -> dict[str, float]:
    """Mean loss (and accuracy for class targets) on ``dataset`` (default: the eval set),
    in eval mode without gradients; the model's modes are restored."""
    dataset = ctx.eval_set if dataset is None else dataset
    model, adapter = ctx.model, ctx.adapter
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total, loss_sum, correct, classification = 0, 0.0, 0, adapter.separable
    size = ctx.config.micro_batch_size or max(ctx.batch_size, 256)
    try:
        with torch.no_grad():
            for batch in full_batches(dataset, size, ctx.device, workers=ctx.cache.get("workers", 0), cache=ctx.cache):
                loss, (out, y) = adapter.loss_and_output(model, batch)
                n = batch_size_of(batch)
                loss_sum += float(loss) * n
                total += n
                if not classification or not isinstance(y, torch.Tensor) or y.is_floating_point() \
                        or out is None or out.shape[:-1] != y.shape:
                    classification = False
                else:
                    counted = y >= 0  # ignore_index targets (-100) do not count
                    hits = ((out.argmax(-1) == y) & counted).sum()
                    correct += float(hits) / max(1, int(counted.sum())) * n
    finally:
        for m, training in modes:
            m.training = training
    metrics = {"eval_loss": loss_sum / max(total, 1)}
    if classification:
        metrics["eval_accuracy"] = correct / max(total, 1)
    return metrics


# -- pieces shared with lscape.attach (core/session.py) ----------------------------------


def plugin_registry(pm: pluggy.PluginManager, names: Any) -> Registry:
    """The registry of ``pm``, after loading every name in ``names`` that nothing registered
    as a module by import path (an unknown name that does not import is bad input)."""
    reg = build_registry(pm)
    missing = [n for n in names or () if n not in reg.activatable() and pm.get_plugin(n) is None]
    for name in missing:
        try:
            load_module(pm, name)
        except UsageError:
            known = ", ".join(sorted(reg.activatable()))
            raise UsageError(f"unknown plugin '{name}'{did_you_mean(name, reg.activatable())} "
                             f"(available: {known}; or an importable module)") from None
    return build_registry(pm) if missing else reg


def resolve_plugins(pm: pluggy.PluginManager, reg: Registry, cfg: RunConfig) -> tuple[list[tuple[str, type]], set[str]]:
    """The plugin classes a config activates (always-on ones unless disabled, then the named
    ones) and the modules named as plugins; bad names and options are bad input."""
    available = reg.activatable()
    chosen: dict[str, type] = {}
    modules: set[str] = set()
    for entry in available.values():
        if getattr(entry.obj, "always_on", False) and entry.name not in cfg.disable:
            chosen[entry.name] = entry.obj
    for name in cfg.plugins:
        if name in available:
            chosen[name] = available[name].obj
        elif pm.get_plugin(name) is not None and isinstance(pm.get_plugin(name), types.ModuleType):
            modules.add(name)
            for entry in reg.by_source(name):
                chosen[entry.name] = entry.obj
            if not reg.by_source(name) and not pm.get_hookcallers(pm.get_plugin(name)):
                raise UsageError(f"module '{name}' has no lscape hooks: it is not a plugin (see docs/plugin-guide.md)")
        else:  # prepare() loaded every importable name, so this is a module without hooks
            raise UsageError(f"plugin module '{name}' registers nothing lscape can activate")
    for name in cfg.disable:
        if name not in available:
            raise UsageError(f"cannot disable unknown plugin '{name}'{did_you_mean(name, available)}")
    for name in cfg.plugin_options:
        if name not in chosen:
            if name in available:
                raise UsageError(f"options given for plugin '{name}', which is not active; add --plugin {name}")
            raise UsageError(f"options given for unknown plugin '{name}'{did_you_mean(name, available)}")
    return list(chosen.items()), modules


def make_plugins(plugin_classes: list[tuple[str, type]], options: dict[str, dict[str, Any]],
                 ctx: RunContext) -> list[Plugin]:
    """Instantiate the plugins with their options into ``ctx.plugins``; check ``requires``."""
    plugins = []
    for name, cls in plugin_classes:
        try:
            plugin = cls(**options.get(name, {}))
        except UsageError:
            raise
        except (TypeError, ValueError) as e:
            raise UsageError(f"plugin '{name}': {e}") from e
        plugins.append(plugin)
        ctx.plugins[name] = plugin
    for plugin in plugins:
        missing = [r for r in plugin.requires if r not in ctx.plugins]
        if missing:
            raise UsageError(f"plugin '{plugin.name}' needs '{missing[0]}' too: add --plugin {missing[0]}")
    return plugins


def activate_plugins(pm: pluggy.PluginManager, reg: Registry, ctx: RunContext, plugins: list[Plugin],
                     modules: set[str]) -> dict[str, str]:
    """``Plugin.check`` each plugin, pick the one step owner, register the plugins for the run
    events (unregistering modules that were discovered, not activated) and set the step owner
    up; returns the plugins' versions."""
    for plugin in plugins:
        plugin.check(ctx)
        _check_params_option(plugin, ctx)
    owners = [p for p in plugins if isinstance(p, StepOwner)]
    if len(owners) > 1:
        names = " and ".join(f"'{p.name}'" for p in owners)
        raise UsageError(f"plugins {names} both own the training step; activate only one of them")
    ctx.step_owner = owners[0] if owners else None
    versions = {p.name: source_version(pm, reg.activatable()[p.name].source) for p in plugins}
    # Discovered is not active: only activated modules keep their run-event hooks.
    for name, plugin in list(pm.list_name_plugin()):
        if isinstance(plugin, types.ModuleType) and name not in modules:
            pm.unregister(plugin)
    for plugin in plugins:
        pm.register(plugin, name=f"plugin:{plugin.name}")
    if ctx.step_owner is not None:
        ctx.step_owner.setup(ctx)
    return versions


def call_hook(hook: Any, **kwargs: Any) -> Any:
    """Fire a hook; an exception from a plugin becomes ``PluginError`` naming it."""
    impls = getattr(hook, "get_hookimpls", None)
    if impls is not None and not impls():  # the per-step path skips events nobody listens to
        return None
    try:
        return hook(**kwargs)
    except (PluginError, DivergedError, KeyboardInterrupt, Interrupted):
        raise
    except Exception as e:
        raise PluginError(_culprit(hook, e), e) from e


def mark_ended(store: RunStore, status: str, error: str | None, steps: int) -> None:
    """Flush the store and mark how the run ended (status, end time, steps, error)."""
    store.flush()
    attrs: dict[str, Any] = {"status": status, "end_time": _now(), "steps_done": steps}
    if error:
        attrs["error"] = error
    store.update_attrs(**attrs)


def plugin_states(plugins: list[Plugin]) -> dict[str, Any]:
    """Every plugin's ``state_dict``, by name (what checkpoints keep)."""
    return {p.name: p.state_dict() for p in plugins}


def load_plugin_states(plugins: list[Plugin], states: dict[str, Any]) -> None:
    """Give each plugin its state from ``plugin_states`` (plugins not in it keep theirs)."""
    for plugin in plugins:
        if plugin.name in states:
            plugin.load_state_dict(states[plugin.name])


def root_attrs(cfg: RunConfig, device: Any, versions: dict[str, str]) -> dict[str, Any]:
    """The attributes of a new run store's root group."""
    return {
        "lscape_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "config": cfg.to_dict(),
        "plugins": versions,
        "seed": cfg.seed,
        "device": str(device),
        "status": "running",
        "start_time": _now(),
        "command": " ".join(sys.argv),
    }


def _check_params_option(plugin: Plugin, ctx: RunContext) -> None:
    """A ``params`` option (glob patterns on parameter names, shared by many plugins) that
    matches nothing is bad input before the store exists, not a failure at the first step."""
    from .params import select_parameters

    pattern = getattr(plugin.opts, "params", None)
    if isinstance(pattern, str) and pattern:
        try:
            select_parameters(ctx.model, pattern)  # as the plugins themselves call it
        except ValueError as e:
            raise UsageError(f"bad value for {plugin.name}.params: {e}") from None


def _check_workload(ctx: RunContext) -> None:
    """One forward pass and loss on a few training samples, so that a model, data and loss
    that do not fit together are bad input (exit 2, nothing written), not a failed run.
    The model's state and the RNG are restored; the training stream is not touched."""
    from torch.utils.data import IterableDataset

    from .data import take, to_device
    from .probe import preserve_state

    if isinstance(ctx.train_set, IterableDataset):  # reading it would consume a stream
        return
    # as many samples as a training batch (capped), so broadcasting mistakes show as they would
    n = min(ctx.batch_size, 16, len(ctx.train_set))
    try:
        batch = to_device(take(ctx.train_set, torch.arange(n)), ctx.device)
        with preserve_state(ctx.model), torch.no_grad():
            loss = ctx.adapter.loss(ctx.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"the loss returned {type(loss).__name__} of shape "
                                f"{tuple(getattr(loss, 'shape', ()))}, not a scalar tensor")
    except UsageError:  # the batch adapter's own one-line explanations
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        cfg = ctx.config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"model '{cfg.model}', data '{cfg.data}' and loss '{cfg.loss}' do not fit together: "
                         f"{first}") from None
    except Exception as e:  # user code failing in its own way (KeyError, OSError, ...)
        raise UserCodeError(f"model '{ctx.config.model}' or loss '{ctx.config.loss}'", e) from e


def load_checkpoint(root: Any, name: str | None = None) -> dict[str, Any] | None:
    """The checkpoint ``name`` (default: the latest) of an open zarr run group, or None."""
    if "checkpoints" not in root.group_keys():
        return None
    group = root["checkpoints"]
    name = name or group.attrs.get("latest")
    if not name or name not in group.array_keys():
        return None
    try:
        data = group[name][:]
        return torch.load(io.BytesIO(data.tobytes()), weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt chunk, a truncated write: name the checkpoint
        raise UsageError(f"checkpoint checkpoints/{name} of {getattr(root.store, 'root', root.store)} is damaged "
                         f"({type(e).__name__}: {message_line(e, 120)})") from e


def _truncate_after(store: RunStore, step: int) -> None:
    """Drop rows recorded after the checkpoint (steps >= ``step``), in every group."""
    reader_root = store.root

    def walk(group: Any, prefix: str) -> None:
        if "step" in group.array_keys():
            keep = written_rows(group["step"][:], before=step)
            store.group(prefix).truncate(keep)
        for key in group.group_keys():
            if key != "checkpoints" or prefix:
                walk(group[key], f"{prefix}/{key}" if prefix else key)

    walk(reader_root, "")


#: samples of the fixed training subset that ``--until-loss`` evaluates
UNTIL_LOSS_SAMPLES = 1024

#: what a resumed run may change: its length, and only upwards
EXTENDABLE = ("steps", "epochs", "time_limit")


def _objects_for(cfg: RunConfig, objects: dict[str, Any]) -> dict[str, Any]:
    """What to build each piece from: the object given, or the name in the config; a config
    that records an object (a resumed or measured run built from Python objects) needs it again."""
    out = {}
    for key in ("model", "data", "loss", "optimizer", "adapter"):
        name = getattr(cfg, key)
        if key in objects:
            out[key] = objects[key]
        elif isinstance(name, str) and name.startswith("<object "):
            where = cfg.resume or "this run"
            raise UsageError(f"{where} was built from Python objects: pass the same {key} again "
                             f"(lscape.run(resume=..., {key}=...)); its config records {name[:80]}")
        else:
            out[key] = name
    return out


def _config_for_resume(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """The stored config of ``cfg.resume`` with a raised ``steps``/``epochs``/``time_limit``
    from ``cfg`` applied; returns it and the change (empty when the length is unchanged)."""
    path = cfg.resume
    reader = RunReader(path)
    stored = RunConfig.stored(reader)
    stored.out = path
    stored.resume = path
    stored.progress = cfg.progress
    given = {k: getattr(cfg, k) for k in EXTENDABLE if getattr(cfg, k) is not None}
    if not given:
        return stored, {}
    old = {k: getattr(stored.validate(), k) for k in EXTENDABLE}
    new = stored.merged(given).validate()
    done = reader.attrs.get("steps_done")
    for key in ("steps", "epochs"):
        value = getattr(new, key)
        if value is None or key not in given:
            continue
        before = old[key] if key == "steps" else stored.total_epochs
        if before is not None and value < before:
            raise UsageError(f"--{key} can only be raised on resume: {path} was set to {before} {key}")
        if key == "steps" and done is not None and value < int(done):
            raise UsageError(f"--steps {value} is fewer than the {done} steps {path} has done")
    if "time_limit" in given and old["time_limit"] is None:
        raise UsageError(f"--time-limit can only be raised on resume, and {path} has none (extend it with "
                         "--steps or --epochs)")
    if "time_limit" in given and new.time_limit < old["time_limit"]:
        raise UsageError(f"--time-limit can only be raised on resume: {path} had {old['time_limit']:g}s")
    change = {k: getattr(new, k) for k in EXTENDABLE if getattr(new, k) != old[k]}
    if change:
        change["from"] = {k: old[k] for k in change}
    return new, change


def _extension_attrs(engine: "Engine") -> dict[str, Any]:
    """Root attributes of a resumed run whose length was raised: the new config, and the
    change appended to ``extensions``."""
    change = getattr(engine, "_extension", None)
    if not change:
        return {}
    store = engine.ctx.store
    record = {**change, "at_step": engine.step, "time": _now()}
    return {"config": engine.config.to_dict(), "total_steps": engine.ctx.total_steps,
            "extensions": [*store.attrs.get("extensions", []), record]}


def _device(name: str, rank: int = 0, world: int = 1) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def _init_distributed(device: str) -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun (WORLD_SIZE > 1) the process group is set up
    here: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _default_out(cfg: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", _slug(cfg.name) if cfg.name else f"{_slug(cfg.model)}-{_slug(cfg.data)}-{stamp}")
    path, i = base + ".zarr", 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}.zarr"
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.split(":")[-1])[:40]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _culprit(hook: Any, error: BaseException) -> str:
    """The plugin whose hook implementation raised, found from the traceback.

    Probe instances share their base class's hook code, so a frame matches an
    implementation only if its ``self`` is that implementation's plugin object.
    """
    impls = list(getattr(hook, "get_hookimpls", lambda: [])())
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        for impl in impls:
            fn = impl.function
            code = getattr(fn, "__func__", fn).__code__
            owner = getattr(fn, "__self__", None)
            if frame.f_code is code and (owner is None or frame.f_locals.get("self") is owner):
                return impl.plugin_name.removeprefix("plugin:")
        tb = tb.tb_next
    return getattr(hook, "name", "unknown")


def _install_signal_handlers(engine: "Engine") -> dict[int, Any]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (so the store stays
    consistent); a second signal interrupts at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        if engine._stop_requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted()
        engine._stop_requested = True

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
