"""The one batch→loss adapter: how any batch becomes the model's output and the loss.

Every place that runs the model on data — the engine's training closure, the step owners
(SAM, SmoothOut, Entropy-SGD), the curvature operator, per-sample statistics, landscape
slices, evaluation — goes through a :class:`BatchAdapter`, so a workload that trains also
measures. Batches may be

- a tuple or list ``(x, y, *rest)``: the model is called as ``model(x)`` and the loss as
  ``loss_fn(output, y)``;
- a dict (HuggingFace style): the model is called as ``model(**inputs)`` where ``inputs``
  is the dict without its target key (``labels`` by default) when a loss is named, or the
  whole dict with the ``model`` loss, which takes the ``.loss`` of the model's output
  (a ``ModelOutput``, or any object or dict with a ``loss``);
- anything else, through a user adapter ``fn(model, batch) -> (output, target)`` given as
  ``--adapter module:fn`` (``adapter=`` in ``lscape.run``/``lscape.attach``).

Outputs that are a ``ModelOutput``/dict give their ``logits`` to a named loss; a tuple
output gives its first element (torchvision's Inception/GoogLeNet aux outputs, HF
``return_dict=False``).

Batch structure helpers live here too: :func:`batch_size_of`, :func:`index_batch`,
:func:`chunks`, :func:`to_device`, :func:`shard`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import UsageError

__all__ = ["BatchAdapter", "MODEL_LOSS", "as_adapter", "batch_size_of", "index_batch", "chunks", "to_device",
           "shard", "first_tensor", "sequence_of_batches"]

#: the loss name meaning "the model computes its own loss" (``output.loss``)
MODEL_LOSS = "model"
#: target keys looked for in dict batches, in order
TARGET_KEYS = ("labels", "label", "y", "target", "targets")


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in a batch (depth first), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: its first tensor's leading dimension."""
    t = first_tensor(batch)
    if t is None or t.dim() == 0:
        raise UsageError(f"a batch of {type(batch).__name__} holds no tensor with a batch dimension")
    return int(t.shape[0])


def index_batch(batch: Any, index: Any) -> Any:
    """The samples ``index`` (a slice, a tensor of indices) of every tensor in a batch;
    tensors without the batch's leading size and non-tensors are kept whole."""
    n = batch_size_of(batch)

    def pick(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item[index] if item.dim() > 0 and item.shape[0] == n else item
        if isinstance(item, Mapping):
            return type(item)({k: pick(v) for k, v in item.items()}) if type(item) is not dict else \
                {k: pick(v) for k, v in item.items()}
        if isinstance(item, tuple) and hasattr(item, "_fields"):  # namedtuple
            return type(item)(*(pick(v) for v in item))
        if isinstance(item, (tuple, list)):
            return type(item)(pick(v) for v in item)
        return item

    return pick(batch)


def chunks(batch: Any, size: int | None) -> list[Any]:
    """The batch split along its leading dimension into pieces of at most ``size`` samples
    (the batch itself when ``size`` is None or not smaller)."""
    n = batch_size_of(batch)
    if size is None or size >= n:
        return [batch]
    return [index_batch(batch, slice(start, min(n, start + size))) for start in range(0, n, size)]


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Move every tensor of a batch (tuple/list/dict/namedtuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device, non_blocking) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    return batch


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's part of a global batch (samples ``rank::world_size``): under torchrun every
    rank draws the same global batch and keeps its shard, a distributed sampler per batch."""
    if world_size <= 1:
        return batch
    return index_batch(batch, slice(rank, None, world_size))


def _logits(output: Any) -> Any:
    """The tensor a named loss compares with the target."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UsageError(f"the model returned {type(output).__name__}, which has no tensor output or `logits` "
                     f"for the loss; use --loss model (its own .loss) or an --adapter module:fn")


def _own_loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise UsageError(f"--loss model takes the model's own loss, but its output ({type(output).__name__}) "
                         f"has no `loss`; give the batch its labels, or name a loss (--loss ce)")
    return loss


