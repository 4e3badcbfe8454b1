"""Metrics computed from features.h5 and cached as ``<run>/cache/<metric><suffix>.h5``.

`METRICS` maps each name to a `Metric` (registered by `register_metric` in one small module
per metric); `cache_run` is everything cache.py does. Cache file layouts: docs/METRICS.md.
"""

# isort: off
# Registration order is the order cache.py computes and lists the metrics in.
from Utils.metrics import (  # noqa: F401  (each module registers its metric)
    translation,
    scale,
    rescale,
    gradient,
    performance,
    network,
    phase,
    weights_grads,
    weights_grads_full,
    symmetry_violation,
    norms,
    distance,
    budget,
    equilibrium,
)

# isort: on
from Utils.metrics.base import (
    ALIASES,
    METRICS,
    Context,
    FeaturesInfo,
    Metric,
    parse_metric_list,
    register_metric,
    resolve_metric,
)
from Utils.metrics.io import cache_path, load_cache, open_cache
from Utils.metrics.runner import cache_run

__all__ = [
    "ALIASES",
    "METRICS",
    "Context",
    "FeaturesInfo",
    "Metric",
    "cache_path",
    "cache_run",
    "load_cache",
    "open_cache",
    "parse_metric_list",
    "register_metric",
    "resolve_metric",
]
