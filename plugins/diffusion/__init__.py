"""Weight diffusion: the `trajectory` probe, the `diffusion` analysis (MSD, exponents, roughness), JL projections."""

from lscape import hookimpl

from .analysis import Diffusion, analyse_run, analyse_window, register_commands
from .msd import (
    BrokenPowerLaw,
    Roughness,
    contour_length,
    ensemble_msd,
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
    window_starts,
    windowed_msd,
)
from .projection import RandomProjection
from .trajectory import Trajectory

__all__ = [
    "BrokenPowerLaw",
    "Diffusion",
    "Roughness",
    "RandomProjection",
    "Trajectory",
    "analyse_run",
    "analyse_window",
    "contour_length",
    "ensemble_msd",
    "epoch_gradient_noise",
    "fit_broken_power_law",
    "fit_power_law",
    "local_exponent",
    "log_lags",
    "msd",
    "msd_from",
    "roughness",
    "transverse_excursion",
    "two_point_exponent",
    "window_starts",
    "windowed_msd",
]


@hookimpl
def register_probes(register):
    register(Trajectory)


@hookimpl
def register_plugins(register):
    register(Diffusion)


@hookimpl
def register_plots(register):
    from .plots import plot_beta, plot_contour_msl, plot_grad_noise, plot_msd, plot_roughness

    register("diffusion", plot_msd)
    register("diffusion", plot_beta)
    register("diffusion", plot_roughness)
    register("diffusion", plot_contour_msl)
    register("diffusion", plot_grad_noise)
