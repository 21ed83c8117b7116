"""Resuming a run: ``lscape run --resume STORE`` (and ``lscape.run(resume=...)``) and a
resumed ``lscape.attach`` session.

The stored config is the run's (only its length may be raised: :data:`EXTENDABLE`); the
objects a run was built from are needed again (:func:`objects_for`); the latest checkpoint
gives back model, optimizer, data stream, scaler, plugin states and RNG (:func:`restore`),
and the rows the store recorded after it are dropped, to be recorded again.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import GROUP, load_plugin_states, load_sharded_checkpoint, state_mismatch, truncate_after
from .config import RunConfig
from .context import RunContext
from .errors import UsageError, message_line
from .lifecycle import utc_now
from .probe import Plugin
from .sharding import DCP_SUFFIX
from .store import (LOCK_GROUP, ROWS_ATTR, RunReader, RunStore, WriterLock, committed_rows, local_path, missing_chunks,
                    stored_config, written_rows)
from .trust import signed_config

__all__ = ["EXTENDABLE", "ResumePoint", "ResumePlan", "config_for_resume", "objects_for", "plan_resume",
           "check_resumable", "open_planned", "restore_state", "restore", "check_length", "extension_attrs",
           "mark_resumed"]

#: what a resumed run may change: its length, and only upwards
EXTENDABLE = ("steps", "epochs", "time_limit")


@dataclass
class ResumePoint:
    """Where a checkpoint leaves a run: ``step`` updates done in ``epoch``, after ``elapsed``
    seconds of training."""

    step: int = 0
    epoch: int = 0
    elapsed: float = 0.0


def objects_for(cfg: RunConfig, objects: dict[str, Any]) -> dict[str, Any]:
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



def config_for_resume(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """The stored config of ``cfg.resume`` with a raised ``steps``/``epochs``/``time_limit``
    from ``cfg`` applied; returns it and the change (empty when the length is unchanged)."""
    path = cfg.resume
    reader = RunReader(path)
    check_resumable(reader)  # a foreign group, a measurement store, a config that is no table
    stored = RunConfig.stored(reader)
    stored.out = path
    stored.resume = path
    stored.progress = cfg.progress
    given = {k: getattr(cfg, k) for k in EXTENDABLE if getattr(cfg, k) is not None}
    if not given:
        return stored, {}
    old = {k: getattr(stored.validate(), k) for k in EXTENDABLE}
    new = stored.merged(given).validate()
    if "time_limit" in given and old["time_limit"] is None:
        raise UsageError(f"--time-limit can only be raised on resume, and {path} has none (extend it with "
                         "--steps or --epochs)")
    if "time_limit" in given and new.time_limit < old["time_limit"]:
        raise UsageError(f"--time-limit can only be raised on resume: {path} had {old['time_limit']:g}s")
    change = {k: getattr(new, k) for k in EXTENDABLE if getattr(new, k) != old[k]}
    if change:
        change["from"] = {k: old[k] for k in change}
    return new, change



#: what a checkpoint's payload holds; one without these is not one of lscape's
CHECKPOINT_KEYS = ("step", "epoch", "model", "optimizer", "stream", "plugins", "rng_cpu")


@dataclass
class ResumePlan:
    """What resuming a store will do, found by reading it only (:func:`plan_resume`): the
    checkpoint to continue from (``state`` None: from step 0, nothing recorded yet), the newer
    ones passed over and why, and what the store held when it was read."""

    path: str
    state: dict[str, Any] | None = None
    name: str | None = None
    step: int = 0
    passed: list[str] = field(default_factory=list)
    later: list[str] = field(default_factory=list)
    repair_group: bool = False
    seen: tuple[Any, ...] = ()


def check_resumable(reader: RunReader) -> dict[str, Any]:
    """One line unless ``reader`` is a lscape run store that ``--resume`` can continue (not a
    zarr group of another program, not a measurement store); returns its config table."""
    path = reader.path
    fmt = getattr(reader.root.metadata, "zarr_format", 3)
    if fmt != 3:
        raise UsageError(f"{path} is a zarr v{fmt} group, not a lscape run store (lscape writes zarr v3): "
                         "refusing to resume it")
    attrs = reader.attrs
    if attrs.get("kind") == "measure":
        raise UsageError(f"{path} is a measurement store (lscape measure), not a training run: it cannot be "
                         "resumed; measure again with lscape measure --out NEW")
    config = stored_config(reader)
    missing = [k for k in ("model", "data") if not isinstance(config.get(k), str)] + \
        [k for k in ("status", "start_time") if k not in attrs]
    if missing:
        raise UsageError(f"{path} has lscape's version attribute but no {missing[0]!r} "
                         f"{'in its config' if missing[0] in ('model', 'data') else 'attribute'}: it was not "
                         "written by lscape run; refusing to resume it")
    return config


def plan_resume(path: str, check_lock: bool = True) -> ResumePlan:
    """Read (only) the store at ``path`` and decide where its run continues: the newest
    intact checkpoint, passing over absent or damaged ones; from step 0 only when nothing is
    recorded yet (a run killed before its first checkpoint). Refused in one line: a store
    another process writes, a store with records but no usable checkpoint, and one whose
    kept rows have lost a chunk."""
    reader = RunReader(path)
    check_resumable(reader)
    local = local_path(path)
    if local is not None and check_lock:
        WriterLock.check(local, path)  # a live writer: refused before anything else is read
    root = reader.root
    arrays, latest, damaged_group = _checkpoint_arrays(root, local)
    plan = ResumePlan(path, repair_group=damaged_group, seen=(latest, sorted(arrays)))
    if damaged_group:
        plan.passed.append(f"the metadata of {GROUP}/ is damaged (which checkpoint is the latest is lost)")
    latest_step = _step_of(latest)
    candidates = sorted(arrays, key=lambda n: _step_of(n) or -1, reverse=True)
    if latest in arrays:  # the pointer wins: a newer name is a stale leftover of another history
        candidates.remove(latest)
        candidates.insert(0, latest)
    elif latest is not None:
        plan.passed.append(f"checkpoint {latest} is absent (named by checkpoints.latest)")
    for name in candidates:
        step = _step_of(name)
        if name != latest and latest_step is not None and step is not None and step > latest_step:
            continue  # written after the latest one by an abandoned history: never resumed from
        try:
            state = _load(arrays[name])
        except Exception as e:
            plan.passed.append(f"checkpoint {name} is damaged ({type(e).__name__}: {message_line(e, 80)})")
            continue
        plan.state, plan.name, plan.step = state, name, int(state["step"])
        break
    plan.later = [n for n in arrays if n != plan.name and (plan.state is None or (_step_of(n) or 0) >= plan.step)]
    recorded, lost = _rows_and_lost_chunks(root, local, plan.step)
    if plan.state is None and recorded:
        why = (plan.passed[0] + (f", and {len(plan.passed) - 1} more" if len(plan.passed) > 1 else "")
               if plan.passed else "it has no checkpoint")
        raise UsageError(f"{path} holds {recorded} recorded steps but no usable checkpoint ({why}): resuming "
                         "would train again from step 0 over them; refusing (start a new run with another --out)")
    if lost:
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        raise UsageError(f"{path} has lost part of its record: {lost[0]}{more}; resuming would keep the hole; "
                         "restore the files, or start a new run with another --out")
    return plan


def _step_of(name: Any) -> int | None:
    if isinstance(name, str) and name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def _checkpoint_arrays(root: Any, local: str | None) -> tuple[dict[str, Any], str | None, bool]:
    """The checkpoint arrays of a run group by name (a damaged one as its error), the
    ``latest`` attribute, and whether the checkpoints group's own metadata is damaged."""
    import zarr

    folder = os.path.join(local, GROUP) if local is not None else None
    try:
        group = root[GROUP]
    except KeyError:
        return {}, None, False
    except Exception:  # the group's metadata is not JSON: its arrays may still be intact
        if folder is None or not os.path.isdir(folder):
            raise UsageError(f"{root.store}/{GROUP} is damaged and cannot be read") from None
        names = sorted(n for n in os.listdir(folder) if _is_checkpoint_folder(folder, n))
        arrays: dict[str, Any] = {}
        for name in names:
            try:
                arrays[name] = zarr.open_array(store=root.store, path=f"{GROUP}/{name}", mode="r")
            except Exception as e:
                arrays[name] = e
        return arrays, None, True
    latest = group.attrs.get("latest")
    names = set()
    if folder is not None and os.path.isdir(folder):  # listing by folder: a damaged array is still seen
        names = {n for n in os.listdir(folder) if _is_checkpoint_folder(folder, n)}
    arrays = {}
    for name in sorted(names | set(_listed(group))):
        try:
            arrays[name] = group[name]
        except Exception as e:
            arrays[name] = e
    return arrays, latest if isinstance(latest, str) else None, False


