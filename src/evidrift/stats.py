"""Statistics of a drift table (ARCHITECTURE §7): summaries with bootstrap CIs, paired tests, rankings.

Input: the drift table (one row per (id, arch, layer, method), one column per metric; see
``evidrift.metrics.drift.compare``). ``layer`` is the CAM layer as the study names it (``default``,
``spatial`` or a dotted module name); a table without the column counts as one layer ``""``. Every
statistic is per layer: architectures are compared with each other at the same layer. NaN values (degenerate
maps) are left out of every statistic; ``n`` counts the finite values used.

Choices:
- Bootstrap: percentile intervals of the mean from ``n_boot`` resamples with replacement, seeded
  (``numpy.random.default_rng(seed)``), all resamples of one group drawn as one index matrix.
- Direction-aware stability score per (arch, layer, method, metric): the mean for ``higher``/``lower``
  metrics, the mean absolute value for signed ``zero`` metrics (entropy/gini/top-k mass changes). Rank 1 =
  most stable.
- Paired tests: for each (layer, method, metric) and each pair of architectures, the images both explained
  with a finite value (inner join on ``id``), two-sided Wilcoxon signed-rank test (scipy,
  ``zero_method='wilcox'``) on the values (absolute values for ``zero`` metrics); p = 1 when every
  difference is 0 or fewer than 1 pair. Holm correction within each (layer, method, metric) family.
- Equivalent methods (``evidrift.reversals.equivalence_classes``): ``rankings`` and
  ``kendall_between_methods`` take an optional ``{layer: {method: representative}}`` mapping and keep one
  method per class, so coinciding methods never count twice.
- Kendall τ-b between two methods' architecture scores for a (layer, metric) (NaN with < 2 architectures).
- Rank reversals and their tests live in ``evidrift.reversals``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import f1_score, roc_auc_score

from evidrift.metrics.drift import metric_direction

KEYS = ("id", "arch", "layer", "method")
NON_METRIC_COLUMNS = {
    "id",
    "arch",
    "method",
    "layer",
    "module",
    "map_set",
    "analysis_size",
    "degenerate",
    "degenerate_reason",
    "stage_a",
    "stage_b",
}


#: ``{layer: {method: representative method}}``: which method stands for each equivalence class.
Representatives = dict[str, dict[str, str]]


def with_layer(drift: pd.DataFrame) -> pd.DataFrame:
    """``drift`` with a ``layer`` column (``""`` when it has none), as strings."""
    if "layer" in drift.columns:
        return drift.assign(layer=drift["layer"].fillna("").astype(str))
    return drift.assign(layer="")


def keyed_by_map_set(drift: pd.DataFrame) -> pd.DataFrame:
    """The drift table with ``method`` = its map set's name (``gradcam`` or, with several layers,
    ``gradcam@spatial``): one key per (method, layer), for code keyed by (arch, method). Unchanged when
    the table has no ``map_set`` column."""
    if "map_set" not in drift.columns:
        return drift
    return drift.assign(method=drift["map_set"].astype(str))


def metric_columns(drift: pd.DataFrame) -> list[str]:
    """The metric columns of a drift table (every numeric column that is not a key or flag)."""
    return [
        c for c in drift.columns if c not in NON_METRIC_COLUMNS and pd.api.types.is_numeric_dtype(drift[c])
    ]


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples with replacement of finite ``values`` [n] → [n_boot] (empty → NaN)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return np.full(n_boot, np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    step = max(1, 4_000_000 // n)  # bound the index matrix to ~32 MB
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite ``values``: (low, high); NaN when empty."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    means = bootstrap_means(finite, n_boot, seed)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(
    drift: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (arch, layer, method, metric): n (finite values), n_nan, mean, median, std (ddof 1), ci_low,
    ci_high.

    Each group's bootstrap uses the seed ``seed`` (reproducible and independent of group order)."""
    metrics = list(metrics) if metrics is not None else metric_columns(drift)
    rows = []
    for (arch, layer, method), group in with_layer(drift).groupby(["arch", "layer", "method"], sort=True):
        for metric in metrics:
            values = group[metric].to_numpy(dtype=np.float64)
            summary = describe(values, n_boot, ci, seed)
            rows.append({"arch": arch, "layer": layer, "method": method, "metric": metric, **summary})
    return pd.DataFrame(rows)


