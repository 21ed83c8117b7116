"""Anomalous-diffusion analysis of a trajectory: MSD, local exponents, roughness, excursions.

Pure numpy functions on a trajectory ``x`` of shape ``(T, D)`` (rows are time, columns
are coordinates, e.g. a random projection of the flat parameters). Definitions follow
Chen, Qu & Gong, "Anomalous diffusion dynamics of learning in deep neural networks"
(arXiv 2009.10588); see docs/plugins/diffusion.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "msd",
    "windowed_msd",
    "window_starts",
    "log_lags",
    "fit_power_law",
    "local_exponent",
    "BrokenPowerLaw",
    "fit_broken_power_law",
    "contour_length",
    "roughness",
    "Roughness",
    "transverse_excursion",
    "msd_from",
    "ensemble_msd",
    "two_point_exponent",
    "epoch_gradient_noise",
]

# columns are processed in blocks so that the FFT workspace stays a few MB whatever D is
_COLUMN_BLOCK = 256


def msd(x: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Time-lag-averaged mean squared displacement of one trajectory.

    ``x`` has shape ``(T, D)`` (a 1-D array is one coordinate). Returns ``m`` of length
    ``max_lag + 1`` (default ``T - 1``) with ``m[τ] = mean_t ‖x[t+τ] − x[t]‖²`` over the
    ``T − τ`` pairs at lag τ, and ``m[0] = 0``. Uses the FFT/cumulative-sum identity
    ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b, so time is O(T log T · D) and memory O(T · block).
    """
    x = _as_2d(x)
    T = x.shape[0]
    if T < 2:
        raise ValueError("a trajectory needs at least two points")
    max_lag = T - 1 if max_lag is None else int(min(max_lag, T - 1))
    sq = np.einsum("td,td->t", x, x)
    # S[τ] = Σ_{t<T−τ} (‖x_t‖² + ‖x_{t+τ}‖²) from prefix sums of the squared norms
    csum = np.concatenate([[0.0], np.cumsum(sq)])
    lags = np.arange(max_lag + 1)
    head = csum[T - lags]  # Σ_{t=0}^{T−τ−1} ‖x_t‖²
    tail = csum[T] - csum[lags]  # Σ_{t=τ}^{T−1} ‖x_t‖²
    corr = np.zeros(max_lag + 1)
    nfft = _fft_size(2 * T)
    for start in range(0, x.shape[1], _COLUMN_BLOCK):
        block = x[:, start : start + _COLUMN_BLOCK]
        f = np.fft.rfft(block, n=nfft, axis=0)
        ac = np.fft.irfft(f * np.conj(f), n=nfft, axis=0)[: max_lag + 1]
        corr += ac.sum(axis=1)
    out = (head + tail - 2.0 * corr) / (T - lags)
    out[0] = 0.0
    # rounding in the FFT can give tiny negative values at short lags of near-static paths
    return np.maximum(out, 0.0)


