"""The `grad-noise` probe: the imagenet-grad-noise statistics of the full gradient, the minibatch
noise, and the curvature along them (see docs/plugins/grad-noise.md)."""

from __future__ import annotations

from typing import Any


from lscape import Option, Output, Probe, hookimpl, preserve_state
from lscape.curvature import HessianOperator, gradient
from lscape.data import derived_seed, full_batches
from lscape.params import flatten, select_parameters

from ._estimators import (
    ResampledHessian,
    directional_sharpness,
    gradient_norms,
    minibatch_noise,
    seed_power_method,
    sharpness,
)

from ._common import PARAMS, SMOOTH, BatchSampler, is_measure_only, panels

__all__ = ["GradNoise", "plot_grad_noise"]


class GradNoise(Probe):
    """Gradient noise, gradient norms and sharpness on fresh training batches (Zhang et al. 2022)."""

    name = "grad-noise"
    needs_train_data = True  # fresh batches from the training set (lscape.attach checks it is given)
    help = "imagenet-grad-noise statistics: noise_sq, stograd_*, grad_*, update_size, sharpness, dir_sharpness"
    schedule = "every:100"
    at = "after_backward"
    options = (
        Option("noise_size", int, 8, "N: batches for ĝ, and N further batches for the noise", minimum=1),
        Option("sharpness_batches", int, 4, "batches of the Hessian whose top eigenvalue is 'sharpness'", minimum=1),
        Option("sharpness_iters", int, 5, "power-method iterations at most (the seed: 5)", minimum=1),
        Option("sharpness_tol", float, 1e-2, "stop at this relative change of the Rayleigh quotient", minimum=0),
        Option("dir_pairs", int, 4, "K batch pairs for dir_sharpness (0 skips it)", minimum=0),
        Option("full_grad", bool, False, "ĝ over the whole training set instead of noise_size batches"),
        Option("mode", str, "eval", "module mode of every measurement", choices=("eval", "train")),
        Option("compat", str, "none", "'original': the seed's train.py — train mode, fresh batches everywhere, "
               "its power method, all but ĝ(θ_t) measured at θ_{t+1}", choices=("none", "original")),
        PARAMS,
        SMOOTH,
    )
    outputs = (
        Output("noise_sq", long_name="minibatch noise mean_j ‖g_{B'_j} − ĝ‖²"),
        Output("stograd_sq", long_name="mean_j ‖g_{B'_j}‖²"),
        Output("stograd_linf", long_name="mean_j ‖g_{B'_j}‖_∞"),
        Output("grad_sq", long_name="‖ĝ‖²"),
        Output("grad_l1", long_name="‖ĝ‖₁"),
        Output("grad_linf", long_name="‖ĝ‖_∞"),
        Output("update_size", long_name="η‖g_B‖ of the training batch"),
        Output("change_in_grad_sq", long_name="‖ĝ(θ_{t+1}) − ĝ(θ_t)‖²"),
        Output("sharpness", long_name="power-method top Hessian eigenvalue (Rayleigh quotient)"),
        Output("sharpness_residual", long_name="‖Hv − μv‖ of the returned vector"),
        Output("dir_sharpness", long_name="mean ‖H_{B'} v‖/‖g_{B'}‖, v = g_B/‖g_B‖"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self._sampler: BatchSampler | None = None
        self._resume: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None

    # -- engine side: the row of step t is complete only once θ_{t+1} exists -------------

    def run_measure(self, ctx, state):
        """Measure at θ_t; the row is recorded at step end with ‖ĝ(θ_{t+1}) − ĝ(θ_t)‖²."""
        self._flush_pending(ctx)
        with preserve_state(ctx.model):
            values = self.measure(ctx, state)
        if is_measure_only(ctx):  # `lscape measure`: no θ_{t+1} will come
            self._flush_pending(ctx)
        return values

    @hookimpl
    def on_step_end(self, ctx, state):
        pending = self._pending
        if pending is None or pending["step"] != state.step:
            return
        with preserve_state(ctx.model):
            if pending.get("original"):
                # the seed's save_stats on θ_{t+1}: everything but ĝ(θ_t), on fresh batches
                self._measure_statistics(ctx, state, pending["values"], next_of=pending["g_hat"])
            else:
                g_next = self._mean_grad(ctx, pending["batches"])
                pending["values"]["change_in_grad_sq"] = float(((g_next - pending["g_hat"]).double() ** 2).sum())
        self._flush_pending(ctx)

    @hookimpl
    def on_run_end(self, ctx):
        self._flush_pending(ctx)

    def _flush_pending(self, ctx):
        if self._pending is not None:
            self._pending["values"].setdefault("change_in_grad_sq", float("nan"))  # no θ_{t+1} came
            self.record(ctx, self._pending["step"], **self._pending["values"])
            self._pending = None

    # -- the measurement ------------------------------------------------------------------

    def measure(self, ctx, state):
        o = self.opts
        original = o.compat == "original"
        sampler = self._get_sampler(ctx)
        ghat_batches = None if o.full_grad else sampler.draw(o.noise_size)
        g_hat = self._mean_grad(ctx, ghat_batches)
        values: dict[str, Any] = {}
        update_size = self._update_size(ctx, state)
        if update_size is not None:
            values["update_size"] = update_size
        if original and not is_measure_only(ctx):
            # the seed: ĝ(θ_t) before the update; the rest once θ_{t+1} exists (on_step_end)
            self._pending = {"step": state.step, "values": values, "g_hat": g_hat, "original": True}
            return values
        self._measure_statistics(ctx, state, values, g_hat=g_hat)
        self._pending = {"step": state.step, "values": values, "g_hat": g_hat, "batches": ghat_batches}
        return values

    def check(self, ctx) -> None:
        from lscape.limits import require_memory, sample_bytes

        # the sampler's batches of one draw are held at once (ĝ's, the noise's, the sharpness's)
        o = self.opts
        held = max(o.noise_size, o.sharpness_batches, 2 * o.dir_pairs)
        require_memory(held * self._batch_size(ctx) * sample_bytes(ctx.train_set),
                       f"grad-noise's {held} batches held at once", "grad-noise.noise_size (or sharpness_batches, "
                       "dir_pairs, measure_batch_size)", ctx.device)

    def _update_size(self, ctx, state) -> float | None:
        """η‖g_B‖ of the training batch's gradient, before weight decay and momentum touch it."""
        named = select_parameters(ctx.model, self.opts.params)
        params = [p for _, p in named]
        if state.batch is not None and any(p.grad is not None for p in params):
            g_b = flatten([p.grad for p in params], like=params)
        elif state.batch is not None:
            g_b = gradient(ctx.model, ctx.adapter, [state.batch], params=named, mode="train")
        else:
            return None
        lr = state.lr if state.lr is not None else ctx.lr
        return lr * float(g_b.double().norm())

    def _measure_statistics(self, ctx, state, values, g_hat=None, next_of=None) -> None:
        """Noise, gradient norms, sharpness and dir_sharpness at the model's current θ, into ``values``.

        Default: ``g_hat`` is ĝ here, the sharpness is lscape's power method on a fixed
        operator from ĝ. ``compat=original`` (the seed's ``save_stats``, in its order):
        dir_sharpness, then the seed's power method from ĝ over ``sharpness_batches`` fresh
        batches on a Hessian re-sampled at every product, then ĝ here on fresh batches and the
        noise; with ``next_of`` (ĝ(θ_t)) also ``change_in_grad_sq`` = ‖ĝ − ĝ(θ_t)‖².
        """
        o = self.opts
        original = o.compat == "original"
        mode = "train" if original else o.mode
        named = select_parameters(ctx.model, o.params)
        sampler = self._get_sampler(ctx)

        def dir_sharpness():
            if o.dir_pairs > 0:
                # the seed's dir_hessian takes sharpness_batches pairs
                pairs_wanted = o.sharpness_batches if original else o.dir_pairs
                drawn = sampler.draw(2 * pairs_wanted)
                pairs = list(zip(drawn[0::2], drawn[1::2]))
                values["dir_sharpness"] = directional_sharpness(ctx.model, ctx.adapter, pairs, params=named, mode=mode)

        if original:
            dir_sharpness()
            v0 = self._mean_grad(ctx, sampler.draw(o.sharpness_batches))
            op = ResampledHessian(ctx.model, ctx.adapter, sampler.draw, o.sharpness_batches, params=named,
                                  mode="train")
            if float(v0.norm()) > 0:
                sharp = seed_power_method(op, v0, iters=o.sharpness_iters, tol=o.sharpness_tol)
                values["sharpness"], values["sharpness_residual"] = sharp.value, sharp.residual
            if g_hat is None:
                g_hat = self._mean_grad(ctx, None if o.full_grad else sampler.draw(o.noise_size))
        values.update(gradient_norms(g_hat))
        grads = (gradient(ctx.model, ctx.adapter, [b], params=named, mode=mode) for b in sampler.draw(o.noise_size))
        values.update(minibatch_noise(g_hat, grads))
        if next_of is not None:
            values["change_in_grad_sq"] = float(((g_hat - next_of).double() ** 2).sum())
        if not original:
            op = HessianOperator(ctx.model, ctx.adapter, sampler.draw(o.sharpness_batches), params=named, mode=mode)
            if float(g_hat.norm()) > 0:
                sharp = sharpness(op, g_hat, iters=o.sharpness_iters, tol=o.sharpness_tol)
                values["sharpness"] = sharp.value
                values["sharpness_residual"] = sharp.residual
            dir_sharpness()

    def _mean_grad(self, ctx, batches):
        """ĝ over ``batches``, or over the whole training set when None."""
        mode = "train" if self.opts.compat == "original" else self.opts.mode
        if batches is None:
            batches = ctx.cache.setdefault(f"full:{self._batch_size(ctx)}",
                                           list(full_batches(ctx.train_set, self._batch_size(ctx), ctx.device)))
        return gradient(ctx.model, ctx.adapter, batches, params=select_parameters(ctx.model, self.opts.params),
                        mode=mode)

    def _batch_size(self, ctx) -> int:
        # the minibatch size B of the noise g_B − ĝ: the training one unless given
        return self.opts.measure_batch_size or ctx.batch_size

    def _get_sampler(self, ctx) -> BatchSampler:
        if self._sampler is None:
            self._sampler = BatchSampler(ctx.train_set, self._batch_size(ctx),
                                         derived_seed(ctx.config.seed, "sampler", self.name), ctx.device)
            if self._resume is not None:  # a resumed run continues the same batch sequence
                self._sampler.load_state_dict(self._resume)
        return self._sampler

    def state_dict(self):
        # Before the first measurement after a resume the sampler is not built yet: the
        # state loaded at the resume is still the state, and must go into the next checkpoint.
        if self._sampler is not None:
            return {"sampler": self._sampler.state_dict()}
        return {"sampler": self._resume}

    def load_state_dict(self, state):
        self._resume = state.get("sampler")
        if self._sampler is not None:  # loaded after the sampler exists: continue from the loaded state
            if self._resume is None:
                self._sampler = None
            else:
                self._sampler.load_state_dict(self._resume)



#: (title, arrays, y label); a group "train:loss" reads the training group instead
GRAD_NOISE_PANELS = (
    ("noise and gradient (squared norms)", ("noise_sq", "stograd_sq", "grad_sq"), "squared norm"),
    ("ℓ∞ and ℓ₁ norms", ("stograd_linf", "grad_linf", "grad_l1"), "norm"),
    ("sharpness", ("sharpness", "dir_sharpness"), "curvature"),
    ("update size and change in ĝ", ("update_size", "change_in_grad_sq"), "size"),
    ("training loss", ("train:loss",), "minibatch loss"),
)

def plot_grad_noise(runs, out_dir):
    """The grad-noise statistics against step, one panel per family (and the training loss),
    optionally smoothed."""
    return [panels(runs, out_dir, "grad-noise", GRAD_NOISE_PANELS, "grad_noise.png")]


@hookimpl
def register_probes(register):
    register(GradNoise)


@hookimpl
def register_plots(register):
    register("grad-noise", plot_grad_noise)
