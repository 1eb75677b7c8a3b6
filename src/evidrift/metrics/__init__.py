"""Metrics of explanation maps (ARCHITECTURE §6): drift (map vs map), localization (map vs mask/boxes) and
complexity (one map). Tensors in, tensors or tables out; nothing here knows about files or configs."""

from evidrift.metrics.common import AnalysisMaps
from evidrift.metrics.drift import (
    DRIFT_METRICS,
    METRIC_ALIASES,
    compare,
    default_metric_names,
    metric_direction,
    resolve_metric,
)

__all__ = [
    "DRIFT_METRICS",
    "METRIC_ALIASES",
    "AnalysisMaps",
    "compare",
    "default_metric_names",
    "metric_direction",
    "resolve_metric",
]