def _is_checkpoint_folder(folder: str, name: str) -> bool:
    """A checkpoint array's folder (a sharded run's ``step_N.dcp`` DCP group beside it is not one)."""
    return not name.endswith(DCP_SUFFIX) and os.path.isfile(os.path.join(folder, name, "zarr.json"))


def _listed(group: Any) -> list[str]:
    try:
        return list(group.array_keys())
    except Exception:
        return []


def _load(array: Any) -> dict[str, Any]:
    """The payload of one checkpoint array; raises when it is damaged in any way."""
    if isinstance(array, Exception):
        raise array
    state = torch.load(io.BytesIO(array[:].tobytes()), weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise ValueError("not a lscape checkpoint payload")
    return state


def _rows_and_lost_chunks(root: Any, local: str | None, step: int) -> tuple[int, list[str]]:
    """The rows the store's groups hold, and the chunks of the rows before ``step`` (the rows
    a resume keeps) that are missing on disk."""
    recorded, lost = 0, []

    def walk(group: Any, prefix: str) -> None:
        nonlocal recorded
        keys = list(group.array_keys())
        if "step" in keys:
            steps = group["step"]
            n = committed_rows(group)
            keep = written_rows(steps[:n], before=step)
            published = group.attrs.get(ROWS_ATTR, steps.shape[0])
            recorded = max(recorded, n, min(int(published), steps.shape[0]))
            for key in keys:
                folder = os.path.join(local, *prefix.split("/"), key) if local is not None else None
                # a lost chunk of `step` hides which rows there are: all its published rows count
                rows = min(int(published), steps.shape[0]) if key == "step" else keep
                for chunk in missing_chunks(group[key], rows, folder):
                    lost.append(f"{prefix}/{key}/{chunk} is missing")
        for key in sorted(group.group_keys()):
            walk(group[key], f"{prefix}/{key}")

    for key in _children(root, local):
        try:
            walk(root[key], key)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{root.store}/{key} is damaged and cannot be read ({type(e).__name__}: "
                             f"{message_line(e, 120)})") from e
    return recorded, lost


def _children(root: Any, local: str | None) -> list[str]:
    """The data groups of a run group (not its checkpoints or lock: their metadata may be
    damaged without harm to the record), listed by folder where the store is local."""
    if local is not None:
        names = [n for n in sorted(os.listdir(local)) if os.path.isfile(os.path.join(local, n, "zarr.json"))]
        names = [n for n in names if _is_group(os.path.join(local, n, "zarr.json"), n)]
    else:
        names = sorted(root.group_keys())
    return [n for n in names if n not in (GROUP, LOCK_GROUP)]


def _is_group(meta: str, name: str) -> bool:
    if name in (GROUP, LOCK_GROUP):
        return True
    import json

    try:
        with open(meta) as f:
            return json.load(f).get("node_type") == "group"
    except (OSError, ValueError, AttributeError):
        return True  # damaged: the walk names it


def open_planned(plan: ResumePlan, lock: bool = True) -> RunStore:
    """Open the store of ``plan`` for writing (taking its writer lock) and make it what the
    plan continues from: a damaged checkpoints group repaired, the checkpoints after the
    chosen one and the rows from its step on dropped (saying so). Refused in one line, with
    the lock given back, when the store changed since it was planned."""
    store = RunStore.open(plan.path, lock=lock)
    if not lock:
        return store
    try:
        arrays, latest, damaged = _checkpoint_arrays(store.root, local_path(plan.path))
        if (latest, sorted(arrays)) != plan.seen:
            raise UsageError(f"{plan.path} changed while this resume was being prepared; try again")
    except BaseException:
        store.close()
        raise
    if damaged:
        _repair_group(store, plan)
    group = store.root.require_group(GROUP) if plan.name else None
    for name in plan.later:
        _remove_checkpoint(store, name)
    if group is not None and latest != plan.name:
        group.attrs.update({"latest": plan.name})
    if plan.passed:
        where = f"resuming from {plan.name} (step {plan.step})" if plan.name else "restarting from step 0"
        print(f"[lscape] {plan.path}: {'; '.join(plan.passed)}: {where}; the rows after it are recorded again",
              file=sys.stderr)
    elif plan.name is None:
        print(f"[lscape] {plan.path} has no checkpoint and no rows yet: restarting it from step 0", file=sys.stderr)
    truncate_after(store, plan.step)
    return store


def _repair_group(store: RunStore, plan: ResumePlan) -> None:
    """Rewrite the metadata of a checkpoints group that is not JSON (its arrays stay)."""
    import json

    local = local_path(plan.path)
    assert local is not None  # a damaged group of a URL store was refused when planned
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {"latest": plan.name} if plan.name else {}}
    with open(os.path.join(local, GROUP, "zarr.json"), "w") as f:
        json.dump(meta, f)
    print(f"[lscape] {plan.path}/{GROUP} had damaged metadata: rewritten", file=sys.stderr)


