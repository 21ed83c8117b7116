"""Landscape geometry: filter-normalised directions, 1-D/2-D slices, interpolation, ε-sharpness, and their probes."""

from lscape import hookimpl

from .directions import filter_normalize, filter_normalized_direction, normalize_to, random_direction
from .interpolation import interpolate_state, interpolation_curve
from .probes import EpsSharpness, Interpolate, Landscape, fill_surface, load_model_state
from .sharpness import SharpnessResult, eps_sharpness, eps_sharpness_repeated, model_objective
from .slices import Displacement, displaced, evaluate, parse_range, slice_1d, surface_2d, surface_rows

__all__ = [
    "Displacement",
    "EpsSharpness",
    "Interpolate",
    "Landscape",
    "SharpnessResult",
    "displaced",
    "eps_sharpness",
    "eps_sharpness_repeated",
    "evaluate",
    "fill_surface",
    "filter_normalize",
    "filter_normalized_direction",
    "interpolate_state",
    "interpolation_curve",
    "load_model_state",
    "model_objective",
    "normalize_to",
    "parse_range",
    "random_direction",
    "slice_1d",
    "surface_2d",
    "surface_rows",
]


@hookimpl
def register_probes(register):
    register(Landscape)
    register(Interpolate)
    register(EpsSharpness)


@hookimpl
def register_plots(register):
    from .plots import plot_eps_sharpness, plot_interpolation, plot_slices, plot_surfaces

    register("landscape", plot_slices)
    register("landscape", plot_surfaces)
    register("interpolate", plot_interpolation)
    register("eps-sharpness", plot_eps_sharpness)
