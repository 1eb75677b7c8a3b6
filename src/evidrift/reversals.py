"""Rank reversals between CAM methods as a tested interaction, their count expected by chance, and the
equivalence classes of methods that coincide at a layer (ARCHITECTURE §5, § 7).

A *contrast* is (layer, metric, methods a, b, architectures x, y) on the images that have a finite value in
all four cells (x·a, y·a, x·b, y·b). Values are oriented as stability (``stability``: the metric for
``higher`` metrics, −metric for ``lower`` ones, −|metric| for signed ``zero`` ones), so for image i

    u_a,i = s_xa,i − s_ya,i   (positive: x more stable than y under method a)
    d_i   = u_a,i − u_b,i      (the per-image interaction).

A **reversal** is a contrast whose mean differences D_a = mean u_a and D_b = mean u_b have opposite signs
(both non-zero): the two methods order x and y differently on the same images. It is **significant** when

- the two-sided Wilcoxon signed-rank test of d_i survives Holm over every reversal test of the study, and
- each method's own paired test is significant in the direction of its difference: the one-sided Wilcoxon
  test of u_a (alternative: the sign of D_a), Holm over the u_a tests of every reversal of the study, and
  likewise u_b. (A reversal claims two directions at once, an intersection–union hypothesis: each of its
  two tests runs at level α, each over its own family of every reversal.)

**Expected by chance:** a permutation null that keeps every architecture's mean stability and removes the
interaction. Per image, the a and b values are swapped (for every architecture of that image at once) with
probability ½, which swaps u_a,i and u_b,i; the reversals of every contrast of the study are counted again,
``n_permutations`` times with one seeded generator. Reported: the mean count and its 5 % / 95 % quantiles,
beside the observed count, per layer and for the whole study.

**Equivalent methods:** at a layer that feeds global average pooling and a linear head the gradient is
constant over space per channel, so gradcam ≡ xgradcam ≡ hirescam and gradcam++ ≈ layercam. The drift step
measures the agreement of every two methods' maps per (arch, layer) (``agreement`` in
``studies.drift.analysis``); ``equivalence_classes`` joins the pairs that coincide for every architecture of a
layer into classes (union-find) and names one representative per class (the first in sorted order). Only
representatives enter contrasts, rankings and Kendall τ.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from evidrift.metrics.drift import metric_direction
from evidrift.stats import Representatives, holm, keep_representatives, metric_columns, with_layer

REVERSAL_COLUMNS = [
    "layer",
    "metric",
    "method_a",
    "method_b",
    "arch_x",
    "arch_y",
    "n",
    "diff_under_a",
    "diff_under_b",
    "interaction",
    "p_interaction",
    "p_interaction_holm",
    "p_a",
    "p_a_holm",
    "p_b",
    "p_b_holm",
    "significant_a",
    "significant_b",
    "significant",
]
SUMMARY_COLUMNS = [
    "layer",
    "contrasts",
    "observed",
    "significant",
    "expected_mean",
    "expected_p05",
    "expected_p95",
    "n_permutations",
]
#: The ``layer`` value of the whole-study row of the reversal summary.
ALL_LAYERS = "all"


def stability(values: np.ndarray, metric: str) -> np.ndarray:
    """Metric values [n] oriented so that higher = more stable (module doc), float64 [n]."""
    values = np.asarray(values, dtype=np.float64)
    direction = metric_direction(metric)
    if direction == "higher":
        return values
    if direction == "lower":
        return -values
    return -np.abs(values)


@dataclass(frozen=True)
class Contrast:
    """One (layer, metric, a, b, x, y) on its shared images: ``images`` int [n] (indices into the study's
    image list), ``ua``/``ub`` float64 [n] (stability of x minus y under a / b)."""

    layer: str
    metric: str
    method_a: str
    method_b: str
    arch_x: str
    arch_y: str
    images: np.ndarray
    ua: np.ndarray
    ub: np.ndarray

    @property
    def diff_a(self) -> float:
        return float(self.ua.mean()) if self.ua.size else float("nan")

    @property
    def diff_b(self) -> float:
        return float(self.ub.mean()) if self.ub.size else float("nan")

    @property
    def is_reversal(self) -> bool:
        da, db = self.diff_a, self.diff_b
        return bool(np.isfinite(da) and np.isfinite(db) and da * db < 0)


def contrasts(
    drift: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    representatives: Representatives | None = None,
) -> list[Contrast]:
    """Every contrast of a drift table (columns id, arch, method, [layer], metrics): per layer, every metric,
    every two representative methods and every two architectures, on the images finite in all four cells
    (contrasts with no shared image are left out)."""
    metrics = list(metrics) if metrics is not None else metric_columns(drift)
    drift = keep_representatives(with_layer(drift), representatives)
    image_ids = {image_id: i for i, image_id in enumerate(sorted(drift["id"].astype(str).unique()))}
    out: list[Contrast] = []
    for layer, part in drift.groupby("layer", sort=True):
        part = part.assign(id=part["id"].astype(str)).drop_duplicates(["id", "arch", "method"])
        methods = sorted(part["method"].unique())
        archs = sorted(part["arch"].unique())
        for metric in metrics:
            wide = part.pivot(index="id", columns=["arch", "method"], values=metric)
            for ma, mb in itertools.combinations(methods, 2):
                for x, y in itertools.combinations(archs, 2):
                    cells = [(x, ma), (y, ma), (x, mb), (y, mb)]
                    if any(cell not in wide.columns for cell in cells):
                        continue
                    block = wide[cells]
                    block = block[np.isfinite(block.to_numpy(dtype=np.float64)).all(axis=1)]
                    if block.empty:
                        continue
                    s = np.stack([stability(block[cell].to_numpy(), metric) for cell in cells])
                    out.append(
                        Contrast(
                            str(layer),
                            metric,
                            ma,
                            mb,
                            x,
                            y,
                            np.array([image_ids[i] for i in block.index], dtype=np.int64),
                            s[0] - s[1],
                            s[2] - s[3],
                        )
                    )
    return out


def _wilcoxon(d: np.ndarray, alternative: Literal["two-sided", "less", "greater"]) -> float:
    """Wilcoxon signed-rank p of ``d`` [n] (scipy, ``zero_method='wilcox'``); 1.0 when every d is 0."""
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative=alternative).pvalue)


def reversals(found: Sequence[Contrast], alpha: float = 0.05) -> pd.DataFrame:
    """The reversal rows of ``found`` with their tests (module doc). Columns ``REVERSAL_COLUMNS``:
    diff_under_a/b = D_a/D_b (stability of x minus y, metric units; positive = x more stable), interaction =
    mean d_i, p_interaction (two-sided), p_a/p_b (one-sided, in the direction of D_a/D_b), their Holm
    adjustments, significant_a/b and significant (all three)."""
    rows = []
    for c in found:
        if not c.is_reversal:
            continue
        da, db = c.diff_a, c.diff_b
        rows.append(
            {
                "layer": c.layer,
                "metric": c.metric,
                "method_a": c.method_a,
                "method_b": c.method_b,
                "arch_x": c.arch_x,
                "arch_y": c.arch_y,
                "n": int(c.ua.size),
                "diff_under_a": da,
                "diff_under_b": db,
                "interaction": da - db,
                "p_interaction": _wilcoxon(c.ua - c.ub, "two-sided"),
                "p_a": _wilcoxon(c.ua, "greater" if da > 0 else "less"),
                "p_b": _wilcoxon(c.ub, "greater" if db > 0 else "less"),
            }
        )
    if not rows:
        return pd.DataFrame(columns=REVERSAL_COLUMNS)
    table = pd.DataFrame(rows)
    table["p_interaction_holm"] = holm(table["p_interaction"].to_numpy())
    table["p_a_holm"] = holm(table["p_a"].to_numpy())
    table["p_b_holm"] = holm(table["p_b"].to_numpy())
    table["significant_a"] = table["p_a_holm"] < alpha
    table["significant_b"] = table["p_b_holm"] < alpha
    table["significant"] = (
        (table["p_interaction_holm"] < alpha) & table["significant_a"] & table["significant_b"]
    )
    return table[REVERSAL_COLUMNS]


def null_counts(found: Sequence[Contrast], n_permutations: int = 200, seed: int = 0) -> pd.DataFrame:
    """Reversal counts under the permutation null (module doc): int [n_permutations] per layer, as a frame
    with one column per layer (sorted) and one row per permutation. Each permutation draws one coin per
    image of the study, shared by every contrast of that image."""
    layers = sorted({c.layer for c in found})
    counts = np.zeros((n_permutations, len(layers)), dtype=np.int64)
    if not found or n_permutations <= 0:
        return pd.DataFrame(counts, columns=layers)
    n_images = int(max(int(c.images.max()) for c in found if c.images.size) + 1)
    coins = np.random.default_rng(seed).random((n_permutations, n_images)) < 0.5  # [P, images]
    column = {layer: j for j, layer in enumerate(layers)}
    for c in found:
        swap = coins[:, c.images].astype(np.float64)  # [P, n]
        delta = c.ub - c.ua
        moved = swap @ delta  # Σ_i s_i (u_b − u_a)
        da = (c.ua.sum() + moved) / c.ua.size
        db = (c.ub.sum() - moved) / c.ua.size
        counts[:, column[c.layer]] += (da * db < 0).astype(np.int64)
    return pd.DataFrame(counts, columns=layers)


def reversal_summary(found: Sequence[Contrast], table: pd.DataFrame, null: pd.DataFrame) -> pd.DataFrame:
    """Observed and expected reversal counts per layer and for the whole study (``ALL_LAYERS``): columns
    ``SUMMARY_COLUMNS``; expected_* are the permutation counts' mean and 5 % / 95 % quantiles (NaN with no
    permutation)."""
    layers = {c.layer for c in found}
    if len(table):
        layers |= set(table["layer"].astype(str))
    rows = []
    for layer in [*sorted(layers), ALL_LAYERS]:
        mine = table if layer == ALL_LAYERS else table[table["layer"] == layer]
        counts = (
            null.sum(axis=1).to_numpy() if layer == ALL_LAYERS else null.get(layer, pd.Series(dtype=float))
        )
        counts = np.asarray(counts, dtype=np.float64)
        has_null = counts.size > 0
        rows.append(
            {
                "layer": layer,
                "contrasts": sum(1 for c in found if layer in (ALL_LAYERS, c.layer)),
                "observed": len(mine),
                "significant": int(mine["significant"].astype(bool).sum()) if len(mine) else 0,
                "expected_mean": float(counts.mean()) if has_null else np.nan,
                "expected_p05": float(np.quantile(counts, 0.05)) if has_null else np.nan,
                "expected_p95": float(np.quantile(counts, 0.95)) if has_null else np.nan,
                "n_permutations": int(counts.size),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_line(summary: pd.DataFrame) -> str:
    """'N rank reversals (S significant); expected under no interaction: M [lo, hi]' for the whole study."""
    row = summary[summary["layer"] == ALL_LAYERS]
    if row.empty:
        return "no rank reversal computed"
    r = row.iloc[0]
    line = f"{int(r['observed'])} rank reversals ({int(r['significant'])} significant)"
    if int(r["n_permutations"]) > 0:
        line += (
            f"; expected under no interaction: {r['expected_mean']:.1f} "
            f"[{r['expected_p05']:.0f}, {r['expected_p95']:.0f}] ({int(r['n_permutations'])} permutations)"
        )
    return line


# --- equivalence classes ------------------------------------------------------------------------------------
def equivalence_classes(agreement: pd.DataFrame) -> Representatives:
    """``{layer: {method: representative}}`` from the per-(arch, layer) agreement table (columns arch, layer,
    method_a, method_b, equivalent): two methods share a class at a layer when they coincide for every
    architecture that has both there; classes are the connected components (union-find); the representative
    is the first member in sorted order. Methods with no partner map to themselves."""
    out: Representatives = {}
    if agreement is None or agreement.empty:
        return out
    table = with_layer(agreement)
    for layer, part in table.groupby("layer", sort=True):
        methods = sorted(set(part["method_a"]) | set(part["method_b"]))
        parent = {m: m for m in methods}
        first = np.minimum(part["method_a"].astype(str), part["method_b"].astype(str))
        second = np.maximum(part["method_a"].astype(str), part["method_b"].astype(str))
        flags = part["equivalent"].map(lambda v: v is True or v == 1 or str(v).strip().lower() == "true")
        for (ma, mb), pair in flags.groupby([first, second], sort=True):
            if bool(pair.all()):
                ra, rb = _root(parent, str(ma)), _root(parent, str(mb))
                parent[max(ra, rb)] = min(ra, rb)
        out[str(layer)] = {m: _root(parent, m) for m in methods}
    return out


def _root(parent: dict[str, str], m: str) -> str:
    """Union-find root of ``m`` in ``parent`` (with path halving)."""
    while parent[m] != m:
        parent[m] = parent[parent[m]]
        m = parent[m]
    return m


def class_members(representatives: Representatives, layer: str, method: str) -> list[str]:
    """The methods of ``method``'s class at ``layer``, sorted (just ``[method]`` when it has no class)."""
    mapping = representatives.get(layer, {})
    head = mapping.get(method, method)
    members = sorted(m for m, r in mapping.items() if r == head)
    return members or [method]


def representative_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of a summary table (columns method, equivalence_class) whose method represents its class:
    the first name of its ``class_label``; every row when there is no ``equivalence_class`` column."""
    if "equivalence_class" not in summary.columns:
        return summary
    first = summary["equivalence_class"].astype(str).str.split(" ≡ ").str[0]
    return summary[first == summary["method"].astype(str)]


def class_label(representatives: Representatives, layer: str, method: str) -> str:
    """'gradcam ≡ xgradcam' for a class of several methods, else the method's name."""
    return " ≡ ".join(class_members(representatives, layer, method))
