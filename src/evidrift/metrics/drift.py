"""Reference-free drift metrics: map a vs map b (ARCHITECTURE §6). Batched: [N, H, W] pairs → float64 [N].

Every metric is one function ``fn(a, b, **params)`` taking two ``AnalysisMaps`` (or raw tensors, which are
prepared with the defaults) and returning float64 [N] with NaN where a map breaks it. ``compare`` runs any
set of them over a dataset in cache-sized chunks and returns a table with degenerate flags and reasons.

Definitions (choices the design leaves open are stated here and in the README's metric reference):
- Preparation: both maps resized bilinearly (``align_corners=False``) to the analysis size, then negatives
  clipped to 0. p = m / Σm, q = (m − min) / (max − min). Coordinates in units of the image diagonal.
- ``topk_iou@k`` / ``dice@k``: top-k sets of ``ceil(k·H·W)`` pixels by value, ties at the threshold included,
  zero pixels excluded (see ``evidrift.metrics.common``); |A∩B| / |A∪B| and 2|A∩B| / (|A| + |B|). [0, 1].
- ``centroid_shift``: ‖Σ p_a·xy − Σ p_b·xy‖; ``peak_shift``: distance between the argmax pixels' centres
  (first maximum in row-major order on ties). Diagonal units, [0, 1].
- ``zone_agreement``: 1.0 if the zone of largest p-mass (``rows × cols`` grid over the whole image, default
  3 × 2, first zone in row-major order on ties) is the same, else 0.0.
  ``zone_tv`` = ½ Σ_z |z_a − z_b| ∈ [0, 1].
- ``pearson`` / ``cosine`` on the clipped maps m (float32 products, float64 sums; Pearson from raw moments in
  float64); ``spearman`` = Pearson of tie-averaged ranks of m.
  Pearson and Spearman are NaN for a constant map (zero variance).
- ``ssim``: on q_a, q_b; Gaussian window σ = 1.5 truncated at 3.5σ (11 taps), data range 1, K1 = 0.01,
  K2 = 0.03, population covariance, mean over the pixels at least 5 from the border (scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``).
  NaN for a constant map (q undefined). Needs H, W ≥ 11.
- ``js``: Jensen–Shannon divergence of p_a, p_b in bits, [0, 1] (the square of scipy's
  ``jensenshannon(base=2)``).
- ``entropy_change`` = H(p_b) − H(p_a), H normalized by log(H·W); ``gini_change`` = G(b) − G(a);
  ``topk_mass_change@k`` = (mass of p_b in its K largest pixels) − (same for p_a). Signed, in [−1, 1].
- Degenerate map (non-finite or all zero): NaN for every metric. Constant map: NaN for pearson, spearman,
  ssim.

Directions (for rankings, ``metric_direction``): ``higher`` = more stable (overlaps, correlations, SSIM,
zone agreement), ``lower`` = more stable (shifts, divergences), ``zero`` = closer to 0 is more stable (signed
changes; ranked on their absolute value).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from evidrift.core.errors import UsageError
from evidrift.metrics import complexity
from evidrift.metrics.common import (
    AnalysisMaps,
    gaussian_filter_valid,
    gaussian_kernel1d,
    nan_where,
    plogp_sum,
    share_sort,
)

DEFAULT_TOPK: tuple[float, ...] = (0.05, 0.10, 0.20, 0.30)
DEFAULT_ZONE_GRID: tuple[int, int] = (3, 2)
SSIM_K1 = 0.01
SSIM_K2 = 0.03

Direction = Literal["higher", "lower", "zero"]
MapsLike = Tensor | AnalysisMaps


def _pair(a: MapsLike, b: MapsLike) -> tuple[AnalysisMaps, AnalysisMaps]:
    if not isinstance(a, AnalysisMaps) or not isinstance(b, AnalysisMaps):
        size = _common_size(a, b)
        a = a if isinstance(a, AnalysisMaps) else AnalysisMaps(a, size)
        b = b if isinstance(b, AnalysisMaps) else AnalysisMaps(b, size)
    if a.n != b.n or a.shape != b.shape:
        raise ValueError(f"map batches differ: a is {a.n}×{a.shape}, b is {b.n}×{b.shape}")
    return a, b


def _common_size(a: MapsLike, b: MapsLike) -> tuple[int, int]:
    sa = a.shape if isinstance(a, AnalysisMaps) else tuple(a.shape[-2:])
    sb = b.shape if isinstance(b, AnalysisMaps) else tuple(b.shape[-2:])
    return max(sa[0], sb[0]), max(sa[1], sb[1])


def _broken(a: AnalysisMaps, b: AnalysisMaps, needs_spread: bool = False) -> Tensor:
    bad = a.degenerate | b.degenerate
    if needs_spread:
        bad = bad | a.constant | b.constant
    return bad


# --- overlap ------------------------------------------------------------------------------------------------
def _overlap_counts(a: AnalysisMaps, b: AnalysisMaps, k: float) -> tuple[Tensor, Tensor, Tensor]:
    key = ("overlap", k, id(b))
    cached = a.cache.get(key)
    if cached is None:
        ma, mb = a.topk_mask(k), b.topk_mask(k)
        inter = (ma & mb).sum(dim=1, dtype=torch.float64)
        cached = (inter, ma.sum(dim=1, dtype=torch.float64), mb.sum(dim=1, dtype=torch.float64))
        a.cache[key] = cached
    return cast(tuple[Tensor, Tensor, Tensor], cached)  # a.cache holds several kinds, keyed by their name


def topk_iou(a: MapsLike, b: MapsLike, k: float = 0.1) -> Tensor:
    """IoU of the two maps' top-k sets, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    inter, na, nb = _overlap_counts(a, b, k)
    union = (na + nb - inter).clamp_min(1.0)
    return nan_where(inter / union, _broken(a, b))


