"""`diffusion`: windowed MSD, local exponents, crossover, roughness and excursions of a stored trajectory."""

from __future__ import annotations

from typing import Any

import numpy as np

from lscape import Option, Output, Plugin, hookimpl
from lscape.errors import UsageError

from ._msd import (
    contour_length,
    epoch_gradient_noise,
    fit_broken_power_law,
    fit_power_law,
    local_exponent,
    log_lags,
    msd,
    msd_from,
    roughness,
    transverse_excursion,
    two_point_exponent,
)

__all__ = ["Diffusion", "DIFFUSION_OPTIONS", "DIFFUSION_OUTPUTS", "EPOCH_OUTPUTS", "NOISE_OUTPUTS", "analyse_window",
           "analyse_run", "analyse_epochs"]

DIFFUSION_OPTIONS = (
    Option("window", int, 1000, "rows of the trajectory per window (the waiting times t_w are its starts)", minimum=4),
    Option("stride", int, None, "rows between window starts (default: the window, no overlap)", minimum=1),
    Option("max_lag", int, None, "largest lag in rows (default: window // 4)", minimum=2),
    Option("span", int, 20, "lag indices per local-exponent fit β(τ)", minimum=2),
    Option("fit_points", int, 40, "log-spaced lags used by the power-law fits", minimum=6),
    Option("bins", int, 50, "Δr bins of the roughness", minimum=2),
    Option("fragment", int, 50, "steps per fragment of the transverse excursion", minimum=2),
    Option("max_pairs", int, None, "subsample rows so that the roughness visits at most this many pairs", minimum=1),
    Option("roughness_bins", str, "log", "Δr bins of the roughness: log-spaced, or linear as the original code",
           choices=("log", "linear")),
    Option("beta_method", str, "fit", "local exponent: least-squares slope over the span, or the original's "
           "two-point slope between its ends", choices=("fit", "two_point")),
)

#: per epoch (group ``diffusion/epoch``): the epoch-mean gradient of the recorded steps
EPOCH_OUTPUTS = (
    Output("epoch", dtype="int64", long_name="epoch"),
    Output("grad_epoch", dims=("coord",), long_name="ĝ_epoch, mean minibatch gradient of the epoch (projected like θ)"),
    Output("grad_epoch_norm", long_name="‖ĝ_epoch‖"),
    Output("noise_mean", long_name="mean over the epoch's steps of ‖g_B − ĝ_epoch‖"),
    Output("steps_used", dtype="int64", long_name="recorded steps averaged"),
)
#: per recorded step (group ``diffusion/grad_noise``)
NOISE_OUTPUTS = (Output("noise_norm", long_name="‖g_B − ĝ_epoch‖ of the step's minibatch gradient"),)


#: the arrays one analysed window writes (their lengths follow from the options)
DIFFUSION_OUTPUTS = (
    Output("window_end", dtype="int64", long_name="first step after the window"),
    Output("tau", dims=("lag",), units="steps", long_name="lag τ"),
    Output("msd", dims=("lag",), long_name="time-lag-averaged MSD ⟨‖θ(t+τ) − θ(t)‖²⟩_t"),
    Output("contour", dims=("lag",), long_name="time-lag-averaged contour length over τ steps"),
    Output("beta_tau", dims=("span_index",), units="steps", long_name="centre lag of each local-exponent span"),
    Output("beta", dims=("span_index",), long_name="local exponent β(τ) = d ln MSD / d ln τ"),
    Output("msd_exponent", long_name="exponent of one power law MSD ∝ τ^β"),
    Output("beta_short", long_name="exponent below the crossover τ₀"),
    Output("beta_long", long_name="exponent above the crossover τ₀"),
    Output("tau0", units="steps", long_name="crossover lag τ₀ of the two-regime fit"),
    Output("contour_exponent", long_name="exponent of MSD ∝ s^α against contour length s"),
    Output("roughness_dr", dims=("bin",), long_name="Δr bin centre"),
    Output("roughness_msl", dims=("bin",), long_name="mean squared loss increment ⟨ΔL²⟩ per Δr bin"),
    Output("roughness_count", dims=("bin",), dtype="int64", long_name="pairs per Δr bin"),
    Output("roughness_exponent", long_name="2H of ⟨ΔL²⟩ ∝ Δr^{2H}"),
    Output("msd_tw", dims=("lag",), long_name="‖θ(t_w+τ) − θ(t_w)‖², no time average (mean over rows: the ensemble MSD)"),
    Output("contour_msl_s", dims=("bin",), long_name="contour-length bin centre s"),
    Output("contour_msl", dims=("bin",), long_name="⟨ΔL²⟩ per contour-length bin (MSL against contour length)"),
    Output("contour_msl_exponent", long_name="exponent of ⟨ΔL²⟩ ∝ s^γ against contour length"),
    Output("excursion_mean", long_name="mean transverse excursion of fragments from their chords"),
    Output("excursion_max", long_name="mean over fragments of the largest transverse excursion"),
    Output("excursion_ratio", long_name="mean over fragments of largest excursion / chord length"),
)


