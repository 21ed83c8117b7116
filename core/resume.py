"""Resuming a run: ``lscape run --resume STORE`` (and ``lscape.run(resume=...)``) and a
resumed ``lscape.attach`` session.

The stored config is the run's (only its length may be raised: :data:`EXTENDABLE`); the
objects a run was built from are needed again (:func:`objects_for`); the latest checkpoint
gives back model, optimizer, data stream, scaler, plugin states and RNG (:func:`restore`),
and the rows the store recorded after it are dropped, to be recorded again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import load_checkpoint, load_plugin_states, load_sharded_checkpoint, truncate_after
from .config import RunConfig
from .context import RunContext
from .errors import UsageError
from .lifecycle import utc_now
from .probe import Plugin
from .store import RunReader, RunStore

__all__ = ["EXTENDABLE", "ResumePoint", "config_for_resume", "objects_for", "restore", "extension_attrs",
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



def restore(store: RunStore, ctx: RunContext, plugins: list[Plugin],
            scaler: torch.amp.GradScaler | None = None) -> ResumePoint:
    """Load the latest checkpoint of ``store`` into the run (model, optimizer, data stream,
    GradScaler, plugin states, RNG; a sharded run's model and optimizer from its DCP folder) and drop the rows recorded after it (rank 0). A store
    killed before its first checkpoint restarts from step 0, as the new run did."""
    state = load_checkpoint(store.root)
    if state is None:
        print(f"[lscape] {store.path} has no checkpoint yet: restarting it from step 0", file=sys.stderr)
        if ctx.is_main:
            truncate_after(store, 0)
        return ResumePoint()
    if state.get("sharded"):  # --strategy fsdp: every rank loads its shards (DCP reshards)
        load_sharded_checkpoint(str(store.path), state, ctx.model, ctx.optimizer)
    else:
        ctx.model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.stream.load_state_dict(state["stream"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    load_plugin_states(plugins, state["plugins"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    point = ResumePoint(int(state["step"]), int(state["epoch"]), float(state["elapsed"]))
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
    return {"config": config.to_dict(), "total_steps": total_steps,
            "extensions": [*store.attrs.get("extensions", []), record]}


def mark_resumed(store: RunStore, **attrs: Any) -> None:
    """A resumed store is ``running`` again since ``resumed_at`` (with ``attrs``); an earlier
    failure's reason no longer applies."""
    store.update_attrs(status="running", resumed_at=utc_now(), **attrs)
    store.clear_attrs("error")
