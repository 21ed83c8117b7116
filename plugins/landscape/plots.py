"""Figures of the landscape probes: 1-D slices, 2-D contours and surfaces, interpolation, ε-sharpness."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_slices", "plot_surfaces", "plot_interpolation", "plot_eps_sharpness"]


def plot_slices(runs, out_dir):
    """1-D slices: training (solid) and eval (dashed) loss against α, one colour per step."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        if not run.has("landscape"):
            continue
        d = run.read("landscape")
        if "train_loss" not in d:
            continue
        fig, ax = figure(f"1-D loss slices — {run.name}", "α", "loss")
        colors = _colors(len(d["step"]))
        for i, step in enumerate(d["step"]):
            ax.plot(d["alpha"][i], d["train_loss"][i], color=colors[i], lw=1, label=f"train, step {step}")
            if "eval_loss" in d and np.isfinite(d["eval_loss"][i]).any():
                ax.plot(d["alpha"][i], d["eval_loss"][i], color=colors[i], lw=1, ls="--", label=f"eval, step {step}")
        paths.append(save(fig, out_dir / f"landscape_1d_{run.name}.png", legend=ax))
    return paths


def plot_surfaces(runs, out_dir):
    """2-D surfaces: a contour plot and a 3-D surface of the training loss for each one."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        for g in run.groups():
            if not g.startswith("landscape/surface_step"):
                continue
            a = run.arrays(g)
            alpha, beta, loss = a["alpha"][:], a["beta"][:], a["train_loss"][:]
            if not np.isfinite(loss).any():
                continue
            tag = g.rsplit("/", 1)[1]
            fig, ax = figure(f"training loss, {tag} — {run.name}", "α", "β", size=(5.5, 5.0))
            finite = loss[np.isfinite(loss)]
            levels = np.linspace(finite.min(), np.percentile(finite, 95), 30)
            cs = ax.contour(alpha, beta, loss.T, levels=levels, cmap="viridis")
            ax.clabel(cs, cs.levels[::5], fontsize=6)
            paths.append(save(fig, out_dir / f"landscape_2d_{run.name}_{tag}.png"))

            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(6, 5))
            ax3 = fig.add_subplot(projection="3d")
            A, B = np.meshgrid(alpha, beta, indexing="ij")
            ax3.plot_surface(A, B, np.where(np.isfinite(loss), loss, np.nan), cmap="viridis", linewidth=0)
            ax3.set_xlabel("α")
            ax3.set_ylabel("β")
            ax3.set_zlabel("loss")
            ax3.set_title(f"{tag} — {run.name}")
            paths.append(save(fig, out_dir / f"landscape_3d_{run.name}_{tag}.png"))
    return paths


def plot_interpolation(runs, out_dir):
    """Loss (left axis) and accuracy (right axis) along the interpolation path, train and eval."""
    from lscape.plotting import figure, save

    paths = []
    for run in runs:
        d = run.read("interpolate")
        for i, step in enumerate(d["step"]):
            fig, ax = figure(f"interpolation — {run.name}, step {step}", "α (0: this model, 1: other)", "loss")
            acc = ax.twinx()
            acc.set_ylabel("accuracy")
            for split, ls in (("train", "-"), ("eval", "--")):
                if f"{split}_loss" in d and np.isfinite(d[f"{split}_loss"][i]).any():
                    ax.plot(d["alpha"][i], d[f"{split}_loss"][i], "C0" + ls, label=f"{split} loss")
                    acc.plot(d["alpha"][i], d[f"{split}_accuracy"][i], "C1" + ls, label=f"{split} accuracy")
            for x in (0, 1):
                ax.axvline(x, color="k", lw=0.5, ls=":")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = acc.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=8)
            paths.append(save(fig, out_dir / f"interpolate_{run.name}_step{step}.png"))
    return paths


def plot_eps_sharpness(runs, out_dir):
    """ε-sharpness mean ± std against step."""
    from lscape.plotting import figure, save

    fig, ax = figure("ε-sharpness", "step", "ε-sharpness (%)")
    for run in runs:
        d = run.read("eps-sharpness")
        ax.errorbar(d["step"], d["eps_sharpness"], yerr=d["eps_sharpness_std"], marker="o", ms=3, capsize=2,
                    label=run.name)
    return [save(fig, out_dir / "eps_sharpness.png", legend=ax)]


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
