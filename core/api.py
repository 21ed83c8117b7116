"""The Python API: what the command line does, callable from a notebook."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Iterable, Mapping

import torch

from .config import RunConfig, load_toml
from .options import PYTHON
from .build import require_trust, store_imports
from .checkpoint import state_mismatch
from .errors import UsageError, message_line
from .store import RunReader, RunStore, store_exists

__all__ = ["run", "open_run", "measure", "make_config"]


def make_config(config: RunConfig | str | os.PathLike | None = None, **overrides: Any) -> RunConfig:
    """A ``RunConfig`` from a config object, a TOML path or nothing, with ``overrides``: the
    run options (``lscape.config.run_options()``) as keywords, named so in errors."""
    if config is None:
        base = RunConfig()
    elif isinstance(config, RunConfig):
        base = config
    else:
        base = load_toml(config)
    return base.merged(overrides, PYTHON)


def run(config: RunConfig | str | os.PathLike | None = None, **overrides: Any):
    """Train and measure; returns a ``RunResult`` with the store's path and status.

    >>> result = lscape.run(steps=50, plugins=["grad-norm"], out="runs/demo.zarr", progress=False)
    """
    from .engine import Engine

    trust_store = bool(overrides.pop("trust_store", False))
    objects = split_objects(overrides)
    return Engine(make_config(config, **overrides), trust_store=trust_store, objects=objects).run()


#: run options that may be Python objects instead of names
OBJECT_FIELDS = ("model", "data", "loss", "optimizer", "adapter")


def split_objects(overrides: dict[str, Any]) -> dict[str, Any]:
    """Take the objects (a module, a data set or loader, a loss, an optimizer or factory, an
    adapter) out of ``overrides``, leaving in their place the description the stored config
    keeps (``<object CLASS: repr>``); a DataLoader given as data also gives its batch size
    and workers unless those are given."""
    from torch.utils.data import DataLoader

    from .build import describe_object

    objects: dict[str, Any] = {}
    for key in OBJECT_FIELDS:
        value = overrides.get(key)
        if value is None or isinstance(value, (str, os.PathLike)):
            continue
        objects[key] = value
        overrides[key] = describe_object(value)
    loader = objects.get("data")
    loader = loader.get("train") if isinstance(loader, Mapping) else loader
    if isinstance(loader, DataLoader):
        check_loader(loader)
        # batch_size=16 or batch_sampler=BatchSampler(..., 16, drop_last): the same batches
        batches = loader if loader.batch_size is not None else getattr(loader, "batch_sampler", None)
        if overrides.get("batch_size") is None and getattr(batches, "batch_size", None) is not None:
            overrides["batch_size"] = batches.batch_size
        if overrides.get("drop_last") is None and getattr(batches, "batch_size", None) is not None:
            overrides["drop_last"] = bool(batches.drop_last)
        if overrides.get("workers") is None:
            overrides["workers"] = loader.num_workers
    return objects


def check_loader(loader: Any) -> None:
    """What lscape takes from a DataLoader given as data: its dataset, collate function,
    batch size, ``drop_last`` and workers. The order is lscape's own (seeded, reshuffled every
    epoch, checkpointed for exact resume), so a loader's plain ``shuffle`` is replaced; a
    sampler or batch sampler of its own (weighted, a subset, grouped by length) would be
    silently dropped: refused in one line instead."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    sampler = getattr(loader, "sampler", None)
    if sampler is not None and type(sampler) not in (RandomSampler, SequentialSampler) and \
            type(sampler).__name__ != "_InfiniteConstantSampler":
        raise UsageError(f"the DataLoader given as data has its own sampler ({type(sampler).__name__}), which lscape "
                         "cannot honour (it draws the order itself, seeded and checkpointed): pass the Dataset "
                         "(a torch.utils.data.Subset for a subset) with batch_size=")
    batches = getattr(loader, "batch_sampler", None)
    if batches is not None and type(batches) is not BatchSampler:
        raise UsageError(f"the DataLoader given as data has its own batch sampler ({type(batches).__name__}), which "
                         "lscape cannot honour: pass the Dataset with batch_size=")


def open_run(path: str | os.PathLike) -> RunReader:
    """Open a run store for reading (safe while the run writes)."""
    return RunReader(path)


