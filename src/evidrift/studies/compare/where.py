"""Where the evidence moved between A and B: drift per class, zone masses before/after, the most-drifted
images — the tables that tell a failed gate what to look at.

Written by ``evidrift compare`` into ``OUT/gate/`` (atomically) and read by the console and the report:
- ``by_class.csv``: per (arch, method, class, metric): n, mean A → B, mean of the band (NaN without one).
- ``by_zone.csv``: per (arch, method, zone): mean share of the map's mass in the zone under A and under B
  (p = m / Σm over a rows × cols grid over the whole image, the drift step's zone grid), their difference
  (B − A, so the column sums to 0 over the zones) and the mean absolute per-image change.
- ``most_drifted.csv``: per (arch, method), the ``k`` images with the largest dissimilarity A → B on the
  selection metric (u = 1 − v for ``higher`` metrics, |v| otherwise; see ``compare_gates.dissimilarity``):
  rank, id, label, path, value, band value, u.
The selection metric is the first gated metric (band gates first), else the first of
``SELECTION_METRICS`` that was computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from evidrift.core.io import write_csv_atomic
from evidrift.core.maps_store import read_maps
from evidrift.core.paths import RunPaths
from evidrift.metrics.common import AnalysisMaps

#: Fallback selection metrics, first one present.
SELECTION_METRICS = ("topk_iou@0.2", "topk_iou@0.1", "spearman", "centroid_shift", "js")
#: Metrics of the per-class table besides the gated ones, when computed.
CLASS_METRICS = ("topk_iou@0.2", "spearman", "centroid_shift", "js")


def selection_metric(drift: pd.DataFrame, gated: Sequence[str]) -> str | None:
    """The metric that ranks images as most drifted (module docstring); None when none is present."""
    for metric in [*gated, *SELECTION_METRICS]:
        if metric in drift.columns:
            return metric
    return None


def _labels(drift: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    info = manifest.assign(id=manifest["id"].astype(str)).drop_duplicates("id").set_index("id")
    return drift.assign(
        id=drift["id"].astype(str),
        label=drift["id"].astype(str).map(info["label"]).fillna("?").astype(str),
        path=drift["id"].astype(str).map(info["path"]).fillna("").astype(str),
    )


def _band_values(band: pd.DataFrame | None, metric: str) -> pd.Series | None:
    if band is None or metric not in band.columns:
        return None
    keyed = band.assign(id=band["id"].astype(str)).drop_duplicates(["arch", "method", "id"])
    return keyed.set_index(["arch", "method", "id"])[metric]


def drift_by_class(
    drift: pd.DataFrame, band: pd.DataFrame | None, manifest: pd.DataFrame, metrics: Sequence[str]
) -> pd.DataFrame:
    """Per (arch, method, label, metric): n (finite A → B values), mean, band_mean (NaN without a band)."""
    table = _labels(drift, manifest)
    rows = []
    for metric in [m for m in dict.fromkeys(metrics) if m in table.columns]:
        band_values = _band_values(band, metric)
        for (arch, method, label), group in table.groupby(["arch", "method", "label"], sort=True):
            values = group[metric].to_numpy(dtype=np.float64)
            finite = values[np.isfinite(values)]
            band_mean = np.nan
            if band_values is not None:
                keys = [(arch, method, i) for i in group["id"]]
                present = band_values.reindex(keys).to_numpy(dtype=np.float64)
                present = present[np.isfinite(present)]
                band_mean = float(present.mean()) if present.size else np.nan
            rows.append(
                {
                    "arch": arch,
                    "method": method,
                    "class": label,
                    "metric": metric,
                    "n": int(finite.size),
                    "mean": float(finite.mean()) if finite.size else np.nan,
                    "band_mean": band_mean,
                }
            )
    return pd.DataFrame(rows, columns=["arch", "method", "class", "metric", "n", "mean", "band_mean"])


def zone_labels(rows: int, cols: int) -> list[str]:
    """Cell names of a zone grid, row-major (as the report's zone figure names them)."""
    from evidrift.report.figures import zone_labels as names

    return names(rows, cols)


def drift_by_zone(
    paths: RunPaths, drift: pd.DataFrame, grid: tuple[int, int], size: int = 64
) -> pd.DataFrame:
    """Per (arch, method, zone): mass_a, mass_b (mean zone share), change (mass_b − mass_a) and
    mean_abs_change (mean over images of |z_b − z_a|), on the images of the drift table with two
    non-degenerate maps. Maps are read from the run's store (stage 1 = A, stage 2 = B) at ``size``."""
    labels = zone_labels(*grid)
    rows = []
    for (arch, method), group in drift.groupby(["arch", "method"], sort=True):
        ok = set(group.loc[~group["degenerate"].astype(bool), "id"].astype(str))
        maps_a, ids_a, _ = read_maps(paths, str(arch), 1, str(method))
        maps_b, ids_b, _ = read_maps(paths, str(arch), 2, str(method))
        pos_b = {i: n for n, i in enumerate(ids_b)}
        pairs = [(n, pos_b[i]) for n, i in enumerate(ids_a) if i in ok and i in pos_b]
        if not pairs:
            continue
        za = AnalysisMaps(maps_a[torch.tensor([p for p, _ in pairs])], size).zones(grid)
        zb = AnalysisMaps(maps_b[torch.tensor([q for _, q in pairs])], size).zones(grid)
        for zone, label in enumerate(labels):
            rows.append(
                {
                    "arch": arch,
                    "method": method,
                    "zone": label,
                    "n": len(pairs),
                    "mass_a": float(za[:, zone].mean()),
                    "mass_b": float(zb[:, zone].mean()),
                    "change": float((zb[:, zone] - za[:, zone]).mean()),
                    "mean_abs_change": float((zb[:, zone] - za[:, zone]).abs().mean()),
                }
            )
    columns = ["arch", "method", "zone", "n", "mass_a", "mass_b", "change", "mean_abs_change"]
    return pd.DataFrame(rows, columns=columns)


def most_drifted(
    drift: pd.DataFrame, band: pd.DataFrame | None, manifest: pd.DataFrame, metric: str, k: int
) -> pd.DataFrame:
    """Per (arch, method): the ``k`` images with the largest dissimilarity on ``metric`` (NaN skipped; ties
    by id order): rank (1 = most drifted), id, label, path, value, band_value, u."""
    from evidrift.studies.compare.gates import dissimilarity

    table = _labels(drift, manifest)
    band_values = _band_values(band, metric)
    rows = []
    for (arch, method), group in table.groupby(["arch", "method"], sort=True):
        values = group[metric].to_numpy(dtype=np.float64)
        keep = np.isfinite(values)
        part = (
            group[keep]
            .assign(u=dissimilarity(values[keep], metric))
            .sort_values(["u", "id"], ascending=[False, True], kind="stable")
        )
        for rank, (_, row) in enumerate(part.head(k).iterrows(), start=1):
            band_value = (
                float(band_values.get((arch, method, row["id"]), np.nan))
                if band_values is not None
                else np.nan
            )
            rows.append(
                {
                    "arch": arch,
                    "method": method,
                    "metric": metric,
                    "rank": rank,
                    "id": row["id"],
                    "label": row["label"],
                    "path": row["path"],
                    "value": float(row[metric]),
                    "band_value": band_value,
                    "u": float(row["u"]),
                }
            )
    columns = ["arch", "method", "metric", "rank", "id", "label", "path", "value", "band_value", "u"]
    return pd.DataFrame(rows, columns=columns)


def write_where(
    paths: RunPaths,
    drift: pd.DataFrame,
    band: pd.DataFrame | None,
    gated: Sequence[str],
    grid: tuple[int, int],
    k: int,
) -> dict[str, pd.DataFrame]:
    """Compute the three tables (module docstring), write them to ``OUT/gate/`` and return them by name."""
    manifest = pd.read_parquet(paths.manifest)
    metric = selection_metric(drift, gated)
    tables = {
        "by_class": drift_by_class(drift, band, manifest, [*gated, *CLASS_METRICS]),
        "by_zone": drift_by_zone(paths, drift, grid),
        "most_drifted": most_drifted(drift, band, manifest, metric, k) if metric else pd.DataFrame(),
    }
    for name, table in tables.items():
        write_csv_atomic(paths.gate_dir / f"{name}.csv", table)
    return tables


# --- console rows -------------------------------------------------------------------------------------------
def class_rows(by_class: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method, class, n, mean A → B, band mean) of ``metric`` in the per-class table."""
    part = by_class[by_class["metric"] == metric]
    header = ["method", "class", "n", f"{metric} A → B", "band"]
    rows = [
        [str(r["method"]), str(r["class"]), str(int(r["n"])), f"{r['mean']:.3f}", _number(r["band_mean"])]
        for _, r in part.iterrows()
    ]
    return header, rows


def zone_rows(by_zone: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per zone, one column per method with "mass A → mass B (change)"."""
    methods = list(dict.fromkeys(by_zone["method"].astype(str)))
    header = ["zone", *methods]
    rows = []
    for zone in dict.fromkeys(by_zone["zone"].astype(str)):
        cells = [zone]
        for method in methods:
            r = by_zone[(by_zone["zone"] == zone) & (by_zone["method"] == method)]
            cells.append(
                f"{r['mass_a'].item():.2f} → {r['mass_b'].item():.2f} ({r['change'].item():+.2f})"
                if len(r)
                else "n/a"
            )
        rows.append(cells)
    return header, rows


def drifted_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method, rank, id, class, value, band) of the most-drifted table."""
    metric = str(table["metric"].iloc[0]) if len(table) else "value"
    header = ["method", "rank", "id", "class", f"{metric} A → B", "band"]
    rows = [
        [
            str(r["method"]),
            str(int(r["rank"])),
            str(r["id"]),
            str(r["label"]),
            f"{r['value']:.3f}",
            _number(r["band_value"]),
        ]
        for _, r in table.iterrows()
    ]
    return header, rows


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "—"
