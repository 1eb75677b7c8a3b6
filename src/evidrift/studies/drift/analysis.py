"""The drift step (``evidrift drift RUN_DIR``): maps store → drift table → statistics (ARCHITECTURE §3, § 6,
§ 7).

For each architecture and each method stored at both stages, the stage-1 and stage-2 maps are paired by image
id (inner join, stage-1 order), compared with every requested drift metric at the analysis size, and written
as ``drift.parquet`` (one row per (id, arch, layer, method): id, arch, method, layer (as the study names it:
``default``, ``spatial`` or a dotted name), module (the dotted module), map_set (the maps-store name, e.g.
``gradcam@spatial``), every metric, degenerate, degenerate_reason, analysis_size). Then, per layer:

- ``equivalence.csv``: per (arch, layer) the agreement of every two methods' maps on the same images at both
  stages (median Spearman, max |difference| of min-max maps) and whether they coincide
  (``evidrift.reversals`` makes classes of the pairs that coincide for every architecture);
- ``summary.csv`` (``stats.summarize``, with each method's equivalence class and the analysis size),
  ``rankings.csv`` (one method per class), ``tests.csv`` (paired Wilcoxon tests with Holm),
  ``kendall.csv`` (Kendall τ between non-equivalent methods' rankings);
- ``reversals.csv`` (the tested rank reversals, ``evidrift.reversals``) and ``reversals_summary.csv``
  (observed and significant counts beside the permutation null's expected count, per layer and overall).

Analysis size: one for the whole study, so that architectures are compared on the same grid: the ``size``
argument, else ``drift.size`` of the run's ``config.yaml``, else the smallest input size of the study's
architectures (each from its maps' metadata ``input_size``/``image_size``, else the model's ``image_size``
in the config, else the architecture's default input size from timm).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from evidrift import reversals as rev
from evidrift import stats
from evidrift.core.errors import DataError, MissingInputError
from evidrift.core.io import write_csv_atomic, write_parquet_atomic
from evidrift.core.maps_store import maps_shards, read_maps, read_maps_shard, stored_methods
from evidrift.core.paths import RunPaths
from evidrift.metrics.common import AnalysisMaps
from evidrift.metrics.drift import (
    DEFAULT_TOPK,
    DEFAULT_ZONE_GRID,
    compare,
    default_metric_names,
    resolve_metric,
    spearman,
)

if TYPE_CHECKING:
    from evidrift.studies.config import StudyConfig

#: The headline drift metrics of the printed console table (the report shows more: REPORT_METRICS).
CONSOLE_METRICS = ("spearman", "ssim", "topk_iou@0.1", "centroid_shift", "js")


@dataclass(frozen=True)
class DriftSettings:
    """What the drift step computes: metric names (None = all), analysis size (None = resolve, see module
    doc), zone grid, bootstrap resamples, CI level, test level, seed, pairs per chunk, the median Spearman
    from which two methods count as one (``equivalence_spearman``; maps within ``equivalence_max_diff``
    after min-max always do), permutations of the reversal null."""

    metrics: Sequence[str] | None = None
    size: int | None = None
    zone_grid: tuple[int, int] = DEFAULT_ZONE_GRID
    topk: Sequence[float] = DEFAULT_TOPK
    n_boot: int = 2000
    ci: float = 0.95
    alpha: float = 0.05
    seed: int = 0
    chunk_size: int = 16
    equivalence_spearman: float = 0.99
    equivalence_max_diff: float = 1e-3
    permutations: int = 1000

    @classmethod
    def from_config(cls, config: StudyConfig) -> DriftSettings:
        """The settings a study's ``drift`` and ``stats`` sections ask for."""
        d, s = config.drift, config.stats
        return cls(
            metrics=None if d.metrics == "all" else list(d.metrics),
            size=d.size,
            zone_grid=d.zone_grid,
            topk=tuple(d.topk),
            n_boot=s.n_boot,
            ci=s.ci,
            alpha=s.alpha,
            seed=s.seed,
            equivalence_spearman=d.equivalence_spearman,
            permutations=s.permutations,
        )