def measure(source: str | os.PathLike | None, plugins: Iterable[str], *,
            plugin_options: Mapping[str, Mapping[str, Any]] | None = None, out: str | None = None,
            checkpoints: str = "latest", progress: bool = False, trust_store: bool = False, **overrides: Any):
    """Run probes once on a saved model, with no training.

    ``source`` is a run store (its config rebuilds model and data; ``checkpoints`` is
    ``latest``, ``all`` or a comma-separated list of steps), a ``.pt`` state dict (with
    ``model=``/``data=`` overrides), or ``None`` for a freshly initialised model.
    Results go to a new store at ``out``; returns its ``RunResult``. A store whose config
    names ``module:factory`` code is imported only with ``trust_store=True`` (or the same
    names given as overrides).
    """
    from .context import StepState
    from .engine import Engine, RunResult
    from .events import call_hook
    from . import activity
    from .lifecycle import stop_on_signals, utc_now
    from .probe import Probe

    plugins = list(plugins)
    if not plugins:
        raise UsageError("name at least one probe to measure with --plugin")
    reader = None
    if source is not None and str(source).endswith(".pt") and not os.path.isdir(source):
        if not os.path.isfile(source):
            raise UsageError(f"no such file: {source}")
        base = make_config(None, **overrides)
    elif source is not None:
        reader = RunReader(source)
        stored = RunConfig.stored(reader)
        require_trust(source, store_imports(stored, given=overrides), trust_store, reader.attrs)
        base = stored.merged(overrides)
    else:
        base = make_config(None, **overrides)
    # a sharded run's checkpoints hold the gathered full model: measured on a plain model unless asked otherwise
    cfg = base.merged({"plugins": plugins, "progress": progress, "strategy": overrides.get("strategy") or "ddp"})
    cfg.plugin_options = {k: dict(v) for k, v in (plugin_options or {}).items()}
    cfg.disable = ["train-metrics", "progress"]
    if out is None:
        stem = "fresh" if source is None else os.path.basename(str(source).rstrip("/")).removesuffix(".zarr").removesuffix(".pt")
        out = os.path.join("runs", f"{stem}-measure-{datetime.now().strftime('%Y%m%d-%H%M%S')}.zarr")
    if store_exists(out):
        _replace_killed_measure(out)
    cfg.out = out
    engine = Engine(cfg)
    ctx = engine.prepare()
    ctx.probe_budget = None  # measuring is all probes: a run's --probe-budget does not apply
    probes = [p for p in engine.plugins if isinstance(p, Probe)]
    if not probes:
        raise UsageError("lscape measure runs probes; none of the named plugins is a probe")
    states = _model_states(reader, source, checkpoints)
    for _, _, model_state, _ in states:  # before the store exists: a state of another model is bad input
        _check_fits(ctx.model, model_state, source, cfg.model)
    readers = _optimizer_readers(probes)
    if readers:  # a matrix read from the optimizer's state (kind=preconditioned): the checkpoint must hold it
        _check_optimizer_states(readers[0], states, source)
    attrs = engine.root_attrs()
    attrs.update({"kind": "measure", "source": None if source is None else str(source)})
    ctx.store = RunStore.create(out, attrs)
    status = "completed"
    # Ctrl-C/SIGTERM abandon the measurement in progress (no row) and end the measuring
    try:
        with stop_on_signals(engine.request_stop):
            for step, epoch, model_state, optimizer_state in states:
                if model_state is not None:
                    ctx.model.load_state_dict(model_state)
                if optimizer_state is not None:
                    _load_optimizer(ctx.optimizer, optimizer_state, step, source, required=bool(readers))
                batch, _, _ = ctx.stream.next()
                state = StepState(step=step, epoch=epoch, batch=batch)
                for probe in probes:
                    call_hook(lambda **kw: probe.run_measure(**kw), ctx=ctx, state=state)
                if activity.stopping():
                    status = "interrupted"
                    break
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        ctx.store.flush()
        ctx.store.update_attrs(status=status, end_time=utc_now())
        ctx.store.close()  # releases the writer lock
    return RunResult(out, status, len(states))


def _check_fits(model: torch.nn.Module, state: Any, source: Any, name: str) -> None:
    """A state dict of another architecture is one line saying what differs (torch's own
    error lists every key)."""
    if state is None:
        return
    if not isinstance(state, Mapping):
        raise UsageError(f"{source} holds a {type(state).__name__}, not a state dict")
    differs = state_mismatch(model, dict(state))
    if not differs:
        return
    raise UsageError(f"{source} does not fit model '{name}': {differs}; "
                     "give the --model (and --model-opt) it was trained with")


