"""`diffusion`: windowed MSD, local exponents, crossover, roughness and excursions of a stored trajectory."""

from __future__ import annotations

from typing import Any

import numpy as np

from lscape import Option, Output, Plugin, hookimpl
from lscape.errors import UsageError

from .msd import contour_length, fit_broken_power_law, fit_power_law, local_exponent, log_lags, msd, roughness, transverse_excursion

__all__ = ["Diffusion", "DIFFUSION_OPTIONS", "DIFFUSION_OUTPUTS", "analyse_window", "analyse_run"]

DIFFUSION_OPTIONS = (
    Option("window", int, 1000, "rows of the trajectory per window (the waiting times t_w are its starts)", minimum=4),
    Option("stride", int, None, "rows between window starts (default: the window, no overlap)", minimum=1),
    Option("max_lag", int, None, "largest lag in rows (default: window // 4)", minimum=2),
    Option("span", int, 20, "lag indices per local-exponent fit β(τ)", minimum=2),
    Option("fit_points", int, 40, "log-spaced lags used by the power-law fits", minimum=6),
    Option("bins", int, 50, "Δr bins of the roughness", minimum=2),
    Option("fragment", int, 50, "steps per fragment of the transverse excursion", minimum=2),
    Option("max_pairs", int, None, "subsample rows so that the roughness visits at most this many pairs", minimum=1),
)


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
    centres, beta = local_exponent(m, span=min(opts.span, max_lag))
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
    }
    if loss is not None and np.isfinite(loss).sum() >= 2:
        ok = np.isfinite(loss)
        r = roughness(theta[ok], loss[ok], bins=opts.bins, max_pairs=opts.max_pairs)
        row.update(roughness_dr=r.centers, roughness_msl=r.msl, roughness_count=r.counts, roughness_exponent=r.exponent)
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

    @hookimpl
    def on_step_end(self, ctx, state):
        # through the trajectory plugin, so that its group is created with its own attributes
        writer = ctx.plugins["trajectory"].group(ctx)
        if writer is None:
            return
        while len(writer) >= self._next + self.opts.window:
            writer.flush()  # the window must be on disk before it is read back
            g = writer.group
            lo, hi = self._next, self._next + self.opts.window
            steps = g["step"][lo:hi]
            loss = g["loss"][lo:hi] if "loss" in g.array_keys() else None
            row = analyse_window(g["theta"][lo:hi], steps, loss, self.opts)
            self.record(ctx, int(steps[0]), **row)
            self._next += self.opts.stride or self.opts.window

    def state_dict(self):
        return {"next": self._next}

    def load_state_dict(self, state):
        self._next = int(state.get("next", 0))


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
    return rows


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