def analyse_window(theta: np.ndarray, steps: np.ndarray, loss: np.ndarray | None, opts: Any) -> dict[str, Any]:
    """Every diffusion quantity of one window of trajectory rows ``theta`` (W, D) at ``steps``.

    Lags are counted in rows and reported in steps (rows × the recording stride). The
    roughness is skipped (NaN) without losses.
    """
    theta = np.asarray(theta, dtype=np.float64)
    steps = np.asarray(steps)
    W = theta.shape[0]
    dt = float(np.median(np.diff(steps))) if W > 1 else 1.0
    max_lag = min(opts.max_lag or max(W // 4, 2), W - 1)
    m = msd(theta, max_lag)
    s = contour_length(theta, max_lag)
    lags = np.arange(1, max_lag + 1)
    slope = two_point_exponent if getattr(opts, "beta_method", "fit") == "two_point" else local_exponent
    centres, beta = slope(m, span=min(opts.span, max_lag))
    fit_lags = log_lags(max_lag, opts.fit_points)
    broken = fit_broken_power_law(fit_lags * dt, m[fit_lags])
    one, _ = fit_power_law(fit_lags, m[fit_lags])
    contour_exp, _ = fit_power_law(s[fit_lags], m[fit_lags])
    row: dict[str, Any] = {
        "window_end": int(steps[-1] + dt),
        "tau": lags * dt,
        "msd": m[1:],
        "contour": s[1:],
        "beta_tau": _pad(centres * dt, max_lag - opts.span + 1),
        "beta": _pad(beta, max_lag - opts.span + 1),
        "msd_exponent": one,
        "beta_short": broken.beta_short,
        "beta_long": broken.beta_long,
        "tau0": broken.tau0,
        "contour_exponent": contour_exp,
        "msd_tw": msd_from(theta, max_lag)[1:],
    }
    if loss is not None and np.isfinite(loss).sum() >= 2:
        ok = np.isfinite(loss)
        spacing = getattr(opts, "roughness_bins", "log")
        r = roughness(theta[ok], loss[ok], bins=opts.bins, max_pairs=opts.max_pairs, spacing=spacing)
        row.update(roughness_dr=r.centers, roughness_msl=r.msl, roughness_count=r.counts, roughness_exponent=r.exponent)
        c = roughness(theta[ok], loss[ok], bins=opts.bins, max_pairs=opts.max_pairs, spacing=spacing,
                      distance="contour")
        row.update(contour_msl_s=c.centers, contour_msl=c.msl, contour_msl_exponent=c.exponent)
    frag = min(opts.fragment, W - 1)
    ex = transverse_excursion(theta, fragment=frag)
    if len(ex["start"]):
        row.update(excursion_mean=float(np.mean(ex["mean"])), excursion_max=float(np.mean(ex["max"])),
                   excursion_ratio=float(np.nanmean(ex["ratio"])))
    return row


class Diffusion(Plugin):
    """Online analysis of the `trajectory` probe: each time a window of ``window`` recorded
    rows is complete, its MSD(τ), β(τ), two-regime fit with τ₀, MSD against contour length,
    loss-increment roughness and transverse excursion are stored as one row (coordinate:
    the window's first step t_w). Offline, ``lscape diffusion RUN`` does the same on a
    stored run."""

    name = "diffusion"
    help = "windowed MSD, anomalous exponents, crossover τ₀, roughness and excursions of the trajectory"
    options = DIFFUSION_OPTIONS
    outputs = DIFFUSION_OUTPUTS
    requires = ("trajectory",)

    def __init__(self, **options):
        super().__init__(**options)
        self._next = 0  # row index of the next window start
        self._epoch_row = 0  # first trajectory row of the epoch being collected
        self._epoch_end: tuple[int, int] | None = None  # (last step, epoch) of an epoch not yet analysed
        # rows are keyed by the window start or the gradient's step, both earlier than the step
        # that writes them, so resume cannot drop rows written after the checkpoint by their
        # step: the checkpoint keeps each group's row count and a resumed run cuts back to it
        self._row_writers: dict[str, Any] = {}
        self._resume_rows: dict[str, int] | None = None

    def _writer(self, ctx, sub: str | None = None, outputs=()):
        name = self.name if sub is None else f"{self.name}/{sub}"
        w = self._row_writers.get(name)
        if w is None:
            if sub is None:
                w = self.group(ctx)
            else:
                w = ctx.store.group(name, outputs, attrs={"plugin": self.name,
                                                          "source": "trajectory rows of each epoch"})
            self._row_writers[name] = w
        return w

    def _cut_back(self, ctx) -> None:
        """After a resume: drop the rows this plugin wrote after the checkpoint."""
        rows, self._resume_rows = self._resume_rows, None
        if rows is None or ctx.store is None or not ctx.is_main:
            return
        for name in (self.name, f"{self.name}/epoch", f"{self.name}/grad_noise"):
            keep = rows.get(name, 0)  # a group not written to by the checkpoint had none of its rows
            if name in ctx.store.root:
                sub = None if name == self.name else name.split("/", 1)[1]
                outputs = EPOCH_OUTPUTS if sub == "epoch" else NOISE_OUTPUTS if sub == "grad_noise" else ()
                w = self._writer(ctx, sub, outputs)
                if len(w) > keep:
                    w.truncate(int(keep))

    @hookimpl
    def on_step_end(self, ctx, state):
        if self._resume_rows is not None:
            self._cut_back(ctx)
        # through the trajectory plugin, so that its group is created with its own attributes
        writer = ctx.plugins["trajectory"].group(ctx)
        if writer is None:
            return
        # ĝ_epoch once the epoch's last row is surely recorded: at the step after its end
        if self._epoch_end is not None and state.step > self._epoch_end[0]:
            self._finish_epoch(ctx, writer)
        if state.epoch_end:
            self._epoch_end = (int(state.step), int(state.epoch))
        while len(writer) >= self._next + self.opts.window:
            writer.flush()  # the window must be on disk before it is read back
            g = writer.group
            lo, hi = self._next, self._next + self.opts.window
            steps = g["step"][lo:hi]
            loss = g["loss"][lo:hi] if "loss" in g.array_keys() else None
            row = analyse_window(g["theta"][lo:hi], steps, loss, self.opts)
            self._writer(ctx).append(int(steps[0]), **row)
            self._next += self.opts.stride or self.opts.window

    @hookimpl
    def on_run_end(self, ctx):
        if self._resume_rows is not None:
            self._cut_back(ctx)
        writer = ctx.plugins["trajectory"].group(ctx) if "trajectory" in ctx.plugins else None
        if writer is not None and self._epoch_end is not None:
            self._finish_epoch(ctx, writer)

    def _finish_epoch(self, ctx, writer) -> None:
        """ĝ_epoch and ‖g_B − ĝ_epoch‖ over the trajectory rows of the epoch that ended."""
        last, epoch = self._epoch_end
        self._epoch_end = None
        writer.flush()
        g = writer.group
        if "grad" not in g.array_keys():
            return  # the trajectory records no gradients (trajectory.gradient=false)
        steps = g["step"][self._epoch_row:]
        n = int(np.searchsorted(steps, last, side="right"))
        if n == 0:
            return
        lo, hi = self._epoch_row, self._epoch_row + n
        grads = np.asarray(g["grad"][lo:hi], dtype=np.float64)
        ok = np.isfinite(grads).all(axis=1)
        self._epoch_row = hi
        if not ok.any():
            return
        _, g_epoch, noise = epoch_gradient_noise(grads[ok], np.zeros(int(ok.sum())))
        self._writer(ctx, "epoch", EPOCH_OUTPUTS).append(
            last, epoch=epoch, grad_epoch=g_epoch[0], grad_epoch_norm=float(np.linalg.norm(g_epoch[0])),
            noise_mean=float(noise.mean()), steps_used=int(ok.sum()))
        noise_writer = self._writer(ctx, "grad_noise", NOISE_OUTPUTS)
        for step, value in zip(steps[:n][ok], noise):
            noise_writer.append(int(step), noise_norm=float(value))

    def state_dict(self):
        rows = dict(self._resume_rows or {})  # loaded but not applied yet: still the truth
        rows.update({name: len(w) for name, w in self._row_writers.items() if w is not None})
        return {"next": self._next, "epoch_row": self._epoch_row,
                "epoch_end": None if self._epoch_end is None else list(self._epoch_end), "rows": rows}

    def load_state_dict(self, state):
        self._next = int(state.get("next", 0))
        self._epoch_row = int(state.get("epoch_row", 0))
        end = state.get("epoch_end")
        self._epoch_end = None if end is None else (int(end[0]), int(end[1]))
        rows = state.get("rows")  # None: a checkpoint from before row counts were kept
        self._resume_rows = None if rows is None else {str(k): int(v) for k, v in rows.items()}
        self._row_writers = {}


def analyse_run(path: str, overwrite: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Analyse the trajectory stored in run ``path`` window by window into its ``diffusion`` group.

    Reads one window at a time (memory O(window · dim)); ``options`` are those of the
    `diffusion` plugin. Returns the rows written.
    """
    import zarr

    from lscape.options import resolve_options
    from lscape.store import RunReader, RunStore

    opts = resolve_options(DIFFUSION_OPTIONS, options, "diffusion")
    reader = RunReader(path)
    if not reader.has("trajectory"):
        raise UsageError(f"{path} holds no trajectory; record one with --plugin trajectory")
    if reader.has("diffusion"):
        if not overwrite:
            raise UsageError(f"{path} already holds a diffusion analysis; pass --overwrite to replace it")
    arrays = reader.arrays("trajectory")
    n = arrays["step"].shape[0]
    if n < opts.window:
        raise UsageError(f"the trajectory has {n} rows, fewer than one window of {opts.window}; use --window {max(n, 4)}")
    store = RunStore.open(path)
    if reader.has("diffusion"):
        root = zarr.open_group(path, mode="r+")
        del root["diffusion"]
    writer = store.group("diffusion", DIFFUSION_OUTPUTS,
                         attrs={"plugin": "diffusion", "options": vars(opts), "source": "lscape diffusion"})
    rows = []
    stride = opts.stride or opts.window
    for lo in range(0, n - opts.window + 1, stride):
        hi = lo + opts.window
        steps = arrays["step"][lo:hi]
        loss = arrays["loss"][lo:hi] if "loss" in arrays else None
        row = analyse_window(arrays["theta"][lo:hi], steps, loss, opts)
        writer.append(int(steps[0]), **row)
        rows.append({"t_w": int(steps[0]), **row})
    writer.flush()
    analyse_epochs(reader, store)
    return rows


def analyse_epochs(reader, store) -> int:
    """Offline ĝ_epoch and ‖g_B − ĝ_epoch‖ from a stored trajectory with gradients, the epochs
    read from the ``train`` group; written to ``diffusion/epoch`` and ``diffusion/grad_noise``.
    Returns the number of epochs (0 without gradients or epochs)."""
    arrays = reader.arrays("trajectory")
    if "grad" not in arrays or not reader.has("train"):
        return 0
    train = reader.read("train")
    if "epoch" not in train:
        return 0
    steps = np.asarray(arrays["step"][:])
    grads = np.asarray(arrays["grad"][:], dtype=np.float64)
    epoch_of = dict(zip(np.asarray(train["step"]).tolist(), np.asarray(train["epoch"]).tolist()))
    epochs = np.array([epoch_of.get(int(t), -1) for t in steps])
    ok = (epochs >= 0) & np.isfinite(grads).all(axis=1)
    if not ok.any():
        return 0
    ids, g_epoch, noise = epoch_gradient_noise(grads[ok], epochs[ok])
    attrs = {"plugin": "diffusion", "source": "lscape diffusion"}
    ew = store.group("diffusion/epoch", EPOCH_OUTPUTS, attrs=attrs)
    nw = store.group("diffusion/grad_noise", NOISE_OUTPUTS, attrs=attrs)
    kept_steps, kept_epochs = steps[ok], epochs[ok]
    for i, e in enumerate(ids):
        mine = kept_epochs == e
        ew.append(int(kept_steps[mine].max()), epoch=int(e), grad_epoch=g_epoch[i],
                  grad_epoch_norm=float(np.linalg.norm(g_epoch[i])), noise_mean=float(noise[mine].mean()),
                  steps_used=int(mine.sum()))
    for step, value in zip(kept_steps, noise):
        nw.append(int(step), noise_norm=float(value))
    ew.flush()
    nw.flush()
    return len(ids)


@hookimpl
def register_commands(cli):
    import click

    @cli.command("diffusion")
    @click.argument("run", type=click.Path())
    @click.option("--window", type=int, default=1000, show_default=True, help="trajectory rows per window")
    @click.option("--stride", type=int, default=None, help="rows between window starts [default: the window]")
    @click.option("--max-lag", type=int, default=None, help="largest lag in rows [default: window // 4]")
    @click.option("--span", type=int, default=20, show_default=True, help="lag indices per local-exponent fit")
    @click.option("--bins", type=int, default=50, show_default=True, help="Δr bins of the roughness")
    @click.option("--fragment", type=int, default=50, show_default=True, help="steps per excursion fragment")
    @click.option("--max-pairs", type=int, default=None, help="cap on the pairs the roughness visits")
    @click.option("--roughness-bins", type=click.Choice(["log", "linear"]), default="log", show_default=True,
                  help="Δr bins of the roughness (linear: the original code's)")
    @click.option("--beta-method", type=click.Choice(["fit", "two_point"]), default="fit", show_default=True,
                  help="local exponent: fit over the span, or the original's two-point slope")
    @click.option("--overwrite", is_flag=True, help="replace an existing diffusion analysis")
    def diffusion_command(run, overwrite, **options):
        """Analyse the stored trajectory of RUN: windowed MSD, β(τ), τ₀, roughness, excursion."""
        rows = analyse_run(run, overwrite=overwrite, **options)
        click.echo(f"{'t_w':>8} {'β':>6} {'β<τ₀':>6} {'β>τ₀':>6} {'τ₀':>8} {'2H':>6}")
        for r in rows:
            click.echo(f"{r['t_w']:>8d} {r['msd_exponent']:6.3f} {r['beta_short']:6.3f} {r['beta_long']:6.3f} "
                       f"{r['tau0']:8.1f} {r.get('roughness_exponent', float('nan')):6.3f}")
        click.echo(f"{len(rows)} window(s) written to {run} (group diffusion); plot: lscape plot {run}")


def _pad(v: np.ndarray, n: int) -> np.ndarray:
    # β has a fixed number of spans per window; pad with NaN where lags were dropped
    out = np.full(max(n, 1), np.nan)
    out[: min(len(v), len(out))] = v[: len(out)]
    return out


@hookimpl
def register_plugins(register):
    register(Diffusion)


@hookimpl
def register_plots(register):
    from ._plots import plot_beta, plot_contour_msl, plot_grad_noise, plot_msd, plot_roughness

    register("diffusion", plot_msd)
    register("diffusion", plot_beta)
    register("diffusion", plot_roughness)
    register("diffusion", plot_contour_msl)
    register("diffusion", plot_grad_noise)
