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
        batch = state.batch
        n = batch_size_of(batch)
        mb = self.opts.mb
        zero = lambda: ctx.optimizer.zero_grad(set_to_none=True)  # noqa: E731
        extra, extra_sizes = [], []
        for _ in range(self.opts.batch_multiplier - 1):
            # the seed's --batch-multiplier: more minibatches from the training stream, accumulated
            more, _, _ = ctx.stream.next()
            more = shard(more, ctx.rank, ctx.world_size)
            c, sz = ghost_closures(ctx.model, ctx.adapter, more, mb or batch_size_of(more), zero_grad=zero)
            extra += c
            extra_sizes += sz
        if (not mb or mb >= n) and not extra:
            loss = self.optim.step(closure)
        elif not mb or mb >= n:
            loss = self.optim.step([closure, *extra], [n, *extra_sizes])
        else:
            rest, sizes = ghost_closures(ctx.model, ctx.adapter, index_batch(batch, slice(mb, None)), mb, zero_grad=zero)
            rest, sizes = rest + extra, sizes + extra_sizes

            # The first chunk goes through the engine's closure, so on_after_backward fires
            # once per step (with state.batch the chunk and the weights noisy).
            def first():
                state.batch = index_batch(batch, slice(0, mb))
                try:
                    return closure()
                finally:
                    state.batch = batch

            loss = self.optim.step([first, *rest], [min(mb, n), *sizes])
        self.after_step(ctx, state, due)
        return float(loss)


@hookimpl
def register_step_owners(register):
    register(SmoothOutStep)