def msd_from(x: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Displacement from the first row, without time averaging: ``d[τ] = ‖x[τ] − x[0]‖²``.

    For a window starting at waiting time t_w this is ‖θ(t_w + τ) − θ(t_w)‖²; its mean over
    windows (:func:`ensemble_msd`) is the MSD as an ensemble average over waiting times.
    """
    x = _as_2d(x)
    max_lag = x.shape[0] - 1 if max_lag is None else int(min(max_lag, x.shape[0] - 1))
    d = x[: max_lag + 1] - x[0]
    return np.einsum("td,td->t", d, d)


def ensemble_msd(x: np.ndarray, starts, max_lag: int) -> np.ndarray:
    """⟨‖x[t_w + τ] − x[t_w]‖²⟩ over the waiting times ``starts`` that leave ``max_lag`` rows
    (no time average within a window): the MSD as an ensemble over t_w."""
    starts = [int(t) for t in starts if int(t) + max_lag < x.shape[0]]
    if not starts:
        raise ValueError(f"no waiting time leaves {max_lag} rows")
    return np.mean([msd_from(np.asarray(x[t : t + max_lag + 1], dtype=np.float64), max_lag) for t in starts], axis=0)


def _log_points(m: np.ndarray, lags: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ln τ, ln m) of the entries with τ > 0 and a finite positive m (``m`` indexed by lag
    unless ``lags`` gives each entry's lag)."""
    m = np.asarray(m, float)
    lags = np.arange(len(m)) if lags is None else np.asarray(lags, float)
    ok = (lags > 0) & (m > 0) & np.isfinite(m)
    return np.log(lags[ok]), np.log(m[ok])


def two_point_exponent(m: np.ndarray, span: int = 20, lags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Local exponent as the anomalous-diffusion code's two-point slope (plot_fig2.m): between
    the lags ``span`` indices apart, τ_i and τ_{i+span} (the lags of :func:`local_exponent`),
    β = ln(m(τ_{i+span})/m(τ_i)) / ln(τ_{i+span}/τ_i), at the geometric centre of the two."""
    lx, ly = _log_points(m, lags)
    n = len(lx) - span
    if span < 1 or n < 1:
        return np.empty(0), np.empty(0)
    a, b = slice(0, n), slice(span, span + n)
    return np.exp((lx[a] + lx[b]) / 2), (ly[b] - ly[a]) / (lx[b] - lx[a])


def epoch_gradient_noise(grads: np.ndarray, epochs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean gradient ĝ_epoch and each step's ‖g_B − ĝ_epoch‖ (ALGORITHMS §5).

    ``grads`` (T, D) are the minibatch gradients of the steps (or their projections),
    ``epochs`` (T,) the epoch of each. Returns ``(epoch_ids, g_epoch (E, D), noise (T,))``.
    """
    grads = _as_2d(grads)
    epochs = np.asarray(epochs)
    ids = np.unique(epochs)
    g_epoch = np.stack([grads[epochs == e].mean(axis=0) for e in ids])
    index = np.searchsorted(ids, epochs)
    noise = np.linalg.norm(grads - g_epoch[index], axis=1)
    return ids, g_epoch, noise


def window_starts(n_steps: int, window: int, starts=None, stride: int | None = None) -> np.ndarray:
    """Waiting times t_w (row indices) of the windows that fit into ``n_steps`` rows.

    With ``starts`` given, keeps those with a full window; otherwise consecutive windows
    ``0, stride, 2·stride, …`` (``stride`` defaults to ``window``, i.e. non-overlapping).
    """
    if window < 2:
        raise ValueError("a window needs at least two points")
    if starts is not None:
        s = np.asarray(starts, dtype=int)
        return s[(s >= 0) & (s + window <= n_steps)]
    stride = window if stride is None else int(stride)
    return np.arange(0, max(n_steps - window + 1, 0), stride, dtype=int)


def windowed_msd(
    x: np.ndarray, window: int, max_lag: int | None = None, starts=None, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """MSD(τ) in consecutive windows of ``window`` rows starting at waiting times t_w.

    Returns ``(t_w, m)`` with ``m`` of shape ``(len(t_w), max_lag + 1)``; see ``msd`` and
    ``window_starts``. ``x`` may be any array-like indexable by row slices (a zarr array
    is read one window at a time).
    """
    n = x.shape[0]
    tw = window_starts(n, window, starts, stride)
    max_lag = window - 1 if max_lag is None else int(min(max_lag, window - 1))
    out = np.empty((len(tw), max_lag + 1))
    for i, t in enumerate(tw):
        out[i] = msd(np.asarray(x[t : t + window], dtype=np.float64), max_lag)
    return tw, out


def log_lags(max_lag: int, num: int = 40, min_lag: int = 1) -> np.ndarray:
    """About ``num`` distinct integer lags, evenly spaced in log between ``min_lag`` and ``max_lag``."""
    if max_lag < min_lag:
        return np.arange(0)
    return np.unique(np.round(np.geomspace(min_lag, max_lag, num)).astype(int))


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares fit of ``y = a·x^b`` in log-log space; returns ``(b, a)``.

    Points with non-positive or non-finite ``x`` or ``y`` are skipped; fewer than two
    valid points give ``(nan, nan)``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    b, ln_a = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return float(b), float(np.exp(ln_a))


def local_exponent(m: np.ndarray, span: int = 20, lags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Local exponent β(τ): slope of ln MSD against ln τ over ``span`` consecutive lags.

    ``m`` is indexed by lag (``m[τ]``, as ``msd`` returns) unless ``lags`` gives the lag
    of each entry. Returns ``(tau, beta)`` with ``tau`` the geometric centre of each span
    — the original analysis used spans of 20 lag indices.
    """
    lx, ly = _log_points(m, lags)
    n = len(lx) - span + 1
    if span < 2 or n < 1:
        return np.empty(0), np.empty(0)
    # sliding least-squares slope from prefix sums: O(n) whatever the span
    def window_sum(v):
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[span:] - c[:-span]

    sx, sy = window_sum(lx), window_sum(ly)
    sxx, sxy = window_sum(lx * lx), window_sum(lx * ly)
    beta = (span * sxy - sx * sy) / (span * sxx - sx * sx)
    return np.exp(sx / span), beta


@dataclass
class BrokenPowerLaw:
    """A continuous two-regime power law: MSD ∝ τ^beta_short below tau0, τ^beta_long above."""

    beta_short: float
    beta_long: float
    tau0: float
    amplitude: float  # MSD at τ = 1 on the short-lag branch
    rss: float  # residual sum of squares in ln MSD

    def __call__(self, tau):
        """The fitted MSD at lags ``tau``."""
        lt = np.log(np.asarray(tau, float))
        l0 = np.log(self.tau0)
        y = np.log(self.amplitude) + self.beta_short * lt + (self.beta_long - self.beta_short) * np.maximum(lt - l0, 0)
        return np.exp(y)


def fit_broken_power_law(lags: np.ndarray, m: np.ndarray, min_points: int = 3) -> BrokenPowerLaw:
    """Fit a continuous broken power law to MSD values ``m`` at ``lags``; finds the crossover τ₀.

    ln MSD = c + β₁ ln τ + (β₂ − β₁)·max(0, ln τ − ln τ₀): for every candidate τ₀ (the
    midpoints between sorted ln τ values, keeping ``min_points`` lags on each side) the
    rest is linear least squares; the τ₀ with the least residual wins. Pass log-spaced
    lags (``log_lags``) so that long lags do not dominate the fit.
    """
    lags, m = np.asarray(lags, float), np.asarray(m, float)
    ok = (lags > 0) & (m > 0) & np.isfinite(m)
    lx, ly = np.log(lags[ok]), np.log(m[ok])
    order = np.argsort(lx)
    lx, ly = lx[order], ly[order]
    if len(lx) < 2 * min_points:
        b, a = fit_power_law(np.exp(lx), np.exp(ly)) if len(lx) >= 2 else (np.nan, np.nan)
        return BrokenPowerLaw(b, b, float("nan"), a, float("nan"))
    best = None
    candidates = 0.5 * (lx[min_points - 1 : -min_points] + lx[min_points : len(lx) - min_points + 1])
    for l0 in candidates:
        A = np.column_stack([np.ones_like(lx), lx, np.maximum(lx - l0, 0.0)])
        coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
        rss = float(np.sum((A @ coef - ly) ** 2))
        if best is None or rss < best[0]:
            best = (rss, l0, coef)
    rss, l0, (c, b1, db) = best
    return BrokenPowerLaw(float(b1), float(b1 + db), float(np.exp(l0)), float(np.exp(c)), rss)


def contour_length(x: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """Time-lag-averaged contour length s(τ) = ⟨Σ_{k=t}^{t+τ−1} ‖x[k+1] − x[k]‖⟩_t.

    The path length walked in τ steps, averaged over the same pairs as ``msd``, so that
    ``msd(x)`` against ``contour_length(x)`` is the MSD against contour length.
    """
    x = _as_2d(x)
    T = x.shape[0]
    max_lag = T - 1 if max_lag is None else int(min(max_lag, T - 1))
    step = np.linalg.norm(np.diff(x, axis=0), axis=1)
    c = np.concatenate([[0.0], np.cumsum(step)])  # c[t] = path length from 0 to t
    cc = np.concatenate([[0.0], np.cumsum(c)])
    lags = np.arange(max_lag + 1)
    n = T - lags
    # Σ_{t<n} (c[t+τ] − c[t]) with prefix sums of c
    total = (cc[lags + n] - cc[lags]) - cc[n]
    return total / n


@dataclass
class Roughness:
    """Binned loss-increment roughness: mean squared loss change against displacement."""

    edges: np.ndarray  # bin edges in Δr (n_bins + 1)
    centers: np.ndarray  # geometric bin centres
    msl: np.ndarray  # ⟨ΔL²⟩ per bin (nan where empty)
    counts: np.ndarray  # pairs per bin
    exponent: float  # 2H of the power-law fit MSL ∝ Δr^{2H}
    prefactor: float

    @property
    def hurst(self) -> float:
        """H, half the exponent."""
        return self.exponent / 2


def roughness(
    x: np.ndarray,
    loss: np.ndarray,
    bins: int = 50,
    min_count: int = 10,
    block: int = 256,
    max_pairs: int | None = None,
    seed: int = 0,
    fit_range: tuple[float, float] | None = None,
    spacing: str = "log",
    distance: str = "euclidean",
) -> Roughness:
    """Loss-increment roughness over all pairs i < j of a window.

    ΔL = L_j − L_i against Δr = ‖x_j − x_i‖, binned in ``bins`` log-spaced bins of Δr;
    MSL = ⟨ΔL²⟩ per bin, fitted as MSL ∝ Δr^{2H} over bins with at least ``min_count``
    pairs and, if given, centres within ``fit_range`` = (lo, hi) in units of Δr (long
    separations have few independent pairs and a noisy MSL). Pairs are visited in row blocks (memory O(block · T)); ``max_pairs`` subsamples
    rows (seeded) for very long windows.

    ``spacing="linear"`` uses ``bins`` equal-width bins from the smallest to the largest Δr, as
    the anomalous-diffusion code does (the fit then leans on the long separations, where the
    bins hold most pairs). ``distance="contour"`` bins against the contour length
    s_ij = Σ_{i≤k<j} ‖x[k+1] − x[k]‖ (the path walked between the two points) instead of
    the chord ‖x_j − x_i‖: the MSL against contour length.
    """
    if spacing not in ("log", "linear"):
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    if distance not in ("euclidean", "contour"):
        raise ValueError(f"distance must be 'euclidean' or 'contour', got {distance!r}")
    x = _as_2d(x)
    loss = np.asarray(loss, float)
    T = x.shape[0]
    if max_pairs is not None and T * (T - 1) // 2 > max_pairs:
        keep = int(np.sqrt(2 * max_pairs)) + 1
        idx = np.sort(np.random.default_rng(seed).choice(T, size=min(keep, T), replace=False))
        x, loss, T = x[idx], loss[idx], len(idx)
    sq = np.einsum("td,td->t", x, x)
    walked = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(x, axis=0), axis=1))])

    def pair_blocks():
        for s in range(0, T - 1, block):
            rows = slice(s, min(s + block, T - 1))
            dl = loss[None, :] - loss[rows, None]
            i = np.arange(rows.start, rows.stop)[:, None]
            upper = np.arange(T)[None, :] > i
            if distance == "contour":
                dist = (walked[None, :] - walked[rows, None])[upper]
            else:
                d2 = sq[rows, None] + sq[None, :] - 2.0 * x[rows] @ x.T
                dist = np.sqrt(np.maximum(d2[upper], 0.0))
            yield dist, dl[upper] ** 2

    # two passes: the first finds the range of Δr so that the bins are fixed up front
    lo, hi = np.inf, 0.0
    for dr, _ in pair_blocks():
        pos = dr[dr > 0]
        if pos.size:
            lo, hi = min(lo, pos.min()), max(hi, pos.max())
    if not np.isfinite(lo) or hi <= lo:
        edges = np.linspace(0, 1, bins + 1)
    elif spacing == "linear":
        edges = np.linspace(lo, hi * (1 + 1e-12), bins + 1)
    else:
        edges = np.geomspace(lo, hi * (1 + 1e-12), bins + 1)
    sums = np.zeros(bins)
    counts = np.zeros(bins, dtype=np.int64)
    for dr, dl2 in pair_blocks():
        k = np.searchsorted(edges, dr, side="right") - 1
        ok = (k >= 0) & (k < bins)
        np.add.at(sums, k[ok], dl2[ok])
        counts += np.bincount(k[ok], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        msl = np.where(counts > 0, sums / counts, np.nan)
    centers = np.sqrt(edges[:-1] * edges[1:]) if spacing == "log" else 0.5 * (edges[:-1] + edges[1:])
    use = counts >= min_count
    if fit_range is not None:
        use &= (centers >= fit_range[0]) & (centers <= fit_range[1])
    b, a = fit_power_law(centers[use], msl[use])
    return Roughness(edges, centers, msl, counts, b, a)


def transverse_excursion(x: np.ndarray, fragment: int = 50, stride: int | None = None) -> dict[str, np.ndarray]:
    """Transverse excursion of path fragments from their chords.

    The path is cut into fragments of ``fragment`` steps (``fragment + 1`` points,
    starting every ``stride`` rows, default non-overlapping). For each, the chord runs
    from its first to its last point and the excursion of point k is its distance from
    the chord's line. Returns arrays per fragment: ``start``, ``chord`` (chord length),
    ``max`` and ``mean`` excursion, and ``ratio`` = max / chord.
    """
    x = _as_2d(x)
    stride = fragment if stride is None else int(stride)
    starts = np.arange(0, max(x.shape[0] - fragment, 0), stride)
    out = {k: np.empty(len(starts)) for k in ("chord", "max", "mean", "ratio")}
    for i, s in enumerate(starts):
        y = x[s : s + fragment + 1] - x[s]
        chord = y[-1]
        c2 = float(chord @ chord)
        along2 = (y @ chord) ** 2 / c2 if c2 > 0 else 0.0
        perp = np.sqrt(np.maximum(np.einsum("td,td->t", y, y) - along2, 0.0))
        out["chord"][i] = np.sqrt(c2)
        out["max"][i] = perp.max()
        out["mean"][i] = perp.mean()
        out["ratio"][i] = perp.max() / np.sqrt(c2) if c2 > 0 else np.nan
    out["start"] = starts
    return out


def _as_2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def _fft_size(n: int) -> int:
    # next 5-smooth length: numpy's pocketfft is fastest on those
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1
