"""`sam`, `smoothout`, `entropy-sgd`: the optimizer variants of lscape.plugins.optim as step owners."""

from __future__ import annotations

import math
from typing import Any

import torch

from lscape import Option, Output, StepOwner, hookimpl
from lscape.errors import UsageError
from lscape.plugins.optim import SAM, EntropySGD, SmoothOut, ghost_closures, sam_edge
from lscape.batch import batch_size_of, index_batch, shard
from lscape.plugins.optim.smoothout import DISTRIBUTIONS, SCHEDULES, SHAPES, noisy_relus
from lscape.schedule import Schedule

__all__ = ["SamStep", "SmoothOutStep", "EntropySgdStep"]


class _VariantStep(StepOwner):
    """A step owner that wraps ``ctx.optimizer`` in a variant and records its ``stats``."""

    stats_schedule = "every:10"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.schedule = Schedule.parse(self.opts.stats)
        self.optim = None
        self._pending_state: dict[str, Any] | None = None

    @classmethod
    def all_options(cls):
        own = tuple(cls.options)
        extra = () if any(o.name == "stats" for o in own) else (
            Option("stats", str, cls.stats_schedule, "when the variant's statistics are recorded (never: not at all)"),)
        return own + extra

    def store_attrs(self) -> dict[str, Any]:
        attrs = super().store_attrs()
        attrs["schedule"] = str(self.schedule)
        return attrs

    def setup(self, ctx) -> None:
        self.optim = self.build(ctx)
        if self._pending_state is not None:
            self.optim.variant_state.update(self._pending_state)

    def build(self, ctx):  # pragma: no cover - every subclass overrides it
        """The variant around ``ctx.optimizer``."""
        raise NotImplementedError

    def before_step(self, state) -> bool:
        """Whether this step's statistics are recorded (asked once: time schedules keep state)."""
        due = self.schedule.due(state.step, epoch_end=state.epoch_end, now=state.time)
        if hasattr(self.optim, "track_stats"):
            self.optim.track_stats = due  # statistics cost extra passes: only when recorded
        return due

    def after_step(self, ctx, state, due: bool) -> None:
        """Record the variant's statistics if this step is due."""
        if due and self.optim.stats:
            self.record(ctx, state.step, **self.row(ctx, state))

    def row(self, ctx, state) -> dict[str, float]:
        """The values recorded for this step."""
        return dict(self.optim.stats)

    def state_dict(self) -> dict[str, Any]:
        return {"variant": dict(self.optim.variant_state)} if self.optim is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        variant = state.get("variant")
        if variant is None:
            return
        if self.optim is None:
            self._pending_state = dict(variant)
        else:
            self.optim.variant_state.update(variant)


class SamStep(_VariantStep):
    """Sharpness-aware minimisation (normalised, same minibatch twice; adaptive=true: ASAM)."""

    name = "sam"
    help = "SAM / ASAM around the base optimizer: gradient at θ + ρ g/‖g‖ on the same minibatch"
    options = (
        Option("rho", float, 0.05, "radius ρ of the ascent step", minimum=0.0),
        Option("adaptive", bool, False, "ASAM: scale the ascent elementwise by |θ| + eta"),
        Option("eta", float, 0.01, "η of ASAM's T = |θ| + η", minimum=0.0),
        Option("eps", float, 1e-5, "added to ‖g‖ in the normalisation", minimum=0.0),
        Option("group_rho", str, None, "ρ per optimizer param group, comma-separated in group order "
               "(default: rho for all; a group's own 'rho' entry is used too)"),
        Option("asam_bias", str, "scaled", "ASAM's T on non-weights: scaled (|θ| + η, davda54/sam) or unscaled "
               "(T = 1 for parameters whose name lacks 'weight', Kwon et al.'s code)", choices=("scaled", "unscaled")),
    )
    outputs = (
        Output("grad_norm", long_name="minibatch gradient norm ‖g‖ at θ"),
        Output("perturbation_norm", long_name="ascent step ‖e‖"),
        Output("sam_edge", units="1/lr", long_name="SAM-edge (‖g‖/2ρ)(√(1+8ρ/(η‖g‖))−1)"),
    )

    def build(self, ctx):
        o = self.opts
        if o.group_rho is not None:
            try:
                values = [float(v) for v in str(o.group_rho).split(",")]
                if not all(math.isfinite(v) and v >= 0 for v in values):
                    raise ValueError
            except ValueError:
                raise UsageError(f"bad value for sam.group_rho: '{o.group_rho}' (comma-separated numbers >= 0)") from None
            groups = ctx.optimizer.param_groups
            if len(values) != len(groups):
                raise UsageError(f"sam.group_rho gives {len(values)} values but the optimizer has {len(groups)} "
                                 "param groups")
            for group, value in zip(groups, values):
                group["rho"] = value
        return SAM(ctx.optimizer, rho=o.rho, adaptive=o.adaptive, eta=o.eta, eps=o.eps, model=ctx.model,
                   asam_bias=o.asam_bias)

    def step(self, closure, ctx, state) -> float:
        due = self.before_step(state)
        loss = self.optim.step(closure)
        self.after_step(ctx, state, due)
        return loss

    def row(self, ctx, state):
        lr = state.lr if state.lr is not None else ctx.lr
        return {**self.optim.stats, "sam_edge": sam_edge(self.optim.stats["grad_norm"], lr, self.opts.rho)}


