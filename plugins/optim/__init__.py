"""Optimizer variants that own the step (SAM, SmoothOut, Entropy-SGD) around any torch.optim optimizer."""

from lscape.plugins.optim.entropy_sgd import EntropySGD
from lscape.plugins.optim.sam import SAM, sam_edge
from lscape.plugins.optim.smoothout import SmoothOut, ghost_closures, smoothout_coefficient, smoothout_noise
from lscape.plugins.optim.wrapped import WrappedOptimizer, batchnorm_stats_frozen

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
