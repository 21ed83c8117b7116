"""Gradient-noise measurements: per-sample gradient statistics and the imagenet-grad-noise probes.

One public module per probe (`grad_noise`, `grad_stats`); the estimators they share live in the
private modules beside them and are re-exported here."""

from ._common import BatchSampler

from ._nonuniformity import HessianVarianceOperator, NonUniformity, nonuniformity, stability_margins
from ._per_sample import (
    GradientStatistics,
    iter_per_sample_gradients,
    model_mode,
    per_sample_gradients,
    per_sample_statistics,
    statistics_from_gradients,
)
from .grad_noise import GradNoise
from .grad_stats import GradStats

__all__ = [
    "BatchSampler",
    "GradNoise",
    "GradStats",
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
