"""Statistics of the probing study: metric order, per-variant summaries, paired tests between head variants
and the best variant per localization metric (over ``probe.parquet``'s long table)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evidrift import stats
from evidrift.studies.config import StudyConfig

#: Metric families in report order (``gridpg`` comes as ``gridpg@n`` per grid size).
PROBE_METRICS: tuple[str, ...] = (
    "correct",
    "gridpg",
    "energy_pointing_game",
    "pointing_game",
    "entropy",
    "gini",
    "grid_entropy",
    "grid_gini",
)
#: Localization metrics (higher is better) used to name the best variant.
PROBE_LOCALIZATION_METRICS: tuple[str, ...] = ("gridpg", "energy_pointing_game", "pointing_game")


def metric_order(names: Sequence[str]) -> list[str]:
    """Distinct metric names sorted by family (``PROBE_METRICS``) then name (``gridpg@2`` before ``@3``)."""

    def key(name: str) -> tuple[int, str]:
        family = name.split("@")[0]
        return (PROBE_METRICS.index(family) if family in PROBE_METRICS else len(PROBE_METRICS), name)

    return sorted(dict.fromkeys(names), key=key)


def paired_variant_tests(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Wilcoxon signed-rank tests between every two variants on the units both scored (finite values), per
    (arch, method, metric); Holm-corrected within each (arch, method, metric) family (``stats.wilcoxon_p``,
    ``stats.holm``). Columns: arch, method, metric, variant_a, variant_b, n, mean_diff (a − b), p, p_holm,
    significant."""
    rows: list[dict[str, object]] = []
    for (arch, method, metric), part in table.groupby(["arch", "method", "metric"], sort=False):
        variants = list(dict.fromkeys(part["variant"]))
        # all-NaN variants (every map degenerate) are kept as columns: their tests have n = 0
        wide = part.pivot_table(
            index="unit_id", columns="variant", values="value", aggfunc="first", dropna=False
        )
        wide = wide.reindex(columns=variants)
        family = []
        for a, b in itertools.combinations(variants, 2):
            pair = wide[[a, b]].dropna()
            family.append(
                {
                    "arch": arch,
                    "method": method,
                    "metric": metric,
                    "variant_a": a,
                    "variant_b": b,
                    "n": len(pair),
                    "mean_diff": float((pair[a] - pair[b]).mean()) if len(pair) else np.nan,
                    "p": stats.wilcoxon_p(pair[a].to_numpy(), pair[b].to_numpy()),
                }
            )
        for row, p_holm in zip(family, stats.holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = float(p_holm)
            row["significant"] = bool(p_holm < alpha)
        rows += family
    columns = [
        "arch",
        "method",
        "metric",
        "variant_a",
        "variant_b",
        "n",
        "mean_diff",
        "p",
        "p_holm",
        "significant",
    ]
    return pd.DataFrame(rows, columns=columns)


def versus_baseline(
    table: pd.DataFrame,
    baseline: str,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Every variant against ``baseline`` (the paper's question: does a BCE / MLP / B-cos probe beat the
    CE-linear one?), per (arch, method, metric), on the units both scored: the mean paired difference
    (variant − baseline) with its seeded percentile-bootstrap CI, the Wilcoxon signed-rank p and its Holm
    correction over the variants compared within each (arch, method, metric). Columns: arch, method, metric,
    variant, baseline, n, mean_diff, ci_low, ci_high, p, p_holm, significant. Empty when ``baseline`` is not
    in the table."""
    columns = [
        "arch",
        "method",
        "metric",
        "variant",
        "baseline",
        "n",
        "mean_diff",
        "ci_low",
        "ci_high",
        "p",
        "p_holm",
        "significant",
    ]
    rows: list[dict[str, object]] = []
    for (arch, method, metric), part in table.groupby(["arch", "method", "metric"], sort=False):
        wide = part.pivot_table(
            index="unit_id", columns="variant", values="value", aggfunc="first", dropna=False
        )
        if baseline not in wide:
            continue
        family = []
        for variant in dict.fromkeys(part["variant"]):
            if variant == baseline:
                continue
            pair = wide[[variant, baseline]].dropna()
            diff = (pair[variant] - pair[baseline]).to_numpy(dtype=np.float64)
            low, high = stats.bootstrap_ci(diff, n_boot, ci, seed)
            family.append(
                {
                    "arch": arch,
                    "method": method,
                    "metric": metric,
                    "variant": variant,
                    "baseline": baseline,
                    "n": len(pair),
                    "mean_diff": float(diff.mean()) if len(diff) else np.nan,
                    "ci_low": low,
                    "ci_high": high,
                    "p": stats.wilcoxon_p(pair[variant].to_numpy(), pair[baseline].to_numpy()),
                }
            )
        for row, p_holm in zip(family, stats.holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = float(p_holm)
            row["significant"] = bool(p_holm < alpha)
        rows += family
    return pd.DataFrame(rows, columns=columns)


def summarize_probe(table: pd.DataFrame, config: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary per arch × variant × method × metric, paired tests between variants) of ``probe.parquet``."""
    summary = stats.summarize_values(
        table,
        ["arch", "variant", "loss", "head", "method", "metric"],
        config.stats.n_boot,
        config.stats.ci,
        config.stats.seed,
    )
    order = {
        "metric": {m: i for i, m in enumerate(metric_order(summary["metric"].tolist()))},
        "variant": {v: i for i, v in enumerate(dict.fromkeys(table["variant"]))},  # the config's order
    }
    summary = summary.sort_values(
        ["arch", "method", "metric", "variant"],
        key=lambda s: s.map(order[str(s.name)]) if s.name in order else s,
        kind="stable",
    ).reset_index(drop=True)
    return summary, paired_variant_tests(table, config.stats.alpha)


def best_variants(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, method, localization metric) the variant with the highest mean, with its CI and the
    runner-up's mean: arch, method, metric, variant, mean, ci_low, ci_high, runner_up, runner_up_mean."""
    rows = []
    local = summary[summary["metric"].str.split("@").str[0].isin(PROBE_LOCALIZATION_METRICS)]
    for (arch, method, metric), part in local.groupby(["arch", "method", "metric"], sort=False):
        ranked = part.dropna(subset=["mean"]).sort_values("mean", ascending=False)
        if ranked.empty:
            continue
        top = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        rows.append(
            {
                "arch": arch,
                "method": method,
                "metric": metric,
                "variant": top["variant"],
                "mean": top["mean"],
                "ci_low": top["ci_low"],
                "ci_high": top["ci_high"],
                "runner_up": None if second is None else second["variant"],
                "runner_up_mean": np.nan if second is None else second["mean"],
            }
        )
    return pd.DataFrame(rows)