def _remove_checkpoint(store: RunStore, name: str) -> None:
    """Drop checkpoint ``name`` and, for a sharded run, its DCP folder."""
    local = local_path(store.path)
    for node in (name, name + DCP_SUFFIX):
        if local is not None:
            shutil.rmtree(os.path.join(local, GROUP, node), ignore_errors=True)
        else:
            with contextlib.suppress(Exception):
                del store.root[GROUP][node]


def check_length(cfg: RunConfig, total_steps: int | None, change: dict[str, Any]) -> None:
    """A resumed run's new length (``--steps`` or ``--epochs``, as steps once the data's
    length is known) may not be shorter than what the store has done: one check for both,
    before anything is written."""
    if not cfg.resume or not change or total_steps is None:
        return
    attrs = RunReader(cfg.resume).attrs
    before, done = attrs.get("total_steps"), attrs.get("steps_done")
    key = "steps" if cfg.steps is not None else "epochs"
    given = f"--steps {cfg.steps}" if key == "steps" else f"--epochs {cfg.epochs} ({total_steps} steps)"
    if isinstance(before, int) and total_steps < before:
        raise UsageError(f"{given} is shorter than the {before} steps {cfg.resume} was set to: a resumed run's "
                         "length can only be raised")
    if isinstance(done, int) and total_steps < done:
        raise UsageError(f"{given} is fewer than the {done} steps {cfg.resume} has done")


