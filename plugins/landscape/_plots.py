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
    """2-D surfaces: contour maps of the training and eval loss side by side (filled, with a
    colour bar, a few inline labels and θ marked at the origin) and a 3-D surface of the
    training loss; for ``direction=pca`` the checkpoints' path is drawn over the contours
    (loss-landscape's ``plot_trajectory``), the axes named by their explained variance."""
    import matplotlib.pyplot as plt
    from lscape.plotting import save

    paths = []
    for run in runs:
        for g in run.groups():
            if not g.startswith("landscape/surface_step"):
                continue
            a = run.arrays(g)
            alpha, beta = a["alpha"][:], a["beta"][:]
            splits = [s for s in ("train", "eval") if f"{s}_loss" in a and np.isfinite(a[f"{s}_loss"][:]).any()]
            if not splits:
                continue
            tag = g.rsplit("/", 1)[1]
            attrs = run.group_attrs(g) if hasattr(run, "group_attrs") else {}
            ratio = attrs.get("explained_variance_ratio")
            path = None
            if "path_x" in a and "path_y" in a:
                path = (a["path_x"][:], a["path_y"][:], a["path_step"][:] if "path_step" in a else None)
            xlabel, ylabel = "α", "β"
            if ratio is not None:
                xlabel = f"1st PCA direction ({100 * ratio[0]:.1f} % of the path's variance)"
                ylabel = f"2nd PCA direction ({100 * ratio[1]:.1f} %)"
            fig, axes = plt.subplots(1, len(splits), figsize=(5.6 * len(splits), 4.8), squeeze=False)
            for ax, split in zip(axes[0], splits):
                _contour_panel(fig, ax, alpha, beta, a[f"{split}_loss"][:], f"{split} loss", path)
                ax.set_xlabel(xlabel, fontsize=8 if ratio is not None else None)
                ax.set_ylabel(ylabel, fontsize=8 if ratio is not None else None)
            what = "optimisation path on the PCA directions" if path is not None else "loss surface"
            fig.suptitle(f"{what}, {tag} — {run.name}", fontsize=10)
            fig.tight_layout()
            name = "landscape_trajectory" if path is not None else "landscape_2d"
            paths.append(save(fig, out_dir / f"{name}_{run.name}_{tag}.png"))

            loss = a["train_loss"][:] if "train" in splits else a[f"{splits[0]}_loss"][:]
            fig = plt.figure(figsize=(6.4, 5))
            ax3 = fig.add_subplot(projection="3d")
            A, B = np.meshgrid(alpha, beta, indexing="ij")
            surf = ax3.plot_surface(A, B, np.where(np.isfinite(loss), loss, np.nan), cmap="viridis", linewidth=0)
            fig.colorbar(surf, ax=ax3, shrink=0.6, pad=0.1, label=f"{splits[0] if 'train' not in splits else 'train'} loss")
            ax3.set_xlabel("α")
            ax3.set_ylabel("β")
            ax3.set_zlabel("loss")
            ax3.set_title(f"{tag} — {run.name}")
            paths.append(save(fig, out_dir / f"landscape_3d_{run.name}_{tag}.png"))
    return paths


def _contour_panel(fig, ax, alpha, beta, loss, title, path=None):
    """Filled contours of ``loss`` (α, β) with a colour bar, sparse inline labels, θ at (0, 0), the path."""
    finite = loss[np.isfinite(loss)]
    lo, hi = float(finite.min()), float(np.percentile(finite, 95))
    if not hi > lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    levels = np.linspace(lo, hi, 25)
    shown = np.where(np.isfinite(loss), np.minimum(loss, hi), np.nan)
    filled = ax.contourf(alpha, beta, shown.T, levels=levels, cmap="viridis", extend="max")
    lines = ax.contour(alpha, beta, shown.T, levels=levels[::3], colors="white", linewidths=0.5, alpha=0.7)
    # a few labels, placed inline on the lines: every other line at most, never on short pieces
    ax.clabel(lines, lines.levels[::2], inline=True, inline_spacing=4, fontsize=6, fmt="%.3g")
    fig.colorbar(filled, ax=ax, label="loss (clipped at the 95th percentile)")
    ax.plot([0], [0], marker="*", ms=11, color="red", mec="white", mew=0.8, ls="none", label="θ")
    if path is not None:
        x, y, steps = path
        ax.plot(x, y, "-", color="orange", lw=1.2)
        ax.plot(x, y, "o", color="orange", mec="black", mew=0.4, ms=3.5, label="checkpoints")
        if steps is not None and len(steps):
            for k in sorted({0, len(steps) - 1}):
                ax.annotate(f"step {int(steps[k])}", (x[k], y[k]), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color="white")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")


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