class BatchAdapter:
    """Turns a batch into ``(output, target)`` and the loss, for any batch and model.

    ``loss_fn(output, target)`` is a batch-mean loss, or None for the model's own loss
    (``--loss model``); ``adapter(model, batch) -> (output, target)`` replaces the default
    splitting; ``target_key`` names the target of dict batches (default: the first of
    ``labels``, ``label``, ``y``, ``target``, ``targets`` present).

    ``model`` in every method is anything callable like the model: the module itself, a
    DDP wrapper, or a ``torch.func.functional_call`` closure.
    """

    def __init__(self, loss_fn: Callable | None, adapter: Callable | None = None, target_key: str | None = None):
        self.loss_fn = loss_fn
        self.adapter = adapter
        self.target_key = target_key

    @property
    def separable(self) -> bool:
        """Whether the loss is a function of a tensor output and a target (what the GGN and
        per-output statistics need); false for the model's own loss."""
        return self.loss_fn is not None

    def _key(self, batch: Mapping) -> str | None:
        if self.target_key is not None:
            if self.target_key not in batch:
                raise UsageError(f"the batch has no target key '{self.target_key}' (keys: {', '.join(batch)})")
            return self.target_key
        return next((k for k in TARGET_KEYS if k in batch), None)

    def forward(self, model: Callable, batch: Any) -> tuple[Any, Any]:
        """``(raw output, target)``: the model run on the batch's inputs."""
        if self.adapter is not None:
            out = self.adapter(model, batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise UsageError("an --adapter must return (output, target)")
            return out[0], out[1]
        if isinstance(batch, Mapping):
            key = self._key(batch)
            if self.loss_fn is None:  # the model's own loss needs its labels
                return model(**batch), None if key is None else batch[key]
            if key is None:
                raise UsageError(f"a dict batch needs a target ({', '.join(TARGET_KEYS)}) for the loss, "
                                 f"or --loss model for the model's own loss (keys: {', '.join(batch)})")
            inputs = {k: v for k, v in batch.items() if k != key}
            return model(**inputs), batch[key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return model(batch[0]), batch[1]
        if self.loss_fn is None:
            return model(batch), None
        raise UsageError(f"a batch of {type(batch).__name__} is neither (inputs, target) nor a dict; "
                         f"give an --adapter module:fn returning (output, target)")

    def output(self, model: Callable, batch: Any) -> tuple[torch.Tensor, Any]:
        """``(output tensor, target)``: the tensor a named loss takes (``logits`` of a
        ``ModelOutput``, the first element of a tuple)."""
        out, target = self.forward(model, batch)
        return _logits(out), target

    def criterion(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        """The loss of a tensor output (needs a named loss)."""
        if self.loss_fn is None:
            raise UsageError("this measurement needs the loss as a function of the model's output: "
                             "name a loss (--loss ce) instead of --loss model")
        return self.loss_fn(output, target)

    def loss(self, model: Callable, batch: Any) -> torch.Tensor:
        """The batch-mean loss of ``model`` on ``batch`` (a scalar tensor)."""
        return self.loss_and_output(model, batch)[0]

    def loss_and_output(self, model: Callable, batch: Any) -> tuple[torch.Tensor, Any]:
        """``(loss, (output tensor or None, target))`` in one forward pass."""
        out, target = self.forward(model, batch)
        if self.loss_fn is None:
            loss = _own_loss(out)
            logits = None
            try:
                logits = _logits(out)
            except UsageError:
                pass
            return loss, (logits, target)
        logits = _logits(out)
        return self.loss_fn(logits, target), (logits, target)

    def __repr__(self) -> str:
        loss = getattr(self.loss_fn, "__name__", repr(self.loss_fn)) if self.loss_fn is not None else MODEL_LOSS
        return f"BatchAdapter(loss={loss}, adapter={getattr(self.adapter, '__name__', None)})"


def as_adapter(loss_or_adapter: Any) -> BatchAdapter:
    """A ``BatchAdapter`` from one, or from a plain ``loss_fn(output, target)``."""
    if isinstance(loss_or_adapter, BatchAdapter):
        return loss_or_adapter
    return BatchAdapter(loss_or_adapter)


def sequence_of_batches(batches: Any) -> Sequence[Any] | Any:
    """Batches as given; a single batch (one (x, y) pair or one dict) becomes a list of one."""
    if isinstance(batches, Mapping):
        return [batches]
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches):
        return [tuple(batches)]
    return batches
