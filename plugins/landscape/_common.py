"""Shared pieces of the landscape probes: the train/eval split option, the base that measures on
fixed train and eval batches, and loading a model state from a store or file."""

from __future__ import annotations

import os
from typing import Any

import torch
from lscape import Option, Probe
from lscape.data import derived_seed, fixed_batches
from lscape.errors import UsageError
from lscape.params import select_parameters

__all__ = ["TrainEvalProbe", "SPLIT_OPTIONS", "load_model_state", "require_matching_state"]

SPLIT_OPTIONS = (
    Option("eval_batches", int, None, "fixed eval batches (default: as many as train batches; 0: none; -1: all)"),
)



class TrainEvalProbe(Probe):
    """A probe that evaluates on fixed training batches (its ``data``) and fixed eval batches."""

    data = "subset"
    at = "step_end"

    def split_batches(self, ctx, state) -> dict[str, list]:
        out = {"train": list(self.batches(ctx, state))}
        n = self.opts.eval_batches
        if ctx.eval_set is None or n == 0:
            return out
        if n is None:  # the same kind of data as the training side
            out["eval"] = self.measurement_full(ctx, ctx.eval_set) if self.opts.data != "subset" \
                else self.measurement_subset(ctx, ctx.eval_set, purpose=f"{self.name}-eval")
        elif n < 0:
            out["eval"] = self.measurement_full(ctx, ctx.eval_set)
        else:
            size = self.measure_batch_size(ctx)
            key = f"{self.name}:eval:{n}:{size}"
            if key not in ctx.cache:
                seed = derived_seed(ctx.config.seed, "eval-subset", self.name)
                ctx.cache[key] = fixed_batches(ctx.eval_set, size, n, seed, ctx.device)
            out["eval"] = ctx.cache[key]
        return out

    def params(self, ctx) -> list[torch.Tensor]:
        try:
            return [p for _, p in select_parameters(ctx.model, self.opts.params)]
        except ValueError as e:
            raise UsageError(f"{self.name}.params: {e}") from None



def load_model_state(path: str, checkpoint: str = "latest", device: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a run store's checkpoint (``latest`` or a step) or of a ``.pt`` file."""
    if os.path.isdir(path):
        import zarr
        from lscape.checkpoint import load_checkpoint

        root = zarr.open_group(path, mode="r")
        name = None
        if checkpoint != "latest":
            name = f"step_{int(checkpoint):09d}"
        state = load_checkpoint(root, name)
        if state is None:
            raise UsageError(f"{path} has no checkpoint {checkpoint}")
        sd = state["model"]
    else:
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise UsageError(f"cannot load {path} as a state dict: {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} is not a model state dict (a mapping of names to tensors, as torch.save(model.state_dict()) writes)")
    return {k: v.to(device) for k, v in sd.items()}


def require_matching_state(what: str, state: dict[str, torch.Tensor], model: Any) -> None:
    """Refuse, in one line, a state dict whose names or shapes are not the model's."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        name = (missing or extra)[0]
        raise UsageError(f"{what} is not a state of this model: {'it lacks' if missing else 'the model has no'} "
                         f"'{name}' ({len(missing)} missing, {len(extra)} unexpected entries)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UsageError(f"{what} is not a state of this model: '{k}' has shape {tuple(state[k].shape)}, "
                             f"the model's is {tuple(v.shape)}")
