"""Complexity of one map (ARCHITECTURE §6): ``entropy``, ``gini``, ``sparseness``. [N, H, W] → float64 [N].

All three are invariant to positive scaling of the map and computed after the common preparation
(``evidrift.metrics.common.AnalysisMaps``: resize, negatives clipped to 0). A degenerate map (all zero or
non-finite) gives NaN.

- ``entropy``: Shannon entropy of p = m / Σm divided by log(H·W): 0 = all mass on one pixel, 1 = uniform.
- ``gini``: Gini coefficient of the pixel values, ``Σ_i (2i − n − 1) m_(i) / (n Σ m)`` over the values sorted
  ascending (i = 1..n): 0 = uniform, 1 − 1/n = one pixel.
- ``sparseness``: Hoyer's sparseness ``(√n − ‖m‖₁/‖m‖₂) / (√n − 1)``: 0 = uniform, 1 = one pixel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evidrift.metrics.common import AnalysisMaps, nan_where


def _prepared(maps: Tensor | AnalysisMaps, size: int | tuple[int, int] | None = None) -> AnalysisMaps:
    return maps if isinstance(maps, AnalysisMaps) else AnalysisMaps(maps, size)


def entropy(maps: Tensor | AnalysisMaps) -> Tensor:
    """Normalized Shannon entropy of p, float64 [N] in [0, 1]; NaN for degenerate maps."""
    m = _prepared(maps)
    return nan_where(m.entropy_bits / math.log2(m.pixels), m.degenerate)


def gini(maps: Tensor | AnalysisMaps) -> Tensor:
    """Gini coefficient of the pixel values, float64 [N] in [0, 1 − 1/n]; NaN for degenerate maps."""
    m = _prepared(maps)
    n = m.pixels
    weights = torch.arange(1, n + 1, device=m.device, dtype=torch.float64) * 2.0 - (n + 1)
    weighted = m.sorted.double() @ weights
    return nan_where(weighted / (n * m.total), m.degenerate)


def sparseness(maps: Tensor | AnalysisMaps) -> Tensor:
    """Hoyer sparseness, float64 [N] in [0, 1]; NaN for degenerate maps."""
    m = _prepared(maps)
    n = m.pixels
    l2 = torch.linalg.vector_norm(m.flat, dim=1, dtype=torch.float64)
    l2 = torch.where(m.degenerate, torch.ones_like(l2), l2)
    root = math.sqrt(n)
    value = (root - m.total / l2) / (root - 1.0)
    return nan_where(value.clamp(0.0, 1.0), m.degenerate)


COMPLEXITY_METRICS = {"entropy": entropy, "gini": gini, "sparseness": sparseness}
