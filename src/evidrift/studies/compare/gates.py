"""The gates of ``evidrift compare``: fixed thresholds and the noise-band gate, as one list of verdicts.

A verdict is one (gate, metric, method) check with everything a CI system or a person needs to trust it:
the mean of the metric A → B with its percentile-bootstrap CI, the threshold or the band, the p-value and
whether it passed. The console table, ``--json``, ``--junit`` and the report are all rendered from this list.

Fixed thresholds (``--fail-below M=V`` / ``--fail-above M=V``): the mean of M over the images
(``summary.csv``) must be ≥ / ≤ V, for every method; a NaN mean (every map degenerate) fails.

The noise-band gate (``--fail-beyond-band M`` or ``M@METHOD``): the band is the drift of A against a second
checkpoint of its recipe (``--baseline A2``), or of A's maps of x against its maps of x perturbed
(``--band input-noise``), on the same images. Per image, every drift metric is turned into a dissimilarity
u ≥ 0 that is 0 for identical maps: u = 1 − v for ``higher`` metrics (overlaps, correlations, SSIM, zone
agreement), u = v for ``lower`` ones (shifts, divergences), u = |v| for signed ``zero`` ones. With tolerance
T (``--band-tolerance``, default 1.0), the per-image differences d_i = u(A, B)_i − (1 + T)·u(band)_i go to a
one-sided Wilcoxon signed-rank test (scipy, ``zero_method='wilcox'``, H1: the median of d is > 0, i.e. B
drifts further from A than the band's edge); the p-values of every band gate (all gated (metric, method)
pairs) are Holm-corrected together and a gate fails when its adjusted p < α. T = 0 is the plain test
"drift(A, B) worse than drift(A, A2)".

Why a tolerance: the test's units are images, but two seeds of one recipe differ at the checkpoint level —
some seed pairs sit twice as far apart as others, and with tens of images the Wilcoxon test sees that. In
the null-control simulation of ``tests/test_compare_band.py`` (tiny CNNs, one recipe, different seeds) the
gate with T = 0 passed only about half of the seed-only triples (A, A2, B); with T = 1 it passes ≥ 95%, while
a B whose last stage was re-initialized still fails with p ≈ 0. A single baseline cannot estimate the
seed-to-seed spread, so T is the stated allowance for it ("B may drift up to (1 + T) times as far as A2").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from evidrift import stats
from evidrift.metrics.drift import metric_direction, resolve_metric
from evidrift.studies.compare.study import CompareError

GateKind = Literal["fail-below", "fail-above", "fail-beyond-band"]
BandKind = Literal["baseline", "input-noise"]
DEFAULT_TOLERANCE = 1.0


@dataclass(frozen=True)
class BandGate:
    """One ``--fail-beyond-band`` request: a canonical metric, and a method (None = every method)."""

    spec: str
    metric: str
    method: str | None = None


@dataclass(frozen=True)
class GateSpec:
    """Every gate of one comparison: fixed thresholds {given name: value}, band gate specs (``METRIC`` or
    ``METRIC@METHOD``, as typed), the test level α and the band tolerance T."""

    fail_below: Mapping[str, float] = field(default_factory=dict)
    fail_above: Mapping[str, float] = field(default_factory=dict)
    band: Sequence[str] = ()
    alpha: float = 0.05
    tolerance: float = DEFAULT_TOLERANCE

    def check(self, methods: Sequence[str]) -> list[BandGate]:
        """Validate every gate before any work (metric names, methods, α, T); returns the parsed band gates.
        CompareError naming the option and value at fault."""
        from evidrift.studies.compare.study import resolve_gates

        resolve_gates([*self.fail_below, *self.fail_above])
        if not 0 < self.alpha < 1:
            raise CompareError(f"--alpha {self.alpha:g}: must be in (0, 1), e.g. 0.05")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise CompareError(f"--band-tolerance {self.tolerance:g}: must be ≥ 0 (0 = no allowance)")
        return [parse_band_gate(spec, methods) for spec in self.band]


@dataclass(frozen=True)
class Verdict:
    """One checked gate. ``value``/``ci_*``: mean of the metric A → B (``mean |v|`` for signed metrics under
    a band gate) and its CI over ``n`` images; ``threshold``: the fixed threshold, or the band's edge in
    metric units (band mean moved by the tolerance); ``band_*``: the band's mean and CI on the same images;
    ``p`` / ``p_holm``: one-sided Wilcoxon p, raw and Holm-adjusted (None for fixed gates)."""

    gate: GateKind
    metric: str
    method: str
    arch: str
    n: int
    value: float
    ci_low: float
    ci_high: float
    threshold: float
    passed: bool
    message: str
    statistic: str = "mean"
    band_kind: str | None = None
    band_mean: float | None = None
    band_ci_low: float | None = None
    band_ci_high: float | None = None
    tolerance: float | None = None
    p: float | None = None
    p_holm: float | None = None
    alpha: float | None = None

    @property
    def name(self) -> str:
        """``gate metric@method``, e.g. ``fail-beyond-band topk_iou@0.2@gradcam``."""
        return f"{self.gate} {self.metric}@{self.method}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, NaN as None, plus ``name``."""
        out = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }
        return {"name": self.name, **out}