def _replace_killed_measure(out: str) -> None:
    """A measurement killed part-way (status still "running", its writer dead) is redone:
    ``lscape measure`` has no resume, and its partial rows are only a prefix. Anything else
    at ``out`` is a ``UsageError``."""
    import shutil
    import sys

    taken = UsageError(f"{out} already exists; choose another --out")
    try:
        reader = RunReader(out)
    except UsageError:
        raise taken from None
    writer = reader.writer()
    attrs = reader.attrs
    if attrs.get("kind") != "measure" or attrs.get("status") != "running" or not writer or writer["alive"] is not False:
        raise taken
    print(f"[lscape] {out} is a measurement killed before it finished (pid {writer.get('pid')}): measuring again",
          file=sys.stderr)
    shutil.rmtree(out.removeprefix("file://"))


def _optimizer_readers(probes: list[Any]) -> list[tuple[str, str]]:
    """``(probe name, kind)`` of the probes whose matrix reads the optimizer's state."""
    from .curvature import operator_class

    out = []
    for probe in probes:
        kind = getattr(getattr(probe, "opts", None), "kind", None)
        try:
            needs = isinstance(kind, str) and operator_class(kind).needs_optimizer
        except (KeyError, ValueError):
            needs = False
        if needs:
            out.append((probe.name, kind))
    return out


def _check_optimizer_states(reader: tuple[str, str], states: list[tuple[int, int, Any, Any]], source: Any) -> None:
    """One line, before the store exists, when a measured state has no optimizer state to read P from."""
    name, kind = reader
    for step, _, _, optimizer_state in states:
        if optimizer_state is not None and (optimizer_state.get("state") or len(states) > 1):
            continue  # (a state before the first update, among others, is skipped like step 0 of a run)
        if optimizer_state is not None:
            what = f"the checkpoint at step {step} of {source} was taken before the optimizer's first update"
        elif source is None:
            what = "a freshly initialised model has no optimizer state"
        elif str(source).endswith(".pt"):
            what = f"{source} is a model state dict, without the optimizer's state"
        else:
            what = (f"the checkpoint at step {step} of {source} holds no optimizer state (a sharded checkpoint's "
                    f"is not read)")
        raise UsageError(f"{name}.kind={kind} reads the preconditioner from the optimizer's state, and {what}; "
                         f"measure a run store's checkpoint (lscape measure RUN --plugin {name} -o {name}.kind={kind})")


def _load_optimizer(optimizer: Any, state: Any, step: int, source: Any, required: bool) -> None:
    """The checkpoint's optimizer state into the rebuilt optimizer (P, bias corrections and
    learning rates as at that step); one that does not fit is one line when a probe needs it."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        if required:
            raise UsageError(f"the optimizer state of the checkpoint at step {step} of {source} does not fit the "
                             f"optimizer its config builds: {message_line(e, 160)}") from None


def _model_states(reader: RunReader | None, source: Any, which: str) -> list[tuple[int, int, Any, Any]]:
    """``(step, epoch, model state, optimizer state or None)`` of each measured state."""
    from .checkpoint import checkpoint_names, latest_checkpoint, load_checkpoint

    if reader is None:
        if source is None:
            return [(0, 0, None, None)]
        try:
            state = torch.load(source, weights_only=True, map_location="cpu")
        except Exception as e:
            if "weights only load failed" in str(e).lower() or "unsupported global" in str(e).lower():
                raise UsageError(f"{source} holds pickled Python objects (a whole model?), not a state dict of "
                                 "tensors; lscape never runs pickled code: save model.state_dict() and measure that"
                                 ) from None
            raise UsageError(f"cannot load {source} as a state dict: {message_line(e, 160)}") from e
        return [(0, 0, state.get("model", state) if isinstance(state, dict) else state, None)]
    root = reader.root
    names = checkpoint_names(root)
    if not names:
        raise UsageError(f"{reader.path} has no checkpoints to measure")
    if which == "latest":
        latest = latest_checkpoint(root)
        chosen = [latest if latest in names else names[-1]]  # a latest that names nothing: the newest
    elif which == "all":
        chosen = names
    else:
        try:
            wanted = {int(s) for s in which.split(",")}
        except ValueError:
            raise UsageError(f"bad --checkpoints '{which}': use latest, all or steps like 100,200") from None
        chosen = [n for n in names if int(root["checkpoints"][n].attrs["step"]) in wanted]
        if not chosen:
            raise UsageError(f"no checkpoint at steps {which} in {reader.path}")
    out = []
    for name in chosen:
        state = load_checkpoint(root, name)
        if state is None:
            raise UsageError(f"checkpoint {name} of {reader.path} cannot be read")
        out.append((int(state["step"]), int(state["epoch"]), state["model"], state.get("optimizer")))
    return out
