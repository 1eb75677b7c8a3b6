"""The drift study's own sections: ``explain:`` (CAM methods, samples, targets), ``drift:`` (metrics,
analysis size, zone grid, method equivalence) and ``report:``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from evidrift.core.config import Section

DEFAULT_EXPLAIN_METHODS = ["gradcam++", "layercam", "gradcam", "xgradcam"]


class ExplainConfig(Section):
    """Which maps are computed: methods (see ``evidrift.cam``), samples (``tp_both`` = test images correctly
    classified at both stages, ``tp_any``, ``all``), target class (``label`` or ``prediction``), score
    (``logit`` or ``softmax``)."""

    methods: list[str] = DEFAULT_EXPLAIN_METHODS
    samples: Literal["tp_both", "tp_any", "all"] = "tp_both"
    target: Literal["label", "prediction"] = "label"
    score: Literal["logit", "softmax"] = "logit"
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_images: Annotated[int, Field(ge=1)] | None = None
    shard_size: Annotated[int, Field(ge=1)] = 256


class DriftConfig(Section):
    """Reference-free drift metrics (ARCHITECTURE §6). ``metrics``: ``all`` or names; ``size``: analysis side
    in pixels, one for the whole study (null = the smallest input size of the study's models); ``zone_grid``:
    [rows, columns]; ``topk``: fractions for @k; ``equivalence_spearman``: two methods whose maps agree with
    a median Spearman ≥ this (or differ by ≤ 1e-3 after min-max) for every architecture at a layer count as
    one method there."""

    metrics: list[str] | Literal["all"] = "all"
    size: Annotated[int, Field(ge=8, le=1024)] | None = None
    zone_grid: tuple[int, int] = (3, 2)
    topk: list[Annotated[float, Field(gt=0, lt=1)]] = [0.05, 0.10, 0.20, 0.30]
    equivalence_spearman: Annotated[float, Field(gt=0, le=1)] = 0.99


class ReportConfig(Section):
    """The HTML report: ``examples`` overlays per (arch, method) for typical and most-drifted images."""

    enabled: bool = True
    examples: Annotated[int, Field(ge=0, le=32)] = 3
    title: str = "evidrift study"
