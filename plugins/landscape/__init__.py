"""Landscape geometry: filter-normalised directions, 1-D/2-D slices, interpolation, ε-sharpness.

One public module per probe — `landscape`, `interpolate`, `eps_sharpness` — each registering
its probe and figures; the maths they share lives in the private modules beside them and is
re-exported here as the family's Python API."""

from ._common import load_model_state
from ._directions import (
    normalize_layerwise,
    random_state_direction,
    state_tensors,
    filter_normalize,
    filter_normalized_direction,
    normalize_to,
    random_direction,
)
from ._interpolation import interpolate_state, interpolation_curve
from ._pca import checkpoint_states, pca_directions, trajectory_matrix
from ._slices import (
    Displacement,
    displaced,
    evaluate,
    parse_range,
    slice_1d,
    surface_2d,
    surface_rows,
)
from .eps_sharpness import EpsSharpness
from .interpolate import Interpolate
from .landscape import Landscape, fill_surface

# after the plugin modules: importing the `eps_sharpness` module sets this package's attribute of
# that name, and the package's `eps_sharpness` is the function (the module stays importable by path)
from ._keskar import (  # noqa: E402
    SharpnessResult,
    eps_sharpness,
    eps_sharpness_repeated,
    model_objective,
    random_subspace,
)

__all__ = [
    "checkpoint_states",
    "normalize_layerwise",
    "pca_directions",
    "random_state_direction",
    "state_tensors",
    "trajectory_matrix",
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
    "random_subspace",
    "normalize_to",
    "parse_range",
    "random_direction",
    "slice_1d",
    "surface_2d",
    "surface_rows",
]