# --- parsing ------------------------------------------------------------------------------------------------
def parse_band_gate(spec: str, methods: Sequence[str]) -> BandGate:
    """``METRIC`` or ``METRIC@METHOD`` → BandGate; ``methods``: the methods the comparison explains.

    Metric names have ``@k`` of their own (``topk_iou@0.2``), so a method is recognised as a known method
    name at the end (``topk_iou@0.2@gradcam``); CompareError naming the metric or method otherwise."""
    text = spec.strip()
    for method in sorted(methods, key=len, reverse=True):
        if text.endswith("@" + method):
            return BandGate(spec, _metric(text[: -len(method) - 1], spec), method)
    head, sep, tail = text.rpartition("@")
    if sep and not _is_number(tail) and _is_metric(head):
        raise CompareError(
            f"--fail-beyond-band {spec!r}: method {tail!r} is not explained in this comparison "
            f"(methods: {', '.join(methods)}); add --methods {tail} or name one of those"
        )
    return BandGate(spec, _metric(text, spec))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_metric(name: str) -> bool:
    try:
        resolve_metric(name)
    except ValueError:
        return False
    return True


def _metric(name: str, spec: str) -> str:
    try:
        return resolve_metric(name)[0]
    except ValueError as exc:
        raise CompareError(f"--fail-beyond-band {spec!r}: {exc}") from None


# --- fixed thresholds ---------------------------------------------------------------------------------------
def threshold_verdicts(
    summary: pd.DataFrame, fail_below: Mapping[str, float], fail_above: Mapping[str, float]
) -> list[Verdict]:
    """One verdict per fixed gate and (arch, method) row of ``summary.csv`` (module docstring)."""
    from evidrift.studies.compare.study import resolve_gates

    verdicts = []
    for gates, kind, worse, fine in (
        (fail_below, "fail-below", "<", "≥"),
        (fail_above, "fail-above", ">", "≤"),
    ):
        canonical = resolve_gates(gates)
        for name, threshold in gates.items():
            metric = canonical[name]
            rows = summary[summary["metric"] == metric]
            if rows.empty:
                raise CompareError(
                    f"--{kind} {name}: the metric {metric!r} was not computed (summary.csv has "
                    f"{sorted(summary['metric'].unique())})"
                )
            for _, row in rows.iterrows():
                value = float(row["mean"])
                failed = math.isnan(value) or (value < threshold if worse == "<" else value > threshold)
                head = f"{metric} under {row['method']} ({row['arch']}): mean {value:.4f}"
                tail = f"(--{kind} {name}={threshold:g}; n = {int(row['n'])} images)"
                message = f"{head} {worse if failed else fine} {threshold:g} {tail}"
                verdicts.append(
                    Verdict(
                        gate=kind,  # type: ignore[arg-type]
                        metric=metric,
                        method=str(row["method"]),
                        arch=str(row["arch"]),
                        n=int(row["n"]),
                        value=value,
                        ci_low=float(row.get("ci_low", np.nan)),
                        ci_high=float(row.get("ci_high", np.nan)),
                        threshold=float(threshold),
                        passed=not failed,
                        message=message,
                    )
                )
    return verdicts


# --- the noise band -----------------------------------------------------------------------------------------
def dissimilarity(values: np.ndarray, metric: str) -> np.ndarray:
    """Per-image values of a drift metric → u ≥ 0 with 0 = identical maps (module docstring), float64."""
    values = np.asarray(values, dtype=np.float64)
    direction = metric_direction(metric)
    if direction == "higher":
        return 1.0 - values
    return np.abs(values)


def from_dissimilarity(u: float, metric: str) -> float:
    """Inverse of ``dissimilarity`` for a mean (``higher``: 1 − u; else u)."""
    return 1.0 - u if metric_direction(metric) == "higher" else u