@dataclass(frozen=True)
class DriftOutputs:
    drift: pd.DataFrame
    summary: pd.DataFrame
    rankings: pd.DataFrame
    reversals: pd.DataFrame
    tests: pd.DataFrame
    kendall: pd.DataFrame
    equivalence: pd.DataFrame
    reversal_summary: pd.DataFrame


def settings_from_config(run_dir: str | Path) -> DriftSettings:
    """Drift settings from ``RUN_DIR/config.yaml`` (sections drift, stats); defaults when there is none."""
    paths = RunPaths.at(run_dir)
    if not paths.config.exists():
        return DriftSettings()
    from evidrift.studies.config import load_config

    return DriftSettings.from_config(load_config(paths.config))


def stored_archs(paths: RunPaths) -> list[str]:
    """Architectures with a maps folder in the run."""
    root = paths.maps_root
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _size_from_meta(meta: dict[str, str]) -> int | None:
    for key in ("input_size", "image_size"):
        if key in meta:
            value = json.loads(meta[key]) if meta[key].strip().startswith("[") else meta[key]
            return int(value[-1]) if isinstance(value, list) else int(value)
    return None


def input_size(paths: RunPaths, arch: str, meta: dict[str, str]) -> int:
    """The input side of one architecture's maps: their metadata, else the config's ``image_size``, else
    timm's default for the architecture."""
    from_meta = _size_from_meta(meta)
    if from_meta is not None:
        return from_meta
    if paths.config.exists():
        from evidrift.studies.config import load_config

        models = load_config(paths.config).models
        for model in models:
            if model.key == arch and model.image_size is not None:
                return int(model.image_size)
        arch = next((m.arch for m in models if m.key == arch), arch)
    from evidrift.classifier.models import default_input_size

    try:
        return int(default_input_size(arch))
    except ValueError as exc:
        raise DataError(
            f"cannot tell the analysis size for arch {arch!r} (no input_size in its maps' metadata, "
            f"no image_size in the config, and: {exc}); set drift.size or pass --size"
        ) from exc


def study_analysis_size(paths: RunPaths, jobs: Sequence[tuple[str, str]], settings: DriftSettings) -> int:
    """The one analysis side of the study (module doc): ``settings.size``, else the smallest input side
    among the architectures of ``jobs`` ((arch, stored method) pairs)."""
    if settings.size is not None:
        return int(settings.size)
    sides = []
    for arch, name in jobs:
        _, _, meta = read_maps_shard(maps_shards(paths, arch, 1, name)[0])
        sides.append(input_size(paths, arch, meta))
    return min(sides)


def _method_and_layer(name: str, meta: dict[str, str]) -> tuple[str, str, str]:
    """(method, layer as the study names it, dotted module) of a stored map set; stores written before
    ``cam_method``/``layer_key`` existed fall back to the store name and the ``layer`` field."""
    module = meta.get("layer", "")
    method = meta.get("cam_method") or name.split("@", 1)[0]
    return method, meta.get("layer_key") or module, module


def drift_jobs(paths: RunPaths) -> list[tuple[str, str]]:
    """(arch, stored method name) of every map set stored at both stages. Raises FileNotFoundError naming
    the maps folder when there is none."""
    archs = stored_archs(paths)
    if not archs:
        raise MissingInputError(f"no maps in {paths.root / 'maps'}; run `evidrift explain study.yaml` first")
    jobs = [
        (arch, method)
        for arch in archs
        for method in sorted(set(stored_methods(paths, arch, 1)) & set(stored_methods(paths, arch, 2)))
    ]
    if not jobs:
        raise MissingInputError(f"no method has maps at both stage1 and stage2 under {paths.root / 'maps'}")
    return jobs


