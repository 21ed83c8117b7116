"""Sharded training (``--strategy fsdp``) on PyTorch's own FSDP2 and Distributed Checkpoint.

``--strategy ddp`` (the default) keeps a full model on every rank and wraps the training
forward in ``DistributedDataParallel`` under torchrun. ``--strategy fsdp`` shards the model
in place with ``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer
state become ``DTensor`` shards (``Shard(0)``), gathered block by block inside the forward
and backward. Nothing here shards by hand; this module only decides *which* modules become
FSDP units (:func:`fsdp_blocks`), the mixed-precision policy, and the checkpoint calls.

**The wrapping rule** (:func:`fsdp_blocks`): a model that defines
``lscape_fsdp_blocks()`` gets exactly the modules it returns. Otherwise every direct child
of the root that holds parameters is one block, except an ``nn.ModuleList``/``nn.ModuleDict``
(a stack of layers: transformer blocks), whose own children with parameters are the blocks,
recursively. Each block gets ``fully_shard``, then the root (which collects the parameters no
block took: embeddings, heads, loose parameters).

**Checkpoints** (:func:`save_sharded`, :func:`load_sharded`): model and optimizer state go
through ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``), every rank
writing its shards into ``STORE/checkpoints/step_N.dcp/`` (a zarr group holding the DCP
files, so the store still opens as one zarr hierarchy); rank 0 also keeps the gathered full
model in the usual checkpoint array, so ``lscape show/plot/measure`` read an FSDP store as
any other.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import torch
from torch import nn

from .config import STRATEGIES
from .errors import UsageError

__all__ = ["STRATEGIES", "fsdp_blocks", "shard_model", "is_sharded", "check_sharded_plugins", "check_sharded_options",
           "init_single_group",
           "save_sharded", "load_sharded", "full_model_state", "DCP_SUFFIX"]

#: a sharded checkpoint of ``checkpoints/step_N`` is the zarr group ``checkpoints/step_N.dcp``
DCP_SUFFIX = ".dcp"

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units before the root, per the wrapping rule above."""
    custom = getattr(model, "lscape_fsdp_blocks", None)
    if callable(custom):
        blocks = list(custom())
        owned = {id(m) for m in model.modules()}
        for block in blocks:
            if not isinstance(block, nn.Module) or id(block) not in owned or block is model:
                raise UsageError("lscape_fsdp_blocks() must return submodules of the model (not the model itself)")
        return blocks

    def walk(module: nn.Module) -> Iterable[nn.Module]:
        for child in module.children():
            if not _has_params(child):
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                yield from walk(child)
            else:
                yield child

    return list(walk(model))


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """``fully_shard`` every block of :func:`fsdp_blocks`, then the root, in place; with
    ``bf16``/``fp16`` the policy computes in that dtype (parameters all-gathered in it),
    reduces gradients in float32 and returns float32 outputs, so the loss is float32.
    Needs an initialised process group; returns ``model`` (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = _PRECISION.get(precision)
    policy = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
              if dtype is not None else MixedPrecisionPolicy())
    for block in fsdp_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(model, FSDPModule)


def check_sharded_plugins(plugins: Iterable[Any]) -> None:
    """Under ``--strategy fsdp``: a plugin (class or instance) that does not declare
    ``sharded = True`` is refused in one line, before anything is built or written (its
    ``sharded_note`` says why)."""
    for plugin in plugins:
        if not getattr(plugin, "sharded", False):
            note = getattr(plugin, "sharded_note", "") or "it was not written for sharded (DTensor) parameters"
            drop = f"--disable {plugin.name}" if getattr(plugin, "always_on", False) else f"leave out --plugin {plugin.name}"
            raise UsageError(f"plugin '{plugin.name}' does not run on a sharded model (--strategy fsdp): {note}; "
                             f"{drop}, or use --strategy ddp")


def check_sharded_options(plugins: Iterable[Any]) -> None:
    """Under ``--strategy fsdp``, after the plugins are made: a plugin that runs sharded may
    still have options that cannot (``sharpness.method=double-backward``,
    ``hessian.eigenvectors=true``); its ``sharded_refusal()`` names the first such option
    (or returns None), refused here in one line before anything is written."""
    for plugin in plugins:
        refusal = getattr(plugin, "sharded_refusal", None)
        problem = refusal() if callable(refusal) else None
        if problem:
            raise UsageError(f"{plugin.name}: {problem} does not run on a sharded model (--strategy fsdp); "
                             f"leave it out, or use --strategy ddp")


def init_single_group(device: str) -> None:
    """A one-process group (FSDP2 needs one even on a single device): an in-memory store,
    nothing listens on a port."""
    dist = torch.distributed
    if dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1, timeout=datetime.timedelta(minutes=30))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on the CPU of rank 0 (``{}`` on other ranks): a
    collective, every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimizer state with Distributed Checkpoint into the folder ``path``
    (every rank its own shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)


def load_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` and ``optimizer``;
    DCP reshards when the number of processes differs from the saving run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not os.path.isdir(path):
        raise UsageError(f"the sharded checkpoint {path} is missing (an FSDP run's checkpoint needs its .dcp folder)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
