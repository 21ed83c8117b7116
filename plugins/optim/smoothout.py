"""`smoothout`: SmoothOut / AdaSmoothOut as a step owner around the run's optimizer.

The algorithm is :class:`lscape.optim.SmoothOut`; this module adds the plugin: options,
ghost chunks of the step's batch, the seed's batch multiplier and noisy ReLUs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lscape import Option, Output, hookimpl
from lscape.batch import batch_size_of, index_batch, shard
from lscape.errors import UsageError
from lscape.optim import DISTRIBUTIONS, SCHEDULES, SHAPES, SmoothOut, ghost_closures, noisy_relus
from lscape.optim import NoisyReLU, smoothout_coefficient, smoothout_noise  # kept for older imports
from lscape.plugins.optim._variant import VariantStep

COMPAT = ("none", "original")

__all__ = ["SmoothOutStep", "SmoothOut", "smoothout_coefficient", "smoothout_noise", "ghost_closures", "NoisyReLU",
           "noisy_relus", "SCHEDULES", "SHAPES", "DISTRIBUTIONS"]


class SmoothOutStep(VariantStep):
    """SmoothOut / AdaSmoothOut: gradients averaged over noisy weights per ghost chunk."""

    name = "smoothout"
    help = "SmoothOut: noise on the weights per ghost chunk, denoise, average, clip, base step"
    options = (
        Option("ss", float, 0.006, "noise amplitude", minimum=0.0),
        Option("ss_schedule", str, "constant", "amplitude schedule over the run", choices=SCHEDULES),
        Option("shape", str, "none", "none: iid; weight: ∝|w|; filter: ∝ row norm (AdaSmoothOut)", choices=SHAPES),
        Option("distribution", str, "uniform", "noise distribution", choices=DISTRIBUTIONS),
        Option("denoise", bool, True, "remove the noise after each chunk's backward"),
        Option("mb", int, 128, "ghost-chunk size in samples (0: the whole batch)", minimum=0),
        Option("exclude_bn", bool, True, "no noise on BatchNorm weights and biases"),
        Option("clip", float, 5.0, "gradient-norm clipping (0: off)", minimum=0.0),
        Option("anneal_index", float, 0.55, "ss_schedule=anneal: coef_t = (1 + t)^(−anneal_index/2)", minimum=0.0),
        Option("tanh_scale", float, 10.0, "ss_schedule=tanh: coef_t = (tanh(tanh_scale(t/T − ½)) + 1)/2",
               minimum=0.0),
        Option("batch_multiplier", int, 1, "minibatches per update (the seed's -bm): gradients accumulate "
               "over this many batches, ghost chunk by ghost chunk, before one base step", minimum=1),
        Option("relu_noise", str, None, "a:b — replace every nn.ReLU by max(0, x·u), u ~ U(a, b) in train mode "
               "(the seed's NoisyReLU)"),
        Option("compat", str, "none", "'original': main_gbn.py's ghost batches — each minibatch cut into "
               "batch_size//mb equal parts (torch.chunk), the chunk gradients summed and divided by "
               "(chunks of the last minibatch)·(minibatches), and with batch_multiplier a shorter update at "
               "an epoch's end", choices=COMPAT),
    )
    outputs = (
        Output("amplitude", long_name="noise amplitude ss·coef_t"),
        Output("grad_norm", long_name="averaged gradient norm before clipping"),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.relu_noise = None
        if self.opts.relu_noise is not None:
            try:
                a, b = (float(v) for v in str(self.opts.relu_noise).split(":"))
                if not (math.isfinite(a) and math.isfinite(b) and a <= b):
                    raise ValueError
            except ValueError:
                raise UsageError(f"bad value for smoothout.relu_noise: '{self.opts.relu_noise}' "
                                 "(use a:b with a <= b, the slope range, like 0.8:1.2)") from None
            self.relu_noise = (a, b)

    def batches_per_step(self) -> int:
        return self.opts.batch_multiplier  # the step's batch and batch_multiplier − 1 more from the stream

    def steps_for_epochs(self, epochs: int, steps_per_epoch: int) -> int:
        if self.opts.compat == "original":
            # main_gbn.py updates at every epoch's end: ⌈steps_per_epoch / k⌉ updates per epoch
            return max(1, epochs * -(-steps_per_epoch // self.opts.batch_multiplier))
        return super().steps_for_epochs(epochs, steps_per_epoch)

    def check(self, ctx) -> None:
        if self.relu_noise is not None and not any(type(m) is torch.nn.ReLU for m in ctx.model.modules()):
            raise UsageError("smoothout.relu_noise: the model has no nn.ReLU modules to make noisy")

    def build(self, ctx):
        o = self.opts
        if o.ss_schedule == "tanh" and not ctx.total_steps:
            raise UsageError("smoothout.ss_schedule=tanh needs the run's length: pass --steps or --epochs")
        if self.relu_noise is not None:
            noisy_relus(ctx.model, *self.relu_noise)
        return SmoothOut(ctx.optimizer, ss=o.ss, schedule=o.ss_schedule, total_steps=ctx.total_steps, shape=o.shape,
                         distribution=o.distribution, denoise=o.denoise, clip=o.clip or None, model=ctx.model,
                         exclude_batchnorm=o.exclude_bn, anneal_index=o.anneal_index, tanh_scale=o.tanh_scale)

    def step(self, closure, ctx, state) -> float:
        due = self.before_step(state)
        original = self.opts.compat == "original"
        batch = state.batch
        zero = lambda: ctx.optimizer.zero_grad(set_to_none=True)  # noqa: E731
        batches, end = [batch], bool(state.epoch_end)
        while len(batches) < self.opts.batch_multiplier and not (original and end):
            # the seed's --batch-multiplier: more minibatches from the training stream, accumulated
            # (compat=original: not past the epoch's end, where main_gbn.py updates early)
            more, _, end = ctx.stream.next()
            batches.append(shard(more, ctx.rank, ctx.world_size))
        size = self._chunk_size(ctx, batch_size_of(batch), original)
        # The first chunk goes through the engine's closure, so on_after_backward fires
        # once per step (with state.batch the chunk and the weights noisy).
        if size >= batch_size_of(batch):
            closures, sizes = [closure], [batch_size_of(batch)]
        else:
            def first():
                state.batch = index_batch(batch, slice(0, size))
                try:
                    return closure()
                finally:
                    state.batch = batch

            closures, sizes = ghost_closures(ctx.model, ctx.adapter, index_batch(batch, slice(size, None)), size,
                                             zero_grad=zero)
            closures, sizes = [first, *closures], [size, *sizes]
        last = len(closures)
        for more in batches[1:]:
            c, sz = ghost_closures(ctx.model, ctx.adapter, more, self._chunk_size(ctx, batch_size_of(more), original),
                                   zero_grad=zero)
            closures, sizes, last = closures + c, sizes + sz, len(c)
        if original:
            # main_gbn.py: loss.backward() per chunk sums the chunk-mean gradients, then
            # p.grad.div_(len(mini_inputs) * n_batches), len(mini_inputs) of the last minibatch
            loss = self.optim.step(closures, [1.0] * len(closures), divisor=last * len(batches))
        elif len(closures) == 1:
            loss = self.optim.step(closure)
        else:
            loss = self.optim.step(closures, sizes)
        self.after_step(ctx, state, due)
        return float(loss)

    def _chunk_size(self, ctx, n: int, original: bool) -> int:
        """Samples per ghost chunk of an n-sample minibatch: at most ``mb`` (default), or
        main_gbn.py's ``input.chunk(batch_size // mb)`` — ⌈n / (batch_size // mb)⌉ — where
        batch_size is the run's nominal (per-rank) minibatch size (compat=original)."""
        mb = self.opts.mb
        if not mb or mb >= n and not original:
            return n
        if not original:
            return mb
        nominal = (getattr(ctx.stream, "batch_size", None) or n) // max(1, ctx.world_size)
        parts = max(1, nominal // mb)
        return -(-n // parts)


@hookimpl
def register_step_owners(register):
    register(SmoothOutStep)