def dice(a: MapsLike, b: MapsLike, k: float = 0.1) -> Tensor:
    """Dice coefficient of the two maps' top-k sets, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    inter, na, nb = _overlap_counts(a, b, k)
    return nan_where(2.0 * inter / (na + nb).clamp_min(1.0), _broken(a, b))


# --- location -----------------------------------------------------------------------------------------------
def centroid_shift(a: MapsLike, b: MapsLike) -> Tensor:
    """Distance between the centres of mass of p_a and p_b, in image diagonals, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    return nan_where(torch.linalg.vector_norm(a.centroid - b.centroid, dim=1), _broken(a, b))


def peak_shift(a: MapsLike, b: MapsLike) -> Tensor:
    """Distance between the argmax pixels (first on ties), in image diagonals, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    return nan_where(torch.linalg.vector_norm(a.peak - b.peak, dim=1), _broken(a, b))


def zone_agreement(a: MapsLike, b: MapsLike, grid: tuple[int, int] = DEFAULT_ZONE_GRID) -> Tensor:
    """1.0 when both maps put most mass in the same zone of a rows × cols grid, else 0.0; float64 [N]."""
    a, b = _pair(a, b)
    same = a.zones(grid).argmax(dim=1) == b.zones(grid).argmax(dim=1)
    return nan_where(same.double(), _broken(a, b))


def zone_tv(a: MapsLike, b: MapsLike, grid: tuple[int, int] = DEFAULT_ZONE_GRID) -> Tensor:
    """Total-variation distance ½ Σ |z_a − z_b| between zone masses, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    tv = 0.5 * (a.zones(grid) - b.zones(grid)).abs().sum(dim=1)
    return nan_where(tv, _broken(a, b))


# --- correlation --------------------------------------------------------------------------------------------
def _moments(a: AnalysisMaps, b: AnalysisMaps) -> tuple[Tensor, Tensor, Tensor]:
    """Σ a², Σ b², Σ a·b of the flattened clipped maps, float64 [N] (float32 products, float64 sums)."""
    key = ("moments", id(b))
    cached = a.cache.get(key)
    if cached is None:
        cross = (a.flat * b.flat).sum(dim=1, dtype=torch.float64)
        cached = (a.sum_squares, b.sum_squares, cross)
        a.cache[key] = cached
    return cast(tuple[Tensor, Tensor, Tensor], cached)  # a.cache holds several kinds, keyed by their name


def _correlation(sxy: Tensor, sxx: Tensor, syy: Tensor, mx: Tensor, my: Tensor, n: int) -> Tensor:
    """Pearson r from raw moments (float64), clamped to [−1, 1]; 0 where a variance is 0."""
    cov = sxy / n - mx * my
    vx = (sxx / n - mx * mx).clamp_min(0.0)
    vy = (syy / n - my * my).clamp_min(0.0)
    den = torch.sqrt(vx * vy)
    return (cov / torch.where(den > 0, den, torch.ones_like(den))).clamp(-1.0, 1.0)


