"""Gradient-noise measurements: per-sample gradient statistics and the imagenet-grad-noise probes."""

from .nonuniformity import HessianVarianceOperator, NonUniformity, nonuniformity, stability_margins
from .per_sample import (
    GradientStatistics,
    iter_per_sample_gradients,
    model_mode,
    per_sample_gradients,
    per_sample_statistics,
    statistics_from_gradients,
)

__all__ = [
    "GradientStatistics",
    "HessianVarianceOperator",
    "NonUniformity",
    "iter_per_sample_gradients",
    "model_mode",
    "nonuniformity",
    "per_sample_gradients",
    "per_sample_statistics",
    "stability_margins",
    "statistics_from_gradients",
]
