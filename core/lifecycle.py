"""The life of a run around its training loop, shared by the engine (``lscape run``),
``lscape measure`` and ``lscape.attach``: which plugins a config activates and how they are
made, checked and registered; the checks of a workload before anything is written; the
run store's root attributes at the start and the end; the process group under torchrun.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import signal
import sys
import threading
import types
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import pluggy
import torch

from . import __version__
from .config import RunConfig
from .batch import batch_size_of
from .context import RunContext
from .data import full_batches
from .errors import UsageError, UserCodeError, did_you_mean
from .events import Interrupted
from .manager import Registry, build_registry, load_module, source_version
from .probe import Plugin, StepOwner
from .store import RunStore

__all__ = ["plugin_registry", "resolve_plugins", "make_plugins", "activate_plugins", "check_workload",
           "root_attrs", "mark_ended", "utc_now", "default_out", "broadcast", "init_distributed", "run_device",
           "evaluate", "stop_on_signals", "gc_frozen"]


def plugin_registry(pm: pluggy.PluginManager, names: Iterable[str] | None) -> Registry:
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


def mark_ended(store: RunStore, status: str, error: str | None, steps: int) -> None:
    """Flush the store and mark how the run ended (status, end time, steps, error)."""
    store.flush()
    attrs: dict[str, Any] = {"status": status, "end_time": utc_now(), "steps_done": steps}
    if error:
        attrs["error"] = error
    store.update_attrs(**attrs)


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
        "start_time": utc_now(),
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


def check_workload(ctx: RunContext) -> None:
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


def run_device(name: str, rank: int = 0, world: int = 1) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def init_distributed(device: str) -> tuple[int, int]:
    """``(rank, world_size)``; under torchrun (WORLD_SIZE > 1) the process group is set up
    here: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def default_out(cfg: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", _slug(cfg.name) if cfg.name else f"{_slug(cfg.model)}-{_slug(cfg.data)}-{stamp}")
    path, i = base + ".zarr", 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}.zarr"
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.split(":")[-1])[:40]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
            for batch in full_batches(dataset, size, ctx.device, workers=ctx.workers,
                                      cache=ctx.fetchers):
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


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], bool]) -> Iterator[None]:
    """While inside: SIGINT/SIGTERM call ``request_stop()`` (the loop stops after the current
    step, so the store stays consistent); when it says a stop was asked for already, the
    signal interrupts at once (``KeyboardInterrupt``, ``Interrupted``). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        if request_stop():
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """What is alive on entry (torch, the model, the data) lives for the whole run: keep it
    out of the garbage collector's full passes, which otherwise cost a few percent of a small
    model's step time."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