def pearson(a: MapsLike, b: MapsLike) -> Tensor:
    """Pearson correlation of the flattened maps, float64 [N] in [−1, 1]; NaN for constant maps."""
    a, b = _pair(a, b)
    saa, sbb, sab = _moments(a, b)
    n = a.pixels
    r = _correlation(sab, saa, sbb, a.total / n, b.total / n, n)
    return nan_where(r, _broken(a, b, needs_spread=True))


def spearman(a: MapsLike, b: MapsLike) -> Tensor:
    """Spearman correlation (Pearson of tie-averaged ranks), float64 [N] in [−1, 1]; NaN for constant maps."""
    a, b = _pair(a, b)
    n = a.pixels
    mean = torch.full((a.n,), (n + 1) / 2.0, dtype=torch.float64, device=a.device)
    cross = (a.ranks * b.ranks).sum(dim=1)
    r = _correlation(cross, a.rank_sum_squares, b.rank_sum_squares, mean, mean, n)
    return nan_where(r, _broken(a, b, needs_spread=True))


def cosine(a: MapsLike, b: MapsLike) -> Tensor:
    """Cosine similarity of the flattened clipped maps, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    saa, sbb, sab = _moments(a, b)
    den = torch.sqrt(saa * sbb)
    value = (sab / torch.where(den > 0, den, torch.ones_like(den))).clamp(0.0, 1.0)
    return nan_where(value, _broken(a, b))


def ssim(a: MapsLike, b: MapsLike) -> Tensor:
    """Mean SSIM of the min-max normalized maps (module docstring), float64 [N] in [−1, 1]."""
    a, b = _pair(a, b)
    h, w = a.shape
    kernel = gaussian_kernel1d()
    if min(h, w) < len(kernel):
        raise UsageError(
            f"ssim needs maps of at least {len(kernel)}×{len(kernel)} pixels, got {h}×{w}; "
            "raise the analysis size (drift.size)"
        )
    qa, qb = a.q, b.q
    stack = torch.cat([qa, qb, qa * qa + qb * qb, qa * qb], dim=0)
    filtered = gaussian_filter_valid(stack, kernel)
    mu_a, mu_b, second, cross = filtered.split(a.n, dim=0)
    c1 = SSIM_K1**2
    c2 = SSIM_K2**2
    mu_ab = mu_a * mu_b
    mu_sq = mu_a * mu_a + mu_b * mu_b
    num = (2.0 * mu_ab + c1) * (2.0 * (cross - mu_ab) + c2)
    den = (mu_sq + c1) * (second - mu_sq + c2)
    value = (num / den).mean(dim=(1, 2), dtype=torch.float64)
    return nan_where(value, _broken(a, b, needs_spread=True))


# --- distributions ------------------------------------------------------------------------------------------
def js(a: MapsLike, b: MapsLike) -> Tensor:
    """Jensen–Shannon divergence of p_a and p_b in bits, float64 [N] in [0, 1]."""
    a, b = _pair(a, b)
    mid = (a.p + b.p).mul_(0.5).flatten(1)
    h_mid = -plogp_sum(mid) / math.log(2.0)
    value = h_mid - 0.5 * (a.entropy_bits + b.entropy_bits)
    return nan_where(value.clamp(0.0, 1.0), _broken(a, b))


def entropy_change(a: MapsLike, b: MapsLike) -> Tensor:
    """Normalized entropy of b minus that of a, float64 [N] in [−1, 1] (> 0: b more diffuse)."""
    a, b = _pair(a, b)
    return complexity.entropy(b) - complexity.entropy(a)


def gini_change(a: MapsLike, b: MapsLike) -> Tensor:
    """Gini coefficient of b minus that of a, float64 [N] in [−1, 1] (> 0: b more concentrated)."""
    a, b = _pair(a, b)
    return complexity.gini(b) - complexity.gini(a)


def topk_mass_change(a: MapsLike, b: MapsLike, k: float = 0.1) -> Tensor:
    """Share of mass in the K largest pixels of b minus that of a, float64 [N] in [−1, 1]."""
    a, b = _pair(a, b)
    return nan_where(b.topk_mass(k) - a.topk_mass(k), _broken(a, b))


# --- registry -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftMetric:
    """One registered drift metric: base name, function, stability direction, range, whether it takes k."""

    name: str
    fn: Callable[..., Tensor]
    direction: Direction
    bounds: tuple[float, float]
    takes_k: bool = False
    takes_grid: bool = False
    needs_sort: bool = False


DRIFT_METRICS: dict[str, DriftMetric] = {
    m.name: m
    for m in [
        DriftMetric("topk_iou", topk_iou, "higher", (0.0, 1.0), takes_k=True),
        DriftMetric("dice", dice, "higher", (0.0, 1.0), takes_k=True),
        DriftMetric("centroid_shift", centroid_shift, "lower", (0.0, 1.0)),
        DriftMetric("peak_shift", peak_shift, "lower", (0.0, 1.0)),
        DriftMetric("zone_agreement", zone_agreement, "higher", (0.0, 1.0), takes_grid=True),
        DriftMetric("zone_tv", zone_tv, "lower", (0.0, 1.0), takes_grid=True),
        DriftMetric("pearson", pearson, "higher", (-1.0, 1.0)),
        DriftMetric("spearman", spearman, "higher", (-1.0, 1.0), needs_sort=True),
        DriftMetric("cosine", cosine, "higher", (0.0, 1.0)),
        DriftMetric("ssim", ssim, "higher", (-1.0, 1.0)),
        DriftMetric("js", js, "lower", (0.0, 1.0)),
        DriftMetric("entropy_change", entropy_change, "zero", (-1.0, 1.0)),
        DriftMetric("gini_change", gini_change, "zero", (-1.0, 1.0), needs_sort=True),
        DriftMetric("topk_mass_change", topk_mass_change, "zero", (-1.0, 1.0), takes_k=True, needs_sort=True),
    ]
}

#: Other spellings accepted wherever a metric name is read (config, CLI); values are base names.
METRIC_ALIASES: dict[str, str] = {
    "iou": "topk_iou",
    "topk_dice": "dice",
    "centroid": "centroid_shift",
    "peak": "peak_shift",
    "zone": "zone_agreement",
    "pearsonr": "pearson",
    "spearmanr": "spearman",
    "rank_correlation": "spearman",
    "cosine_similarity": "cosine",
    "jsd": "js",
    "jensen_shannon": "js",
    "entropy_delta": "entropy_change",
    "gini_delta": "gini_change",
    "mass_change": "topk_mass_change",
}

_NAME = re.compile(r"^(?P<base>[a-z_]+)(?:@(?P<k>[0-9]*\.?[0-9]+))?$")


def format_k(k: float) -> str:
    """Canonical spelling of k in metric names: ``0.05``, ``0.1``, ``0.2`` (``%g``)."""
    return f"{k:g}"


def resolve_metric(name: str) -> tuple[str, DriftMetric, float | None]:
    """Parse a metric name (aliases allowed, ``@k`` with k in (0, 1)) → (canonical name, metric, k).

    Raises ValueError naming the metric and the known names.
    """
    match = _NAME.match(name.strip().lower())
    base = match.group("base") if match else None
    base = METRIC_ALIASES.get(base, base) if base else None
    if base not in DRIFT_METRICS:
        raise UsageError(
            f"unknown drift metric {name!r}; known: {', '.join(DRIFT_METRICS)} "
            f"(aliases: {', '.join(sorted(METRIC_ALIASES))}; @k for "
            f"{', '.join(m.name for m in DRIFT_METRICS.values() if m.takes_k)})"
        )
    metric = DRIFT_METRICS[base]
    k_text = match.group("k") if match else None
    if metric.takes_k:
        if k_text is None:
            raise UsageError(f"drift metric {name!r} needs a fraction: e.g. {base}@0.1")
        k = float(k_text)
        if not 0.0 < k < 1.0:
            raise UsageError(f"drift metric {name!r}: k = {k:g} must be in (0, 1)")
        return f"{base}@{format_k(k)}", metric, k
    if k_text is not None:
        raise UsageError(f"drift metric {name!r} takes no @k; use {base!r}")
    return base, metric, None


def default_metric_names(topk: Sequence[float] = DEFAULT_TOPK) -> list[str]:
    """Every drift metric, @k metrics expanded over ``topk``, in registry order."""
    names: list[str] = []
    for metric in DRIFT_METRICS.values():
        if metric.takes_k:
            names.extend(f"{metric.name}@{format_k(k)}" for k in topk)
        else:
            names.append(metric.name)
    return names


def metric_direction(name: str) -> Direction:
    """Stability direction of a drift metric name (``higher``/``lower``/``zero``); see module docstring."""
    return resolve_metric(name)[1].direction


def degenerate_reasons(a: AnalysisMaps, b: AnalysisMaps) -> list[str]:
    """Per pair: '' or e.g. 'a: all zero; b: non-finite' (constant maps are listed too)."""
    flags = []
    for side, maps in (("a", a), ("b", b)):
        for label, mask in (
            ("non-finite", maps.nonfinite),
            ("all zero", maps.zero),
            ("constant", maps.constant),
        ):
            flags.append((f"{side}: {label}", mask.cpu().numpy()))
    return ["; ".join(label for label, mask in flags if mask[i]) for i in range(a.n)]


def compare(
    a: Tensor,
    b: Tensor,
    metrics: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    zone_grid: tuple[int, int] = DEFAULT_ZONE_GRID,
    chunk_size: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """Drift between paired maps ``a[i]`` and ``b[i]`` ([N, h, w] each, any float dtype, sizes may differ).

    ``metrics``: names (aliases and ``@k`` accepted; None = ``default_metric_names()``); ``size``: analysis
    size (int or (H, W); None = the larger of the two inputs' sizes). Pairs are processed ``chunk_size`` at a
    time on the tensors' device; on CPU, ``torch.get_num_threads()`` chunks run at once, each with
    single-threaded torch ops (the thread count is restored on return).
    Returns a DataFrame with one row per pair: one float64 column per metric (canonical names, NaN where a map
    breaks the metric), ``degenerate`` (bool: either map non-finite, all zero or constant) and
    ``degenerate_reason`` (str, '' when not degenerate). Never raises for bad maps.
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"compare needs two [N, h, w] batches of equal N, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    resolved = [resolve_metric(name) for name in (metrics if metrics is not None else default_metric_names())]
    names = list(dict.fromkeys(r[0] for r in resolved))
    by_name = {r[0]: r for r in resolved}
    if size is None:
        size = _common_size(a, b)
    needs_sort = any(by_name[name][1].needs_sort for name in names)
    n = a.shape[0]
    columns = {name: np.empty(n, dtype=np.float64) for name in names}
    degenerate = np.zeros(n, dtype=bool)
    reasons: list[str] = [""] * n
    chunk_size = max(1, int(chunk_size))
    starts = list(range(0, n, chunk_size))

    def run_chunk(start: int) -> None:
        stop = min(n, start + chunk_size)
        pa = AnalysisMaps(a[start:stop], size)
        pb = AnalysisMaps(b[start:stop], size)
        if needs_sort:  # one sort of both batches together serves ranks, thresholds and masses
            share_sort(pa, pb)
        for name in names:
            _, metric, k = by_name[name]
            kwargs: dict[str, object] = {}
            if metric.takes_k:
                kwargs["k"] = k
            if metric.takes_grid:
                kwargs["grid"] = zone_grid
            columns[name][start:stop] = metric.fn(pa, pb, **kwargs).cpu().numpy()
        bad = pa.degenerate | pb.degenerate | pa.constant | pb.constant
        degenerate[start:stop] = bad.cpu().numpy()
        reasons[start:stop] = degenerate_reasons(pa, pb)

    bar = tqdm(total=len(starts), disable=not progress, desc="drift", unit="chunk")
    workers = min(torch.get_num_threads(), len(starts)) if a.device.type == "cpu" else 1
    if workers <= 1:
        for start in starts:
            run_chunk(start)
            bar.update()
    else:
        # CPU: one chunk per core, each computed with single-threaded torch ops (torch releases the GIL).
        # Coarse parallelism keeps both cores busy without per-op thread barriers, which stall badly on a
        # shared or oversubscribed machine.
        previous = torch.get_num_threads()

        def single_threaded(start: int) -> None:
            torch.set_num_threads(1)
            run_chunk(start)

        try:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(single_threaded, starts):
                    bar.update()
        finally:
            torch.set_num_threads(previous)
    bar.close()
    frame = pd.DataFrame(columns)
    frame["degenerate"] = degenerate
    frame["degenerate_reason"] = reasons
    return frame