def one_sided_wilcoxon(d: np.ndarray) -> float:
    """p of the one-sided Wilcoxon signed-rank test of H1 "the median of ``d`` is > 0" (finite ``d`` [n]);
    1.0 when every difference is 0 or there is none."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="greater").pvalue)


def _paired(drift: pd.DataFrame, band: pd.DataFrame, arch: str, method: str, metric: str) -> pd.DataFrame:
    def part(frame: pd.DataFrame, name: str) -> pd.Series:
        rows = frame[(frame["arch"] == arch) & (frame["method"] == method)].drop_duplicates("id")
        return rows.set_index(rows["id"].astype(str))[metric].rename(name)

    joined = pd.concat([part(drift, "ab"), part(band, "band")], axis=1, join="inner")
    return joined[np.isfinite(joined["ab"]) & np.isfinite(joined["band"])]


def band_verdicts(
    drift: pd.DataFrame,
    band: pd.DataFrame,
    gates: Sequence[BandGate],
    band_kind: str,
    alpha: float = 0.05,
    tolerance: float = DEFAULT_TOLERANCE,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[Verdict]:
    """One verdict per band gate and (arch, method) of ``drift`` (the A → B table; ``band``: the band's table
    with the same columns), Holm over all of them (module docstring)."""
    pairs = sorted({(str(a), str(m)) for a, m in zip(drift["arch"], drift["method"], strict=True)})
    rows: list[dict[str, Any]] = []
    for gate in gates:
        if gate.metric not in drift.columns or gate.metric not in band.columns:
            raise CompareError(
                f"--fail-beyond-band {gate.spec}: the metric {gate.metric!r} was not computed "
                f"(drift.parquet has {stats.metric_columns(drift)})"
            )
        chosen = [(a, m) for a, m in pairs if gate.method is None or m == gate.method]
        if not chosen:
            raise CompareError(
                f"--fail-beyond-band {gate.spec}: no maps of method {gate.method!r} (drift.parquet has "
                f"{sorted({m for _, m in pairs})})"
            )
        for arch, method in chosen:
            joined = _paired(drift, band, arch, method, gate.metric)
            u_ab = dissimilarity(joined["ab"].to_numpy(), gate.metric)
            u_band = dissimilarity(joined["band"].to_numpy(), gate.metric)
            p = one_sided_wilcoxon(u_ab - (1.0 + tolerance) * u_band) if len(joined) else float("nan")
            rows.append(
                {"gate": gate, "arch": arch, "method": method, "u_ab": u_ab, "u_band": u_band, "p": p}
            )
    adjusted = stats.holm([r["p"] for r in rows])
    return [
        _band_verdict(r, float(p_holm), band_kind, alpha, tolerance, n_boot, ci, seed)
        for r, p_holm in zip(rows, adjusted, strict=True)
    ]


def _band_verdict(
    row: Mapping[str, Any],
    p_holm: float,
    band_kind: str,
    alpha: float,
    tolerance: float,
    n_boot: int,
    ci: float,
    seed: int,
) -> Verdict:
    gate: BandGate = row["gate"]
    metric, u_ab, u_band = gate.metric, row["u_ab"], row["u_band"]
    signed = metric_direction(metric) == "zero"
    n = int(u_ab.size)

    def mean_ci(u: np.ndarray) -> tuple[float, float, float]:
        """Mean and CI in metric units (similarity for ``higher`` metrics, |v| for signed ones)."""
        if n == 0:
            return (math.nan, math.nan, math.nan)
        shown = 1.0 - u if metric_direction(metric) == "higher" else u
        low, high = stats.bootstrap_ci(shown, n_boot, ci, seed)
        return float(np.mean(shown)), low, high

    value, low, high = mean_ci(u_ab)
    band_mean, band_low, band_high = mean_ci(u_band)
    edge = from_dissimilarity((1.0 + tolerance) * float(np.mean(u_band)), metric) if n else math.nan
    passed = bool(n > 0 and p_holm >= alpha)
    statistic = "mean |v|" if signed else "mean"
    label = f"|{metric}|" if signed else metric
    reference = "A → A2" if band_kind == "baseline" else "A(x) → A(x perturbed)"
    if n == 0:
        message = (
            f"{metric} under {row['method']} ({row['arch']}): no image with a finite value in both A → B and "
            f"the band; the gate cannot be checked (see the degenerate maps in the report)"
        )
    else:
        message = (
            f"{label} under {row['method']} ({row['arch']}): "
            f"A → B {statistic} {value:.4f} [{low:.4f}, {high:.4f}] vs band {reference} "
            f"{band_mean:.4f} [{band_low:.4f}, {band_high:.4f}], edge {edge:.4f} "
            f"(tolerance {tolerance:g}); one-sided Wilcoxon p = {row['p']:.3g}, Holm p = {p_holm:.3g} "
            f"{'<' if not passed else '≥'} α = {alpha:g} (n = {n} images)"
        )
    return Verdict(
        gate="fail-beyond-band",
        metric=metric,
        method=str(row["method"]),
        arch=str(row["arch"]),
        n=n,
        value=value,
        ci_low=low,
        ci_high=high,
        threshold=edge,
        passed=passed,
        message=message,
        statistic=statistic,
        band_kind=band_kind,
        band_mean=band_mean,
        band_ci_low=band_low,
        band_ci_high=band_high,
        tolerance=tolerance,
        p=float(row["p"]),
        p_holm=p_holm,
        alpha=alpha,
    )


def all_verdicts(
    summary: pd.DataFrame,
    drift: pd.DataFrame,
    band: pd.DataFrame | None,
    spec: GateSpec,
    band_kind: str | None,
    methods: Sequence[str],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> list[Verdict]:
    """Fixed-threshold verdicts, then band verdicts (CompareError when band gates have no band).
    ``methods``: the methods the comparison explained (to read ``METRIC@METHOD``)."""
    verdicts = threshold_verdicts(summary, spec.fail_below, spec.fail_above)
    band_gates = spec.check(methods)
    if band_gates:
        if band is None or band_kind is None:
            raise CompareError(
                "--fail-beyond-band needs a band: pass --baseline A2 (a second checkpoint of A's recipe) or "
                "--band input-noise"
            )
        verdicts += band_verdicts(
            drift, band, band_gates, band_kind, spec.alpha, spec.tolerance, n_boot, ci, seed
        )
    return verdicts