def describe(
    values: np.ndarray, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """Of the finite entries of ``values`` [N]: n, n_nan (non-finite count), mean, median, std (ddof 1),
    and the seeded percentile-bootstrap CI of the mean (ci_low, ci_high); NaN where undefined."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = bootstrap_ci(finite, n_boot, ci, seed)
    return {
        "n": int(finite.size),
        "n_nan": int(values.size - finite.size),
        "mean": float(finite.mean()) if finite.size else np.nan,
        "median": float(np.median(finite)) if finite.size else np.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else np.nan,
        "ci_low": low,
        "ci_high": high,
    }


def oriented(values: pd.Series | np.ndarray, metric: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.abs(values) if metric_direction(metric) == "zero" else values


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (monotone, capped at 1); NaN inputs stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test of a paired accuracy change: did classifier B get right a different share of the
    same images than classifier A? ``correct_a``, ``correct_b``: bool [N] per image. Only the discordant
    images count: ``only_a`` (right under A only) and ``only_b``; under the null each is Binomial(d, 1/2)
    with d = only_a + only_b, and p is the two-sided exact binomial p (1.0 when d = 0). Returns n,
    accuracy_a, accuracy_b, change (accuracy_b − accuracy_a), only_a, only_b, p."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a {a.shape} and correct_b {b.shape} must both be [N]")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(sps.binomtest(only_b, discordant, 0.5).pvalue)
    n = int(a.size)
    accuracy_a = float(a.mean()) if n else float("nan")
    accuracy_b = float(b.mean()) if n else float("nan")
    return {
        "n": n,
        "accuracy_a": accuracy_a,
        "accuracy_b": accuracy_b,
        "change": accuracy_b - accuracy_a,
        "only_a": only_a,
        "only_b": only_b,
        "p": min(p, 1.0),
    }


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired samples; 1.0 when every difference is 0 (or no pair)."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if d.size == 0 or not np.any(d != 0):
        return 1.0
    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


PAIRED_TEST_COLUMNS = [
    "layer",
    "method",
    "metric",
    "arch_x",
    "arch_y",
    "n",
    "mean_diff",
    "p",
    "p_holm",
    "significant",
]


def paired_tests(
    drift: pd.DataFrame, metrics: Sequence[str] | None = None, alpha: float = 0.05
) -> pd.DataFrame:
    """Wilcoxon signed-rank tests between architectures on shared images, per (layer, method, metric).

    Columns: layer, method, metric, arch_x, arch_y, n (shared images with finite values), mean_diff (mean of
    x − y over them, absolute values for ``zero`` metrics), p, p_holm, significant (p_holm < alpha)."""
    metrics = list(metrics) if metrics is not None else metric_columns(drift)
    rows: list[dict[str, Any]] = []
    for (layer, method), by_method in with_layer(drift).groupby(["layer", "method"], sort=True):
        archs = sorted(by_method["arch"].unique())
        per_arch = {a: by_method[by_method["arch"] == a].drop_duplicates("id").set_index("id") for a in archs}
        for metric in metrics:
            family = []
            for x, y in itertools.combinations(archs, 2):
                joined = pd.concat(
                    [per_arch[x][metric].rename("x"), per_arch[y][metric].rename("y")], axis=1, join="inner"
                ).dropna()
                vx, vy = oriented(joined["x"], metric), oriented(joined["y"], metric)
                family.append(
                    {
                        "layer": layer,
                        "method": method,
                        "metric": metric,
                        "arch_x": x,
                        "arch_y": y,
                        "n": len(joined),
                        "mean_diff": float(np.mean(vx - vy)) if len(joined) else np.nan,
                        "p": wilcoxon_p(vx, vy),
                    }
                )
            adjusted = holm([r["p"] for r in family])
            for row, p_adj in zip(family, adjusted, strict=True):
                row["p_holm"] = float(p_adj)
                row["significant"] = bool(p_adj < alpha)
            rows.extend(family)
    return pd.DataFrame(rows, columns=PAIRED_TEST_COLUMNS)


def keep_representatives(drift: pd.DataFrame, representatives: Representatives | None) -> pd.DataFrame:
    """One method per equivalence class in ``drift`` (any table with layer and method columns, optionally
    arch): per (layer, arch) the class's representative when that architecture has it, else its first
    present member in sorted order, renamed to the representative so that the architectures line up. Every
    row is kept when ``representatives`` is None or names neither the layer nor the method."""
    drift = with_layer(drift)
    if not representatives:
        return drift
    layers = drift["layer"].astype(str)
    methods = drift["method"].astype(str)
    heads = [representatives.get(la, {}).get(m, m) for la, m in zip(layers, methods, strict=True)]
    archs = drift["arch"].astype(str) if "arch" in drift.columns else pd.Series("", index=drift.index)
    present: dict[tuple[str, str, str], set[str]] = {}
    for la, arch, m, head in zip(layers, archs, methods, heads, strict=True):
        present.setdefault((la, arch, head), set()).add(m)
    chosen = {key: key[2] if key[2] in members else min(members) for key, members in present.items()}
    keep = [
        chosen[(la, arch, head)] == m for la, arch, m, head in zip(layers, archs, methods, heads, strict=True)
    ]
    out = drift.assign(method=heads)
    return out[np.asarray(keep, dtype=bool)]


def stability_scores(drift: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Per (layer, method, metric, arch): score = mean (``higher``/``lower``) or mean |value| (``zero``)."""
    metrics = list(metrics) if metrics is not None else metric_columns(drift)
    rows = []
    for (layer, method, arch), group in with_layer(drift).groupby(["layer", "method", "arch"], sort=True):
        for metric in metrics:
            values = oriented(group[metric], metric)
            values = values[np.isfinite(values)]
            rows.append(
                {
                    "layer": layer,
                    "method": method,
                    "metric": metric,
                    "arch": arch,
                    "direction": metric_direction(metric),
                    "score": float(values.mean()) if values.size else np.nan,
                    "n": int(values.size),
                }
            )
    return pd.DataFrame(rows, columns=["layer", "method", "metric", "arch", "direction", "score", "n"])


RANKING_COLUMNS = ["layer", "method", "metric", "direction", "rank", "arch", "score", "n"]


def rankings(
    drift: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    representatives: Representatives | None = None,
) -> pd.DataFrame:
    """Architectures ranked by stability per (layer, method, metric); rank 1 = most stable (ties: ``min``
    rank). With ``representatives``, one method per equivalence class.

    Columns: layer, method, metric, direction, rank, arch, score, n."""
    scores = stability_scores(keep_representatives(drift, representatives), metrics)
    out = []
    for _, group in scores.groupby(["layer", "method", "metric"], sort=False):
        higher = group["direction"].iloc[0] == "higher"
        key = -group["score"] if higher else group["score"]
        group = group.assign(rank=key.rank(method="min", na_option="bottom").astype(int))
        out.append(group.sort_values(["rank", "arch"]))
    if not out:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    return pd.concat(out, ignore_index=True)[RANKING_COLUMNS]


def kendall_between_methods(
    ranked: pd.DataFrame, representatives: Representatives | None = None
) -> pd.DataFrame:
    """Kendall τ-b between every pair of (non-equivalent) methods' architecture scores, per (layer, metric).

    ``ranked``: the output of ``rankings``. Columns: layer, metric, method_a, method_b, n_archs, tau."""
    rows = []
    ranked = keep_representatives(ranked, representatives)
    for (layer, metric), group in ranked.groupby(["layer", "metric"], sort=False):
        pivot = group.pivot_table(index="arch", columns="method", values="score")
        for ma, mb in itertools.combinations(sorted(pivot.columns), 2):
            pair = pivot[[ma, mb]].dropna()
            tau = sps.kendalltau(pair[ma], pair[mb]).statistic if len(pair) >= 2 else np.nan
            rows.append(
                {
                    "layer": layer,
                    "metric": metric,
                    "method_a": ma,
                    "method_b": mb,
                    "n_archs": len(pair),
                    "tau": float(tau),
                }
            )
    return pd.DataFrame(rows, columns=["layer", "metric", "method_a", "method_b", "n_archs", "tau"])


# --- classification figures ---------------------------------------------------------------------------------
def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of ``scores`` [N] for boolean ``positive`` [N] under sample weights [B, N] → [B]
    (ties count ½; NaN when a resample has no positive or no negative)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = positive[order]
    w = weights[:, order]
    wpos = np.where(pos, w, 0.0)
    wneg = np.where(pos, 0.0, w)
    # tie groups of the sorted scores
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    group = np.cumsum(new) - 1
    n_groups = group[-1] + 1
    neg_per_group = np.zeros((w.shape[0], n_groups))
    np.add.at(neg_per_group.T, group, wneg.T)
    neg_below = np.cumsum(neg_per_group, axis=1) - neg_per_group  # strictly smaller scores
    credit = neg_below[:, group] + 0.5 * neg_per_group[:, group]
    num = (wpos * credit).sum(axis=1)
    den = wpos.sum(axis=1) * wneg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def classification_summary(
    y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Accuracy, macro-F1 and macro one-vs-rest AUROC with percentile-bootstrap CIs.

    ``y_true``: int [N] in 0..C−1; ``probs``: float [N, C] (scores per class; argmax = prediction).
    Returns {n, accuracy, accuracy_ci_low, accuracy_ci_high, macro_f1, ..., macro_auroc, ...}. Macro AUROC
    averages the classes present in ``y_true`` (NaN when fewer than 2 are); resamples that lose a class are
    left out of its CI. Point values equal scikit-learn's ``accuracy_score``, ``f1_score(average='macro')``
    (over the classes 0..C−1) and ``roc_auc_score(multi_class='ovr', average='macro')``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [N, C] with N = len(y_true) = {y.shape[0]}, got shape {p.shape}")
    n, c = p.shape
    if n == 0:
        raise ValueError("classification_summary needs at least one sample")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(
            f"y_true values must be in 0..{c - 1} (probs has {c} columns), got {y.min()}..{y.max()}"
        )
    pred = p.argmax(axis=1)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(
        np.float64
    )
    alpha = (1.0 - ci) / 2.0

    def interval(samples: np.ndarray) -> tuple[float, float]:
        samples = samples[np.isfinite(samples)]
        if samples.size == 0:
            return float("nan"), float("nan")
        low, high = np.quantile(samples, [alpha, 1.0 - alpha])
        return float(low), float(high)

    correct = (pred == y).astype(np.float64)
    acc_boot = counts @ correct / n
    # macro-F1 from weighted confusion counts: F1_c = 2 TP / (2 TP + FP + FN), 0 when the class is absent
    f1_boot = np.zeros((n_boot, c))
    for k in range(c):
        tp = counts @ ((pred == k) & (y == k))
        fp = counts @ ((pred == k) & (y != k))
        fn = counts @ ((pred != k) & (y == k))
        den = 2 * tp + fp + fn
        f1_boot[:, k] = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    present = [k for k in range(c) if np.any(y == k)]
    if len(present) >= 2:
        if c == 2:
            auc_point = float(roc_auc_score(y, p[:, 1]))
            auc_boot = _weighted_auc(p[:, 1], y == 1, counts)
        else:
            per_class = [_weighted_auc(p[:, k], y == k, np.ones((1, n)))[0] for k in present]
            auc_point = float(np.mean(per_class))
            auc_boot = np.mean(np.stack([_weighted_auc(p[:, k], y == k, counts) for k in present]), axis=0)
    else:
        auc_point, auc_boot = float("nan"), np.full(n_boot, np.nan)
    result: dict[str, float] = {"n": float(n)}
    for name, point, boot in (
        ("accuracy", float(correct.mean()), acc_boot),
        (
            "macro_f1",
            float(f1_score(y, pred, labels=list(range(c)), average="macro", zero_division=0)),
            f1_boot.mean(axis=1),
        ),
        ("macro_auroc", auc_point, auc_boot),
    ):
        low, high = interval(boot)
        result[name] = point
        result[f"{name}_ci_low"] = low
        result[f"{name}_ci_high"] = high
    return result


def summarize_values(
    table: pd.DataFrame, keys: Sequence[str], n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Per group of ``keys`` over a long table with a ``value`` column: n (finite values), n_nan, mean,
    median, std (ddof 1) and the seeded percentile-bootstrap CI of the mean (``bootstrap_ci``)."""
    rows = []
    for group, part in table.groupby(list(keys), sort=False):
        values = part["value"].to_numpy(dtype=np.float64)
        rows.append(
            {
                **dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True)),
                **describe(values, n_boot, ci, seed),
            }
        )
    return pd.DataFrame(rows)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """labels [N] int in [0, C), probs [N, C] → accuracy, macro_f1, auroc (list of C one-vs-rest AUROCs, NaN
    for a class without positives or negatives) and macro_auroc (mean of the defined ones; NaN if none)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    aurocs = []
    for c in range(n_classes):
        positives = labels == c
        if positives.all() or not positives.any():
            aurocs.append(float("nan"))
        else:
            aurocs.append(float(roc_auc_score(positives, probs[:, c])))
    defined = [a for a in aurocs if not np.isnan(a)]
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "macro_f1": float(
            f1_score(labels, preds, average="macro", labels=list(range(n_classes)), zero_division=0)
        ),
        "auroc": aurocs,
        "macro_auroc": float(np.mean(defined)) if defined else float("nan"),
    }
