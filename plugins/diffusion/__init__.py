"""Weight diffusion: the `trajectory` probe, the `diffusion` analysis (MSD, exponents, roughness), JL projections.

One public module per plugin (`trajectory`, `diffusion`); the maths they share lives in the
private modules beside them and is re-exported here."""

from .diffusion import Diffusion, analyse_epochs, analyse_run, analyse_window
from ._msd import (
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
from ._projection import RandomProjection
from .trajectory import Trajectory

__all__ = [
    "BrokenPowerLaw",
    "Diffusion",
    "Roughness",
    "RandomProjection",
    "Trajectory",
    "analyse_epochs",
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

