"""The optimizer-variant plugins: ``sam`` (sam.py), ``smoothout`` (smoothout.py) and
``entropy-sgd`` (entropy_sgd.py), thin step owners around the algorithms of ``lscape.optim``.

``VariantStep`` is the base class of such a step owner (CONTRIBUTING.md: "Add an optimizer
variant"). The other names are ``lscape.optim``'s, kept here so that older imports keep working.
"""

from lscape.optim import (
    SAM,
    EntropySGD,
    SmoothOut,
    WrappedOptimizer,
    batchnorm_stats_frozen,
    ghost_closures,
    sam_edge,
    smoothout_coefficient,
    smoothout_noise,
)
from lscape.plugins.optim._variant import VariantStep

__all__ = [
    "VariantStep",
    "SAM",
    "SmoothOut",
    "EntropySGD",
    "WrappedOptimizer",
    "batchnorm_stats_frozen",
    "sam_edge",
    "smoothout_coefficient",
    "smoothout_noise",
    "ghost_closures",
]
