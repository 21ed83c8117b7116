"""lscape in the user's own training loop: ``lscape.attach(...)`` returns a :class:`Session`.

A session fires the same hook events as the engine (``core/engine.py``), in the same order
and with the same ``RunContext``/``StepState`` payloads, so every built-in and third-party
probe works unchanged in a loop lscape does not own::

    with lscape.attach(model, optimizer, loss_fn, train_data=loader, plugins=["sharpness"],
                       out="runs/a.zarr") as session:
        for x, y in loader:
            loss = loss_fn(model(x), y); optimizer.zero_grad(); loss.backward()
            session.step((x, y), loss)     # probes at θ_t, optimizer.step(), step-end probes

Per step the events are ``on_epoch_start`` (first step of an epoch), ``on_step_start``,
``on_after_backward`` (θ_t, ``.grad`` = ∇L_B), the update, ``on_evaluate`` (if the loop
evaluated inside the step), ``on_step_end`` (θ_{t+1}) and ``on_epoch_end``. Everything that
can be checked (plugin names and options, ``Plugin.check``, a probe that needs training data
when none was given, an existing store) is checked in ``attach`` before the store exists.
The events are fired in order by ``lscape.events.EventDriver``, as the engine's are; the
plugin resolution, registration and store attributes are ``lscape.lifecycle``'s, the plugin
states ``lscape.checkpoint``'s, shared with the engine.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Iterable, Mapping

import pluggy
import torch
from torch import nn

from . import __version__
from .batch import BatchAdapter, batch_size_of
from .checkpoint import load_plugin_states, plugin_states, truncate_after
from .config import RunConfig, run_options
from .context import RunContext, StepState
from .data import close_fetchers
from .errors import DivergedError, UsageError
from .events import EventDriver
from .lifecycle import evaluate, mark_ended, root_attrs
from .manager import get_plugin_manager
from .options import PYTHON
from .probe import Plugin
from .resume import mark_resumed
from .store import GroupWriter, RunStore, store_exists

__all__ = ["attach", "Session"]

#: the run options whose attach keywords share their names, defaults and checks
_RUN = run_options()


def attach(model: nn.Module, optimizer: Any = None, loss_fn: Callable | str | None = None, train_data: Any = None,
           eval_data: Any = None, plugins: Iterable[str] = (), plugin_options: Mapping[str, Mapping[str, Any]] | None = None,
           out: str | None = _RUN["out"].default, seed: int = _RUN["seed"].default,
           progress: bool = _RUN["progress"].default, *, disable: Iterable[str] = (),
           adapter: Callable | None = None, batch_size: int | str | None = None, total_steps: int | None = None,
           steps_per_epoch: int | None = None, resume: bool = False,
           pm: pluggy.PluginManager | None = None) -> "Session":
    """Attach lscape's plugins to a training loop the user writes; returns a :class:`Session`.

    ``model`` is the ``nn.Module`` being trained; ``optimizer`` the ``torch.optim`` optimizer
    that ``session.step`` steps (or None when the loop steps itself and calls
    ``after_backward``/``step_end``); ``loss_fn(output, target)`` the batch-mean loss, a
    name (``ce``, ``mse``), or None for the model's own loss (``output.loss``, HuggingFace);
    ``adapter(model, batch) -> (output, target)`` for other batches (see ``lscape.batch``).
    ``train_data`` (a Dataset, or a DataLoader over a map-style Dataset) is where probes take
    data beyond the current batch (fixed subsets, full passes, fresh noise batches); a probe
    that needs it when none is given is a ``UsageError`` here, before anything is written.
    ``eval_data`` is what ``session.evaluate()`` evaluates on. ``seed`` seeds the probes'
    own samplers (the training RNG is never touched). ``batch_size`` defaults to the
    DataLoader's (``"full"`` for full-batch GD); ``total_steps`` and ``steps_per_epoch``
    (the DataLoader's length by default) let epoch-end schedules and the progress bar
    know the run's shape. ``resume=True`` continues the store at ``out``: call
    ``session.load_state_dict`` with what ``state_dict`` returned before the first step.
    """
    from .build import build_loss
    from .lifecycle import activate_plugins, make_plugins, plugin_registry, resolve_plugins
    from .lifecycle import broadcast as _broadcast, default_out as _default_out

    if not isinstance(model, nn.Module):
        raise UsageError(f"attach needs the nn.Module being trained, got {type(model).__name__}")
    plugins = [plugins] if isinstance(plugins, str) else list(plugins)
    from .build import data_objects as _data_objects

    loader = train_data if isinstance(train_data, torch.utils.data.DataLoader) else None
    # a DataLoader gives its data set, with its collate function when it has its own (padding)
    train_set = _data_objects(train_data) if train_data is not None else None
    eval_data = _data_objects(eval_data) if eval_data is not None else None
    if batch_size is None:
        batch_size = (loader.batch_size if loader is not None and loader.batch_size else None)
    if steps_per_epoch is None:
        if batch_size == "full":
            steps_per_epoch = 1
        elif loader is not None:
            try:
                steps_per_epoch = len(loader)
            except TypeError:  # an iterable-style loader has no length
                steps_per_epoch = None
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None and getattr(optimizer, "param_groups", None) \
        else 0.0
    momentum = float(optimizer.param_groups[0].get("momentum", 0.0) or 0.0) if lr else 0.0
    cfg = _config(model, optimizer, loss_fn, adapter, train_data, lr, momentum, batch_size, plugins, plugin_options,
                  disable, out, seed, progress, total_steps)
    pm = pm or get_plugin_manager()
    reg = plugin_registry(pm, cfg.plugins)
    plugin_classes, modules = resolve_plugins(pm, reg, cfg)
    if isinstance(loss_fn, str):
        loss_fn = build_loss(loss_fn, reg.losses) if loss_fn != "model" else None
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise UsageError("attach: the model has no parameters to measure") from None
    ctx = RunContext(config=cfg, model=model, loss_fn=loss_fn, train_set=train_set if train_set is not None else
                     _NoTrainData(), eval_set=eval_data, device=device, optimizer=optimizer, registry=reg,
                     stream=None, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                     adapter=BatchAdapter(loss_fn, adapter), rank=rank, world_size=world)
    cfg.device = str(device)
    made = make_plugins(plugin_classes, cfg.plugin_options, ctx)
    for plugin in made:
        if train_set is None and needs_train_data(plugin):
            raise UsageError(f"plugin '{plugin.name}' measures on training data beyond the current batch: "
                             f"pass train_data= (a Dataset or DataLoader) to attach")
        if train_set is not None and needs_train_data(plugin) and not _indexable(train_set):
            raise UsageError(f"plugin '{plugin.name}' samples the training data: train_data must be a map-style "
                             f"Dataset (or a DataLoader over one), not {type(train_set).__name__}")
        if cfg.batch_size == 0 and needs_train_data(plugin):
            raise UsageError(f"plugin '{plugin.name}' needs the training batch size: pass batch_size= to attach "
                             f"(or train_data as a DataLoader)")
    owner_needs_optimizer = [p.name for p in made if p.kind() == "step owner"]
    if owner_needs_optimizer and optimizer is None:
        raise UsageError(f"plugin '{owner_needs_optimizer[0]}' owns the step around an optimizer: pass optimizer=")
    if resume:
        if out is None or not store_exists(out):
            raise UsageError(f"resume=True continues a store, but {out} does not exist")
    else:
        if cfg.out is None:
            cfg.out = _broadcast(_default_out(cfg) if rank == 0 else None)
        if store_exists(cfg.out):
            raise UsageError(f"{cfg.out} already exists; pass resume=True to continue it, or choose another out")
    versions = activate_plugins(pm, reg, ctx, made, modules)
    if world > 1:
        dist.barrier()  # every rank checked `out` before rank 0 creates it
    return Session(ctx, pm, made, versions, resume=resume)


def needs_train_data(plugin: Plugin) -> bool:
    """Whether a plugin measures on training data beyond the step's batch: a probe with
    ``data=subset``/``full``, or a plugin class with ``needs_train_data = True``."""
    if getattr(plugin, "needs_train_data", False):
        return True
    opts = getattr(plugin, "opts", None)
    return getattr(opts, "data", "minibatch") in ("subset", "full")


class Session:
    """The hook events of one run, fired by the user's loop (see :func:`attach`).

    ``step(batch, loss)`` where the loop would call ``optimizer.step()`` (after
    ``loss.backward()``); ``step(batch, closure=fn)`` for closure optimizers and step-owner
    plugins (SAM, SmoothOut, Entropy-SGD): ``fn`` zeroes the gradients, runs forward and
    backward and returns the loss, and its first call fires ``on_after_backward``. A loop
    that steps itself calls ``after_backward(batch, loss)``, its own update, then
    ``step_end()``. ``epoch_end()``, ``evaluate(metrics)``, ``close(status)``; as a context
    manager an exception marks the store ``failed`` (naming the error), Ctrl-C
    ``interrupted``. ``state_dict``/``load_state_dict`` go into the user's checkpoints.
    The order of the events is ``lscape.events.EventDriver``'s (``session.events``).
    """

    def __init__(self, ctx: RunContext, pm: pluggy.PluginManager, plugins: list[Plugin], versions: dict[str, str],
                 resume: bool = False):
        self.ctx, self.pm, self.plugins = ctx, pm, plugins
        self.events = EventDriver(pm, ctx)
        self._closed = False
        self._frozen = False
        self._eval: GroupWriter | None = None
        if not ctx.is_main:  # under torchrun every rank measures, rank 0 writes
            ctx.store = None
        elif resume:
            ctx.store = RunStore.open(ctx.config.out)
        else:
            attrs = root_attrs(ctx.config, ctx.device, versions)
            attrs["kind"] = "attach"  # built from the user's objects, trained by the user's loop
            ctx.store = RunStore.create(ctx.config.out, attrs)
        self.path = str(ctx.config.out)
        ctx.start_time = time.time()
        # As in the engine: what is alive now (torch, the model, the data) lives for the whole
        # run, so it is kept out of the garbage collector's full passes until close()
        gc.freeze()
        self._frozen = True
        self.events.run_start()

    @property
    def step_count(self) -> int:
        """Updates done (``StepState.step`` of the next step)."""
        return self.events.step

    @property
    def epoch(self) -> int:
        """The epoch of the next step."""
        return self.events.next_epoch

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between ``after_backward`` and ``step_end``)."""
        return self.events.state is not None

    # -- the step ------------------------------------------------------------------------

    def step(self, batch: Any, loss: Any = None, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:
        """One training step: probes at θ_t, the update, then the step-end events.

        Without ``closure``: call it after ``loss.backward()``; it steps ``optimizer``.
        With ``closure``: do not call backward first; the active step owner (``plugins=
        ["sam"]``) or the optimizer (``lscape.optim.SAM``, L-BFGS) steps with it. Returns
        the minibatch loss at θ_t (a detached 0-d tensor).
        """
        ctx = self.ctx
        owner = ctx.step_owner
        if closure is None:
            if owner is not None:
                raise UsageError(f"plugin '{owner.name}' owns the step: pass closure= (zero_grad, forward, backward, "
                                 f"return the loss) to session.step")
            if ctx.optimizer is None:
                raise UsageError("session.step steps the optimizer, but attach got none: pass optimizer=, or call "
                                 "session.after_backward(batch, loss) and session.step_end() around your own step")
            state = self.after_backward(batch, loss)
            ctx.optimizer.step()
        else:
            if owner is None and ctx.optimizer is None:
                raise UsageError("session.step(closure=...) steps the optimizer, but attach got none")
            state = self._begin(batch)

            def wrapped():
                value = closure()
                self.events.after_backward(_loss(value))  # the first call's only
                return value

            if owner is not None:
                state.loss = _loss(owner.step(wrapped, ctx, state))
            else:
                ctx.optimizer.step(wrapped)  # the loss at θ_t is the first call's
        loss_value = state.loss
        self.step_end()
        return loss_value

    def after_backward(self, batch: Any, loss: Any = None) -> StepState:
        """``on_step_start`` and ``on_after_backward`` at θ_t, after the loop's backward pass
        (for loops that step themselves; then call :meth:`step_end`)."""
        state = self._begin(batch)
        self.events.after_backward(_loss(loss))
        return state

    def step_end(self) -> None:
        """``on_step_end`` (θ_{t+1}) and, at an epoch's last step, ``on_epoch_end``."""
        self.events.end_step()

    def epoch_end(self) -> None:
        """The end of the loop's epoch: ``on_epoch_end`` (unless the last step already ended
        it, with a known ``steps_per_epoch``); the next step starts a new epoch."""
        if self.in_step:
            raise UsageError("session.epoch_end() inside a step: call session.step_end() first")
        self.events.end_epoch()

    def evaluate(self, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        """The loop's own evaluation numbers (or, with none, lscape's ``evaluate`` on
        ``eval_data``): ``on_evaluate``. Inside a step (between ``after_backward`` and
        ``step_end``) they join that step's row of ``train`` as in the engine; after a step
        they are recorded in the group ``eval`` at that step."""
        ctx = self.ctx
        if metrics is None:
            if ctx.eval_set is None:
                raise UsageError("session.evaluate() without metrics evaluates on eval_data: pass eval_data= to "
                                 "attach, or give the loop's own metrics")
            metrics = evaluate(ctx)
        metrics = {k: float(v) for k, v in dict(metrics).items()}
        inside = self.in_step
        state = self.events.evaluate(metrics)
        if not inside and ctx.store is not None:
            if self._eval is None:
                self._eval = ctx.store.group("eval", attrs={"source": "session.evaluate"})
            self._eval.append(state.step, **metrics)
        return metrics

    # -- end of the run ------------------------------------------------------------------

    def close(self, status: str = "completed", error: str | None = None) -> None:
        """``on_run_end``, then flush the store and mark its status (idempotent)."""
        if self._closed:
            return
        self._closed = True
        ctx = self.ctx
        try:
            self.events.run_end(status)
        except Exception as e:  # the store must still be flushed and marked
            status, error = "failed", error or str(e)
        try:
            close_fetchers(ctx.fetchers)  # loader workers kept for full passes
            if ctx.store is not None:
                mark_ended(ctx.store, status, error, self.step_count)
                ctx.store.close()  # releases the writer lock now, not at garbage collection
        finally:
            if self._frozen:
                gc.unfreeze()
                self._frozen = False

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            self.close("completed")
        elif isinstance(error, KeyboardInterrupt):
            self.close("interrupted")
        elif isinstance(error, DivergedError):
            self.close("diverged", str(error))
        elif isinstance(error, Exception):
            self.events.exception(error)
            self.close("failed", f"{type(error).__name__}: {error}")
        else:
            self.close("interrupted")
        return False

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the session needs to continue exactly: counters and every plugin's state
        (warm starts, θ_0, noise samplers); put it in the loop's own checkpoint. The store is
        flushed, so what it holds is consistent with this state."""
        if self.ctx.store is not None:
            self.ctx.store.flush()
        events = self.events
        return {"step": events.step, "epoch": events.next_epoch, "position": events.position,
                "epoch_open": events.epoch_open, "elapsed": time.time() - self.ctx.start_time,
                "plugins": plugin_states(self.plugins), "lscape_version": __version__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``: counters and plugin states; with ``resume=True``
        the store's rows after that step are dropped (they are recorded again)."""
        events = self.events
        if events.state is not None or events.last is not None:
            raise UsageError("session.load_state_dict() must come before the first step")
        events.restore(int(state["step"]), int(state["epoch"]), bool(state.get("epoch_open", False)),
                       int(state.get("position", 0)))
        self.ctx.start_time = time.time() - float(state.get("elapsed", 0.0))
        load_plugin_states(self.plugins, dict(state.get("plugins", {})))
        store = self.ctx.store
        if store is not None:
            truncate_after(store, events.step)
            mark_resumed(store)

    # -- internals -----------------------------------------------------------------------

    def _begin(self, batch: Any) -> StepState:
        if self._closed:
            raise UsageError("the session is closed")
        ctx = self.ctx
        if not self.in_step and ctx.config.batch_size == 0:  # not known at attach: the first batch tells
            ctx.config.batch_size = batch_size_of(batch)
            if ctx.store is not None:
                ctx.store.update_attrs(config=ctx.config.to_dict())
        events = self.events
        spe = ctx.steps_per_epoch
        return events.begin_step(lambda epoch: StepState(
            step=events.step, epoch=epoch, batch=batch,
            lr=float(ctx.optimizer.param_groups[0]["lr"]) if _has_lr(ctx.optimizer) else None,
            time=time.time() - ctx.start_time, epoch_end=spe is not None and events.position + 1 >= spe,
            extras={"global_batch_size": batch_size_of(batch)}))


class _NoTrainData:
    """The training set of a session attached without ``train_data``: using it is bad input."""

    def _refuse(self, *args: Any) -> Any:
        raise UsageError("this plugin measures on training data beyond the current batch: pass train_data= to "
                         "lscape.attach")

    __len__ = __getitem__ = __iter__ = _refuse


def _config(model, optimizer, loss_fn, adapter, train_data, lr, momentum, batch_size, plugins, plugin_options,
            disable, out, seed, progress, total_steps) -> RunConfig:
    """The run's config as far as the objects can be described (names, not rebuildable);
    the keywords given to ``attach`` are checked as the run options of the same names."""
    if loss_fn is None:
        loss = "model" if adapter is None else _describe(adapter)
    else:
        loss = loss_fn if isinstance(loss_fn, str) else _describe(loss_fn)
    given = {"batch_size": batch_size, "plugins": plugins, "plugin_options": plugin_options, "out": out,
             "seed": seed, "progress": progress, "disable": list(disable)}
    for name, value in given.items():
        _RUN[name].check(value, PYTHON)
    return RunConfig(model=_describe(model), data=_describe(train_data) if train_data is not None else "none",
                     loss=loss, optimizer=_describe(optimizer) if optimizer is not None else "none").merged(
        {**given, "lr": lr, "momentum": momentum, "batch_size": 0 if batch_size is None else batch_size,
         "steps": total_steps, "eval_schedule": "never", "checkpoint_schedule": "never"}, PYTHON)


def _describe(obj: Any) -> str:
    """What the stored config says of an object: a function's ``module:name``, else the
    class and repr (as ``lscape.run`` with objects records them)."""
    from .build import describe_object

    if callable(obj) and not isinstance(obj, (nn.Module, torch.optim.Optimizer)) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', None) or '?'}:{obj.__qualname__}"
    return describe_object(obj)


def _indexable(dataset: Any) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _has_lr(optimizer: Any) -> bool:
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and "lr" in groups[0]


def _loss(value: Any) -> torch.Tensor | None:
    """The step's loss as the engine hands it to plugins: a detached 0-d tensor (no host sync)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value))