def drift_table(paths: RunPaths, settings: DriftSettings, progress: bool = True) -> pd.DataFrame:
    """Drift between stage 1 and stage 2 for every (arch, method) in the maps store (module docstring)."""
    names = list(settings.metrics) if settings.metrics is not None else default_metric_names(settings.topk)
    names = list(dict.fromkeys(resolve_metric(n)[0] for n in names))
    frames = []
    jobs = drift_jobs(paths)
    size = study_analysis_size(paths, jobs, settings)
    for arch, name in tqdm(jobs, desc="drift", unit="map set", disable=not progress):
        maps1, ids1, meta1 = read_maps(paths, arch, 1, name)
        maps2, ids2, _ = read_maps(paths, arch, 2, name)
        index2 = {image_id: i for i, image_id in enumerate(ids2)}
        keep1 = [i for i, image_id in enumerate(ids1) if image_id in index2]
        keep2 = [index2[ids1[i]] for i in keep1]
        if not keep1:
            continue
        table = compare(
            maps1[keep1],
            maps2[keep2],
            metrics=names,
            size=size,
            zone_grid=settings.zone_grid,
            chunk_size=settings.chunk_size,
        )
        method, layer, module = _method_and_layer(name, meta1)
        table.insert(0, "map_set", name)
        table.insert(0, "module", module)
        table.insert(0, "layer", layer)
        table.insert(0, "method", method)
        table.insert(0, "arch", arch)
        table.insert(0, "id", [ids1[i] for i in keep1])
        table["analysis_size"] = size
        frames.append(table)
    if not frames:
        raise FileNotFoundError(
            f"the stage-1 and stage-2 maps under {paths.root / 'maps'} share no image id; rerun "
            "`evidrift explain study.yaml` (or `evidrift run … --force explain`)"
        )
    return pd.concat(frames, ignore_index=True)


EQUIVALENCE_COLUMNS = [
    "arch",
    "layer",
    "method_a",
    "method_b",
    "n",
    "median_spearman",
    "max_abs_diff",
    "equivalent",
    "reason",
]


