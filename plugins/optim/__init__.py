"""The optimizer-variant plugins: ``sam`` (sam.py), ``smoothout`` (smoothout.py) and
``entropy-sgd`` (entropy_sgd.py), thin step owners around the algorithms of ``lscape.optim``.

The names below are ``lscape.optim``'s, kept here so that older imports keep working.
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

__all__ = [
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
