"""Checkpoints in a run store: save, load, find the latest, and drop what came after one.

A checkpoint is one ``torch.save`` payload kept as a uint8 array ``checkpoints/step_NNNNNNNNN``
(attributes ``step`` and ``epoch``); the group attribute ``latest`` names the newest. The
engine saves them (:func:`save_checkpoint`), resume loads them (``lscape.resume``),
``lscape measure`` and the landscape probes read them (:func:`load_checkpoint`), and a
resumed run or session drops the rows recorded after one (:func:`truncate_after`).

A sharded run (``--strategy fsdp``) keeps its model and optimizer state, as every rank's
shards, in Distributed Checkpoint files inside the zarr group ``checkpoints/step_NNNNNNNNN.dcp``
(:func:`save_sharded_checkpoint`); the array ``checkpoints/step_NNNNNNNNN`` then holds the
rest (step, data stream, plugin states, RNG), the gathered full model under ``model`` (what
``lscape measure`` and the landscape probes read) and ``sharded = {"dcp": ..., "world_size": ...}``.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UsageError, message_line
from .store import RunStore, written_rows

if TYPE_CHECKING:
    import zarr

    from .probe import Plugin

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_names", "checkpoint_name",
           "truncate_after", "plugin_states", "load_plugin_states", "state_mismatch", "save_sharded_checkpoint",
           "load_sharded_checkpoint"]

GROUP = "checkpoints"


def checkpoint_name(step: int) -> str:
    """The array name of the checkpoint after ``step`` updates."""
    return f"step_{step:09d}"


def save_checkpoint(store: RunStore, state: dict[str, Any], step: int, epoch: int) -> str:
    """Write ``state`` (what resume needs) as the checkpoint of ``step`` and make it the
    latest; every writer is flushed first, so the rows on disk match it. Returns its name."""
    store.flush()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    group = store.root.require_group(GROUP)
    name = checkpoint_name(step)
    group.create_array(name, shape=data.shape, chunks=(min(len(data), 2**22),), dtype=np.uint8,
                       dimension_names=["byte"], attributes={"step": step, "epoch": epoch},
                       overwrite=True)[:] = data
    group.attrs.update({"latest": name})
    return name


def save_sharded_checkpoint(store: RunStore | None, path: str, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, world_size: int) -> dict[str, Any]:
    """Every rank: write the sharded model and optimizer of ``step`` with Distributed
    Checkpoint into ``path/checkpoints/step_N.dcp`` (a collective); rank 0 (the one with
    ``store``) makes that folder a zarr group first. Returns the reference the checkpoint
    array keeps (``state["sharded"]``)."""
    from .sharding import DCP_SUFFIX, save_sharded

    folder = checkpoint_name(step) + DCP_SUFFIX
    if store is not None:
        group = store.root.require_group(GROUP).require_group(folder)
        group.attrs.update({"format": "torch.distributed.checkpoint", "step": step, "world_size": world_size})
    save_sharded(os.path.join(path, GROUP, folder), model, optimizer)
    return {"dcp": folder, "world_size": world_size}


def load_sharded_checkpoint(path: str, state: dict[str, Any], model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer) -> None:
    """Every rank: load the Distributed Checkpoint a checkpoint ``state`` of the store at
    ``path`` refers to into the sharded ``model`` and ``optimizer`` (a collective)."""
    from .sharding import load_sharded

    load_sharded(os.path.join(path, GROUP, state["sharded"]["dcp"]), model, optimizer)


def checkpoint_names(root: zarr.Group) -> list[str]:
    """The checkpoints of an open run group, oldest first."""
    return sorted(root[GROUP].array_keys()) if GROUP in root.group_keys() else []


def latest_checkpoint(root: zarr.Group) -> str | None:
    """The name of the latest checkpoint of an open run group, or None."""
    return root[GROUP].attrs.get("latest") if GROUP in root.group_keys() else None


def load_checkpoint(root: zarr.Group, name: str | None = None) -> dict[str, Any] | None:
    """The checkpoint ``name`` (default: the latest) of an open zarr run group, or None."""
    if GROUP not in root.group_keys():
        return None
    group = root[GROUP]
    name = name or group.attrs.get("latest")
    if not name or name not in group.array_keys():
        return None
    try:
        data = group[name][:]
        return torch.load(io.BytesIO(data.tobytes()), weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt chunk, a truncated write: name the checkpoint
        raise UsageError(f"checkpoint checkpoints/{name} of {getattr(root.store, 'root', root.store)} is damaged "
                         f"({type(e).__name__}: {message_line(e, 120)})") from e


def truncate_after(store: RunStore, step: int) -> None:
    """Drop rows recorded after the checkpoint (steps >= ``step``), in every group."""

    def walk(group: Any, prefix: str) -> None:
        if "step" in group.array_keys():
            keep = written_rows(group["step"][:], before=step)
            store.group(prefix).truncate(keep)
        for key in group.group_keys():
            if key != GROUP or prefix:
                walk(group[key], f"{prefix}/{key}" if prefix else key)

    walk(store.root, "")


def plugin_states(plugins: list[Plugin]) -> dict[str, Any]:
    """Every plugin's ``state_dict``, by name (what checkpoints keep)."""
    return {p.name: p.state_dict() for p in plugins}


def load_plugin_states(plugins: list[Plugin], states: dict[str, Any]) -> None:
    """Give each plugin its state from ``plugin_states`` (plugins not in it keep theirs)."""
    for plugin in plugins:
        if plugin.name in states:
            plugin.load_state_dict(states[plugin.name])


def state_mismatch(model: torch.nn.Module, state: Any) -> str | None:
    """What differs between ``model`` and a state dict meant for it, in a few words (torch's
    own error lists every key), or None when it fits."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if items:
            parts.append(f"{len(items)} {label} ({', '.join(items[:2])}{', ...' if len(items) > 2 else ''})")
    return f"entries {'; '.join(parts)}" if parts else None