class SmoothOutStep(_VariantStep):
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


class EntropySgdStep(_VariantStep):
    """Entropy-SGD: L Langevin steps on fresh minibatches estimate the local-entropy gradient."""

    name = "entropy-sgd"
    help = "Entropy-SGD: L Langevin steps (fresh minibatches) around x, then a base step along x − μ"
    fresh_batches = True
    stats_schedule = "every:50"
    options = (
        Option("L", int, 20, "Langevin steps per update (0: the base optimizer alone)", minimum=0),
        Option("gamma", float, 1e-4, "scope γ₀ of the coupling term", minimum=0.0),
        Option("scoping", float, 1e-3, "γ_t = γ₀ (1 + scoping)^t", minimum=0.0),
        Option("noise", float, 1e-4, "Langevin temperature", minimum=0.0),
        Option("langevin_lr", float, 0.1, "learning rate η' of the Langevin loop", minimum=0.0),
        Option("beta", float, 0.75, "averaging factor of μ", minimum=0.0),
        Option("momentum", float, None, "Langevin momentum (default: the base optimizer's)", minimum=0.0),
        Option("nesterov", bool, None, "Nesterov momentum in the Langevin loop (default: the base optimizer's)"),
        Option("dampening", float, None, "Langevin momentum dampening τ: m = mom·m + (1 − τ)d (default: the base's)",
               minimum=0.0),
        Option("weight_decay", float, None, "weight decay in the Langevin loop (default: the base optimizer's)",
               minimum=0.0),
        Option("compat", str, "none", "'original': python/optim.py's outer buffer start, its dw = mdw aliasing "
               "without Nesterov and its constant γ", choices=("none", "original")),
    )
    outputs = (
        Output("grad_norm", long_name="‖∇f(x)‖ on the step's first minibatch"),
        Output("dist_mu", long_name="‖x − μ‖"),
        Output("cos", long_name="cos(∇f, x − μ)"),
        Output("noise_norm", long_name="norm of the last Langevin noise term"),
        Output("mean_dist", long_name="mean over the Langevin steps of ‖x − x'‖"),
        Output("gamma", long_name="γ_t"),
    )

    def batches_per_step(self) -> int:
        return 1 + self.opts.L  # the step's batch, then one fresh minibatch per Langevin step

    def build(self, ctx):
        o = self.opts
        if o.compat == "original" and not isinstance(ctx.optimizer, torch.optim.SGD):
            raise UsageError("entropy-sgd.compat=original reproduces the original's SGD update: use --optimizer sgd")
        return EntropySGD(ctx.optimizer, L=o.L, gamma=o.gamma, scoping=o.scoping, noise=o.noise,
                          langevin_lr=o.langevin_lr, beta=o.beta, momentum=o.momentum, nesterov=o.nesterov,
                          dampening=o.dampening, weight_decay=o.weight_decay, compat=o.compat)

    def step(self, closure, ctx, state) -> float:
        due = self.before_step(state)
        loss = self.optim.step(closure)
        self.after_step(ctx, state, due)
        return float(loss)


@hookimpl
def register_plots(register):
    from lscape.plugins.optim.entropy_sgd import plot_entropy_sgd

    register("entropy-sgd", plot_entropy_sgd)


@hookimpl
def register_step_owners(register):
    register(SamStep)
    register(SmoothOutStep)
    register(EntropySgdStep)
