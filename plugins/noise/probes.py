"""The `grad-noise` and `grad-stats` probes and their figures."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lscape import Option, Output, Probe, hookimpl, preserve_state
from lscape.curvature import HessianOperator, gradient, lanczos
from lscape.data import derived_seed, full_batches, take, to_device
from lscape.params import flatten, select_parameters

from .grad_noise import (
    ResampledHessian,
    directional_sharpness,
    gradient_norms,
    minibatch_noise,
    seed_power_method,
    sharpness,
)
from .nonuniformity import nonuniformity, stability_margins
from .per_sample import per_sample_statistics

__all__ = ["GradNoise", "GradStats", "BatchSampler"]


class BatchSampler:
    """Fresh minibatches from the training set, the probe's own shuffled loader.

    Batches are consecutive slices of a seeded permutation, so the batches of one pass are
    disjoint; a new permutation starts when too few samples are left for a full batch. Its
    generator is separate from the training stream, which it never shifts.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, device: Any):
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = min(int(batch_size), self.n)
        self.device = device
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def draw(self, count: int) -> list[Any]:
        """``count`` fresh batches."""
        out = []
        for _ in range(count):
            if self._perm is None or self._pos + self.batch_size > self.n:
                self._perm = torch.randperm(self.n, generator=self.generator)
                self._pos = 0
            idx = self._perm[self._pos : self._pos + self.batch_size]
            self._pos += self.batch_size
            out.append(to_device(take(self.dataset, idx), self.device))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"], int(state["pos"])


_SMOOTH = Option("smooth", int, 1, "moving-average window of the figures (stored data stays raw)", minimum=1)
_PARAMS = Option("params", str, None, "parameter subset: comma-separated glob patterns on names")


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
        _PARAMS,
        _SMOOTH,
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
        if _is_measure_only(ctx):  # `lscape measure`: no θ_{t+1} will come
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
        if original and not _is_measure_only(ctx):
            # the seed: ĝ(θ_t) before the update; the rest once θ_{t+1} exists (on_step_end)
            self._pending = {"step": state.step, "values": values, "g_hat": g_hat, "original": True}
            return values
        self._measure_statistics(ctx, state, values, g_hat=g_hat)
        self._pending = {"step": state.step, "values": values, "g_hat": g_hat, "batches": ghat_batches}
        return values

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


class GradStats(Probe):
    """Per-sample gradient statistics: tr Σ, GSNR, B_simple, NormTest, InnerTest, non-uniformity."""

    name = "grad-stats"
    help = "per-sample gradient variance, GSNR, noise scale B_simple, norm/inner tests, optional non-uniformity"
    schedule = "every:10"
    data = "minibatch"
    at = "after_backward"
    options = (
        Option("chunk_size", int, 32, "per-sample gradients held at once (bounds memory)", minimum=1),
        Option("mode", str, "eval", "module mode: eval (BatchNorm needs it) or train", choices=("eval", "train")),
        Option("method", str, "auto", "per-sample gradients by torch.func vmap, a loop of backward passes, or "
               "auto (vmap, the loop where the model cannot be vmapped)", choices=("auto", "vmap", "loop")),
        Option("eps", float, 0.0, "added to each variance in GSNR", minimum=0),
        Option("nonuniformity", bool, False, "also non-uniformity, λ_max and the stability margins (costly)"),
        Option("nu_iters", int, 20, "Lanczos products at most for non-uniformity and λ_max", minimum=1),
        Option("nu_tol", float, 1e-3, "Lanczos residual tolerance (relative)", minimum=0),
        _PARAMS,
        _SMOOTH,
    )
    outputs = (
        Output("num_samples", dtype="int64", long_name="samples n"),
        Output("trace_cov", long_name="per-sample gradient variance tr Σ"),
        Output("grad_sq", long_name="‖g‖² of the mean gradient"),
        Output("grad_sq_unbiased", long_name="‖g‖² − tr Σ/n"),
        Output("b_simple", long_name="gradient noise scale B_simple = tr Σ/‖g‖²"),
        Output("gsnr", long_name="mean gradient signal-to-noise ratio"),
        Output("norm_test", long_name="NormTest θ"),
        Output("inner_test", long_name="InnerTest θ"),
        Output("gsnr_param", dims=("param",), long_name="mean GSNR per parameter tensor"),
        Output("trace_cov_param", dims=("param",), long_name="tr Σ per parameter tensor"),
        Output("nonuniformity", long_name="sqrt λ_max((1/n)Σ H_i² − H²)"),
        Output("sharpness", long_name="λ_max(H) by Lanczos"),
        Output("sharpness_margin", long_name="λ_max·η/2 (stable ≤ 1)"),
        Output("nonuniformity_margin", long_name="non-uniformity·η/√B (stable ≤ 1)"),
    )

    def measure(self, ctx, state):
        o = self.opts
        named = select_parameters(ctx.model, o.params)
        batches = self.batches(ctx, state)
        fallback: list[str] = []  # why method=auto used the loop, if it did
        st = per_sample_statistics(ctx.model, ctx.adapter, batches, params=named, chunk_size=o.chunk_size,
                                   mode=o.mode, eps=o.eps, method=o.method, fallback=fallback)
        writer = self.group(ctx)
        if writer is not None and "param_names" not in writer.group.attrs:
            writer.group.attrs["param_names"] = list(st.gsnr_groups)
        if writer is not None and o.method == "auto" and "method_used" not in writer.group.attrs:
            writer.group.attrs["method_used"] = "loop" if fallback else "vmap"
            if fallback:
                writer.group.attrs["method_fallback_reason"] = fallback[-1]
        values: dict[str, Any] = {
            "num_samples": st.n, "trace_cov": st.trace_cov, "grad_sq": st.grad_sq,
            "grad_sq_unbiased": st.grad_sq_unbiased, "b_simple": st.b_simple, "gsnr": st.gsnr,
            "norm_test": st.norm_test, "inner_test": st.inner_test,
            "gsnr_param": torch.tensor(list(st.gsnr_groups.values()), dtype=torch.float64),
            "trace_cov_param": torch.tensor(list(st.trace_cov_groups.values()), dtype=torch.float64),
        }
        if o.nonuniformity:
            nu = nonuniformity(ctx.model, ctx.adapter, batches, params=named, chunk_size=o.chunk_size, mode=o.mode,
                               iters=o.nu_iters, tol=o.nu_tol)
            op = HessianOperator(ctx.model, ctx.adapter, batches, params=named, mode=o.mode)
            lam = float(lanczos(op, k=1, which="LA", tol=o.nu_tol, max_iter=o.nu_iters).eigenvalues[0])
            lr = state.lr if state.lr is not None else ctx.lr
            values.update(nonuniformity=nu.value, sharpness=lam,
                          **stability_margins(lam, nu.value, lr, ctx.batch_size))
        return values