def map_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Agreement of two methods' maps of the same images, [N, h, w] each at their own resolution: (median
    Spearman over the images where it is defined (NaN if none), max |q_a − q_b| of the min-max maps)."""
    ma, mb = AnalysisMaps(a), AnalysisMaps(b)
    rho = spearman(ma, mb).numpy()
    rho = rho[np.isfinite(rho)]
    diff = float((ma.q - mb.q).abs().max()) if ma.n else float("nan")
    return (float(np.median(rho)) if rho.size else float("nan")), diff


def method_agreement(
    paths: RunPaths, jobs: Sequence[tuple[str, str]], settings: DriftSettings
) -> pd.DataFrame:
    """``EQUIVALENCE_COLUMNS`` per (arch, layer, two methods): maps of the images both methods explained,
    stage-1 and stage-2 maps pooled (the least agreeing stage decides); equivalent when max |Δ| ≤
    ``equivalence_max_diff`` (identical) or median Spearman ≥ ``equivalence_spearman``."""
    rows = []
    for arch in sorted({arch for arch, _ in jobs}):  # one architecture's maps in memory at a time
        groups: dict[str, dict[str, list[tuple[torch.Tensor, list[str]]]]] = {}
        for name in (n for a, n in jobs if a == arch):
            stage1, stage2 = read_maps(paths, arch, 1, name), read_maps(paths, arch, 2, name)
            method, layer, _ = _method_and_layer(name, stage1[2])
            groups.setdefault(layer, {})[method] = [stage1[:2], stage2[:2]]
        rows += _layer_agreement(arch, groups, settings)
    return pd.DataFrame(rows, columns=EQUIVALENCE_COLUMNS)


def _layer_agreement(
    arch: str, groups: dict[str, dict[str, list[tuple[torch.Tensor, list[str]]]]], settings: DriftSettings
) -> list[dict[str, object]]:
    """``method_agreement``'s rows of one architecture: ``groups`` = layer → method → [(maps, ids) of
    stage 1, of stage 2]."""
    rows: list[dict[str, object]] = []
    for layer, loaded in sorted(groups.items()):
        for ma, mb in itertools.combinations(sorted(loaded), 2):
            rhos, diffs, n = [], [], 0
            for (maps_a, ids_a), (maps_b, ids_b) in zip(loaded[ma], loaded[mb], strict=True):
                index_b = {image_id: i for i, image_id in enumerate(ids_b)}
                keep_a = [i for i, image_id in enumerate(ids_a) if image_id in index_b]
                if not keep_a:
                    continue
                keep_b = [index_b[ids_a[i]] for i in keep_a]
                rho, diff = map_agreement(maps_a[keep_a], maps_b[keep_b])
                rhos.append(rho)
                diffs.append(diff)
                n += len(keep_a)
            rho = float(np.nanmin(rhos)) if rhos and np.isfinite(rhos).any() else float("nan")
            diff = float(max(diffs)) if diffs else float("nan")
            identical = bool(np.isfinite(diff) and diff <= settings.equivalence_max_diff)
            agrees = bool(np.isfinite(rho) and rho >= settings.equivalence_spearman)
            if identical:
                reason = f"identical maps (max |Δ| of min-max maps {diff:.1e})"
            elif agrees:
                reason = f"median Spearman {rho:.4f} ≥ {settings.equivalence_spearman}"
            else:
                reason = ""
            rows.append(
                {
                    "arch": arch,
                    "layer": layer,
                    "method_a": ma,
                    "method_b": mb,
                    "n": n,
                    "median_spearman": rho,
                    "max_abs_diff": diff,
                    "equivalent": identical or agrees,
                    "reason": reason,
                }
            )
    return rows


def run_drift(
    run_dir: str | Path, settings: DriftSettings | None = None, progress: bool = True
) -> DriftOutputs:
    """The whole step (module doc): writes drift.parquet, equivalence.csv, summary.csv, rankings.csv,
    tests.csv, kendall.csv, reversals.csv and reversals_summary.csv into ``run_dir`` (atomically) and
    returns the tables."""
    paths = RunPaths.at(run_dir)
    settings = settings if settings is not None else settings_from_config(run_dir)
    drift = drift_table(paths, settings, progress=progress)
    write_parquet_atomic(paths.drift, drift)
    equivalence = method_agreement(paths, drift_jobs(paths), settings)
    classes = rev.equivalence_classes(equivalence)
    metrics = stats.metric_columns(drift)
    summary = stats.summarize(drift, metrics, n_boot=settings.n_boot, ci=settings.ci, seed=settings.seed)
    summary["equivalence_class"] = [
        rev.class_label(classes, layer, method)
        for layer, method in zip(summary["layer"], summary["method"], strict=True)
    ]
    summary["analysis_size"] = int(drift["analysis_size"].iloc[0]) if len(drift) else np.nan
    ranked = stats.rankings(drift, metrics, classes)
    tests = stats.paired_tests(drift, metrics, alpha=settings.alpha)
    found = rev.contrasts(drift, metrics, classes)
    reversals = rev.reversals(found, alpha=settings.alpha)
    null = rev.null_counts(found, settings.permutations, seed=settings.seed)
    reversal_summary = rev.reversal_summary(found, reversals, null)
    kendall = stats.kendall_between_methods(ranked, classes)
    write_csv_atomic(paths.equivalence, equivalence)
    write_csv_atomic(paths.summary, summary)
    write_csv_atomic(paths.rankings, ranked)
    write_csv_atomic(paths.reversals, reversals)
    write_csv_atomic(paths.reversals_summary, reversal_summary)
    write_csv_atomic(paths.tests, tests)
    write_csv_atomic(paths.kendall, kendall)
    return DriftOutputs(drift, summary, ranked, reversals, tests, kendall, equivalence, reversal_summary)


def summary_rows(
    summary: pd.DataFrame, metrics: Sequence[str] = CONSOLE_METRICS
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (arch, layer, method, 'mean [lo, hi]' per key metric present) for printing; one row per
    equivalence class (its label, e.g. 'gradcam ≡ xgradcam', shown with its representative's figures)."""
    present = [m for m in metrics if m in set(summary["metric"])]
    summary = stats.with_layer(summary)
    if "equivalence_class" not in summary.columns:
        summary = summary.assign(equivalence_class=summary["method"])
    summary = rev.representative_rows(summary)
    header = ["arch", "layer", "method", "n", *present]
    rows = []
    for (arch, layer, method), group in summary.groupby(["arch", "layer", "equivalence_class"], sort=True):
        by_metric = group.set_index("metric")
        cells = [str(arch), str(layer), str(method), str(int(by_metric["n"].max()))]
        for m in present:
            if m not in by_metric.index:
                cells.append("–")
                continue
            r = by_metric.loc[m]
            cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        rows.append(cells)
    return header, rows
