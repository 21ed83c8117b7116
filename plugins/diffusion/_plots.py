"""Figures of the diffusion analysis: MSD log-log with fitted exponents, β(τ), roughness."""

from __future__ import annotations

import numpy as np

from ._msd import BrokenPowerLaw

__all__ = ["plot_msd", "plot_beta", "plot_roughness", "plot_contour_msl", "plot_grad_noise"]


def plot_msd(runs, out_dir):
    """MSD(τ) per window on log-log axes with the two-regime fit and its exponents."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        d = run.read("diffusion")
        fig, ax = figure(f"MSD — {run.name}", "lag τ (steps)", "MSD")
        ax.set_xscale("log")
        ax.set_yscale("log")
        colors = _colors(len(d["step"]))
        for i, tw in enumerate(d["step"]):
            tau, m = d["tau"][i], d["msd"][i]
            ok = (tau > 0) & (m > 0)
            ax.plot(tau[ok], m[ok], color=colors[i], lw=1, label=f"t_w={tw}")
            if np.isfinite(d["tau0"][i]):
                fit = BrokenPowerLaw(d["beta_short"][i], d["beta_long"][i], d["tau0"][i], 1.0, 0.0)
                # the stored fit has no amplitude; anchor it to the data at the smallest lag
                scale = m[ok][0] / fit(tau[ok][0]) if ok.any() else 1.0
                ax.plot(tau[ok], scale * fit(tau[ok]), color=colors[i], ls="--", lw=0.8,
                        label=f"β={d['beta_short'][i]:.2f}→{d['beta_long'][i]:.2f}, τ₀={d['tau0'][i]:.0f}")
        if "msd_tw" in d and len(d["step"]) > 1:
            # no time average: ‖θ(t_w+τ) − θ(t_w)‖² averaged over the waiting times (the ensemble MSD)
            ens = np.nanmean(d["msd_tw"], axis=0)
            tau = d["tau"][0]
            ok = (tau > 0) & (ens > 0)
            ax.plot(tau[ok], ens[ok], color="k", lw=1.4, ls=":", label="ensemble over t_w (no time average)")
        paths.append(save(fig, out_dir / f"diffusion_msd_{run.name}.png", legend=ax))
    return paths


def plot_contour_msl(runs, out_dir):
    """⟨ΔL²⟩ against the contour length walked between the two points, log-log, per window."""
    return _per_window_loglog(runs, out_dir, "contour_msl", "contour_msl_s", "contour_msl_exponent", "γ",
                              "MSL against contour length", "contour length s", "diffusion_contour_msl",
                              need_finite=True)


def plot_grad_noise(runs, out_dir):
    """‖g_B − ĝ_epoch‖ per recorded step and ‖ĝ_epoch‖ per epoch."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        if not run.has("diffusion/grad_noise"):
            continue
        noise = run.read("diffusion/grad_noise")
        fig, ax = figure(f"minibatch gradient noise about the epoch mean — {run.name}", "step", "norm")
        ax.plot(noise["step"], noise["noise_norm"], lw=0.6, alpha=0.7, label="‖g_B − ĝ_epoch‖")
        if run.has("diffusion/epoch"):
            ep = run.read("diffusion/epoch")
            ax.plot(ep["step"], ep["grad_epoch_norm"], "o-", ms=3, label="‖ĝ_epoch‖ (at the epoch's last step)")
            ax.plot(ep["step"], ep["noise_mean"], "s--", ms=3, label="epoch mean of ‖g_B − ĝ_epoch‖")
        paths.append(save(fig, out_dir / f"diffusion_grad_noise_{run.name}.png", legend=ax))
    return paths


def plot_beta(runs, out_dir):
    """The local exponent β(τ) per window, with β = 1 (normal diffusion) marked."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        d = run.read("diffusion")
        fig, ax = figure(f"local exponent β(τ) — {run.name}", "lag τ (steps)", "β(τ)")
        ax.set_xscale("log")
        colors = _colors(len(d["step"]))
        for i, tw in enumerate(d["step"]):
            ax.plot(d["beta_tau"][i], d["beta"][i], color=colors[i], lw=1, label=f"t_w={tw}")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        paths.append(save(fig, out_dir / f"diffusion_beta_{run.name}.png", legend=ax))
    return paths


def plot_roughness(runs, out_dir):
    """Mean squared loss increment against displacement, log-log, with 2H per window."""
    return _per_window_loglog(runs, out_dir, "roughness_msl", "roughness_dr", "roughness_exponent", "2H",
                              "loss roughness", "Δr", "diffusion_roughness")


def _per_window_loglog(runs, out_dir, y: str, x: str, exponent: str, symbol: str, title: str, xlabel: str,
                       stem: str, need_finite: bool = False):
    """One log-log figure per run of ⟨ΔL²⟩ (array ``y``) against ``x``, a series per window
    labelled with its waiting time and fitted exponent; runs without ``y`` are skipped."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        d = run.read("diffusion")
        if y not in d or (need_finite and not np.isfinite(d[y]).any()):
            continue
        fig, ax = figure(f"{title} — {run.name}", xlabel, "⟨ΔL²⟩")
        ax.set_xscale("log")
        ax.set_yscale("log")
        colors = _colors(len(d["step"]))
        for i, tw in enumerate(d["step"]):
            ax.plot(d[x][i], d[y][i], ".", color=colors[i], ms=3, label=f"t_w={tw}, {symbol}={d[exponent][i]:.2f}")
        paths.append(save(fig, out_dir / f"{stem}_{run.name}.png", legend=ax))
    return paths


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