def _is_measure_only(ctx) -> bool:
    """Whether this is `lscape measure` (no training step follows a measurement)."""
    try:
        return ctx.store is not None and ctx.store.attrs.get("kind") == "measure"
    except Exception:
        return False


@hookimpl
def register_probes(register):
    register(GradNoise)
    register(GradStats)


@hookimpl
def register_plots(register):
    register("grad-noise", plot_grad_noise)
    register("grad-stats", plot_grad_stats)


#: (title, arrays, y label); a group "train:loss" reads the training group instead
GRAD_NOISE_PANELS = (
    ("noise and gradient (squared norms)", ("noise_sq", "stograd_sq", "grad_sq"), "squared norm"),
    ("ℓ∞ and ℓ₁ norms", ("stograd_linf", "grad_linf", "grad_l1"), "norm"),
    ("sharpness", ("sharpness", "dir_sharpness"), "curvature"),
    ("update size and change in ĝ", ("update_size", "change_in_grad_sq"), "size"),
    ("training loss", ("train:loss",), "minibatch loss"),
)
GRAD_STATS_PANELS = (
    ("variance and mean gradient", ("trace_cov", "grad_sq"), "squared norm"),
    ("gradient noise scale B_simple", ("b_simple",), "samples"),
    ("GSNR", ("gsnr",), "GSNR"),
    ("norm and inner-product tests", ("norm_test", "inner_test"), "test statistic"),
    ("stability margins (≤ 1 stable)", ("sharpness_margin", "nonuniformity_margin"), "margin"),
    ("training loss", ("train:loss",), "minibatch loss"),
)


def plot_grad_noise(runs, out_dir):
    """The grad-noise statistics against step, one panel per family (and the training loss),
    optionally smoothed."""
    return [_panels(runs, out_dir, "grad-noise", GRAD_NOISE_PANELS, "grad_noise.png")]


def plot_grad_stats(runs, out_dir):
    """The grad-stats statistics against step, one panel per family (and the training loss),
    optionally smoothed."""
    return [_panels(runs, out_dir, "grad-stats", GRAD_STATS_PANELS, "grad_stats.png")]


def smoothing_window(run, group: str) -> int:
    """The moving-average window: ``lscape plot --smooth K``, else ``LSCAPE_SMOOTH`` if set,
    else the probe's ``smooth`` option."""
    from lscape.plotting import settings

    if settings()["smooth"] > 1:
        return int(settings()["smooth"])
    env = os.environ.get("LSCAPE_SMOOTH")
    if env:
        return max(1, int(env))
    opts = run.group_attrs(group).get("options", {})
    return max(1, int(opts.get("smooth") or 1))


def _panels(runs, out_dir, group, panels, filename):
    import numpy as np

    from lscape.plotting import figure, line, note, run_colours, run_labels, save

    labels, colours = run_labels(runs), run_colours(len(runs))
    data = [(run.read(group), run.read("train") if run.has("train") else {}) for run in runs]
    drawn = []  # the panels with data, in order; the others are left out (and said so)
    for title, keys, ylabel in panels:
        series = []
        for label, colour, run, (d, train) in zip(labels, colours, runs, data):
            for k, key in enumerate(keys):
                source, _, name = key.rpartition(":")
                values = (train if source == "train" else d).get(name)
                steps = (train if source == "train" else d).get("step")
                if values is None or not np.isfinite(np.asarray(values, dtype=float)).any():
                    continue
                name_label = name if len(runs) == 1 else f"{label}: {name}"
                series.append((steps, values, name_label, colour if len(runs) > 1 else None,
                               ("-", "--", ":")[k % 3] if len(runs) > 1 else "-", smoothing_window(run, group)))
        if series:
            drawn.append((title, ylabel, series))
        else:
            note(f"{filename}: panel '{title}' left out: nothing recorded for {', '.join(keys)}")
    if not drawn:
        return save(*figure(group, "step", "")[:1], out_dir / filename, empty=f"no {group} measurement is finite")
    rows = math.ceil(len(drawn) / 2)
    fig, ax0 = figure(group, "", "", size=(11, 3.2 * rows))
    fig.delaxes(ax0)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, drawn):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        for steps, values, label, colour, ls, window in series:
            line(ax, steps, values, label=label, color=colour, ls=ls, smooth=window)
    every = np.concatenate([np.asarray(steps, dtype=float) for _, _, series in drawn for steps, *_ in series])
    if every.size and every.max() > every.min():  # one step axis for all panels, the loss panel's
        for ax in axes[:len(drawn)]:
            ax.set_xlim(every.min(), every.max())
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    return save(fig, out_dir / filename, legend=list(axes[:len(drawn)]))