def restore_state(plan: ResumePlan, ctx: RunContext, plugins: list[Plugin],
                  scaler: torch.amp.GradScaler | None = None) -> ResumePoint:
    """Load the checkpoint of ``plan`` into the run (model, optimizer, data stream, GradScaler,
    plugin states, RNG); a checkpoint that no longer fits what the stored config builds is
    one line saying what differs. Touches no store."""
    state = plan.state
    if state is None:
        return ResumePoint()
    where = f"checkpoint {plan.name} of {plan.path}"
    sharded = bool(state.get("sharded"))  # --strategy fsdp: every rank loads its shards (DCP reshards)
    differs = None if sharded else state_mismatch(ctx.model, state["model"])
    if differs:
        raise UsageError(f"{where} does not fit the model its config builds: {differs}")
    try:
        if sharded:
            load_sharded_checkpoint(plan.path, state, ctx.model, ctx.optimizer)
        else:
            ctx.model.load_state_dict(state["model"])
            ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.stream.load_state_dict(state["stream"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        load_plugin_states(plugins, state["plugins"])
        if getattr(ctx, "probe_budget", None) is not None:  # --probe-budget: the time spent so far goes on
            ctx.probe_budget.load_state_dict(state.get("probe_budget"))
    except UsageError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"{where} does not fit the run its config builds: {message_line(e, 200)}") from None
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return ResumePoint(int(state["step"]), int(state["epoch"]), float(state["elapsed"]))


def restore(store: RunStore, ctx: RunContext, plugins: list[Plugin],
            scaler: torch.amp.GradScaler | None = None) -> ResumePoint:
    """Load the newest intact checkpoint of an open ``store`` into the run and drop the rows
    recorded after it (rank 0): :func:`plan_resume` and :func:`restore_state` on a store
    already open (the engine plans before it takes the lock)."""
    plan = plan_resume(store.path, check_lock=store.lock is None)
    point = restore_state(plan, ctx, plugins, scaler)
    if ctx.is_main:
        truncate_after(store, point.step)
    return point


def extension_attrs(change: dict[str, Any], config: RunConfig, store: RunStore, step: int,
                    total_steps: int | None) -> dict[str, Any]:
    """Root attributes of a resumed run whose length was raised (``change`` from
    :func:`config_for_resume`): the new config, and the change appended to ``extensions``."""
    if not change:
        return {}
    record = {**change, "at_step": step, "time": utc_now()}
    return {**signed_config(config.to_dict()), "total_steps": total_steps,
            "extensions": [*store.attrs.get("extensions", []), record]}


def mark_resumed(store: RunStore, **attrs: Any) -> None:
    """A resumed store is ``running`` again since ``resumed_at`` (with ``attrs``); an earlier
    failure's reason no longer applies."""
    store.update_attrs(status="running", resumed_at=utc_now(), **attrs)
    store.clear_attrs("error")
