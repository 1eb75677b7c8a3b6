"""The drift step (``evidrift drift RUN_DIR``): maps store → drift table → statistics (DESIGN § 3, § 6, § 7).

For each architecture and each method stored at both stages, the stage-1 and stage-2 maps are paired by image
id (inner join, stage-1 order), compared with every requested drift metric at the analysis size, and written
as ``drift.parquet`` (one row per (id, arch, method): id, arch, method, layer, every metric, degenerate,
degenerate_reason). Then ``summary.csv`` (``stats.summarize``), ``rankings.csv`` (``stats.rankings``),
``reversals.csv`` (``stats.reversals``) and, beside them, ``tests.csv`` (the paired Wilcoxon tests with Holm)
and ``kendall.csv`` (Kendall τ between the methods' rankings).

Analysis size: the ``size`` argument, else ``drift.size`` of the run's ``config.yaml``, else the input size
stored in the maps' metadata (``input_size``/``image_size``), else the model's ``image_size`` in the config,
else the architecture's default input size (timm).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from evidrift import stats
from evidrift.artifacts import RunPaths, read_maps, stored_methods, write_csv_atomic, write_parquet_atomic
from evidrift.metrics.drift import (
    DEFAULT_TOPK,
    DEFAULT_ZONE_GRID,
    compare,
    default_metric_names,
    resolve_metric,
)

if TYPE_CHECKING:
    from evidrift.config import StudyConfig

KEY_METRICS = ("spearman", "ssim", "topk_iou@0.1", "centroid_shift", "js")


@dataclass(frozen=True)
class DriftSettings:
    """What the drift step computes: metric names (None = all), analysis size (None = resolve, see module
    doc), zone grid, bootstrap resamples, CI level, test level, seed, pairs per chunk."""

    metrics: Sequence[str] | None = None
    size: int | None = None
    zone_grid: tuple[int, int] = DEFAULT_ZONE_GRID
    topk: Sequence[float] = DEFAULT_TOPK
    n_boot: int = 2000
    ci: float = 0.95
    alpha: float = 0.05
    seed: int = 0
    chunk_size: int = 16

    @classmethod
    def from_config(cls, config: StudyConfig) -> DriftSettings:
        """The settings a study's ``drift`` and ``stats`` sections ask for."""
        d, s = config.drift, config.stats
        return cls(
            metrics=None if d.metrics == "all" else list(d.metrics),
            size=d.size,
            zone_grid=tuple(d.zone_grid),
            topk=tuple(d.topk),
            n_boot=s.n_boot,
            ci=s.ci,
            alpha=s.alpha,
            seed=s.seed,
        )


@dataclass(frozen=True)
class DriftOutputs:
    drift: pd.DataFrame
    summary: pd.DataFrame
    rankings: pd.DataFrame
    reversals: pd.DataFrame
    tests: pd.DataFrame
    kendall: pd.DataFrame


def settings_from_config(run_dir: str | Path) -> DriftSettings:
    """Drift settings from ``RUN_DIR/config.yaml`` (sections drift, stats); defaults when there is none."""
    paths = RunPaths.at(run_dir)
    if not paths.config.exists():
        return DriftSettings()
    from evidrift.config import load_config

    return DriftSettings.from_config(load_config(paths.config))


def stored_archs(paths: RunPaths) -> list[str]:
    """Architectures with a maps folder in the run."""
    root = paths.root / "maps"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _size_from_meta(meta: dict[str, str]) -> int | None:
    for key in ("input_size", "image_size"):
        if key in meta:
            value = json.loads(meta[key]) if meta[key].strip().startswith("[") else meta[key]
            return int(value[-1]) if isinstance(value, list) else int(value)
    return None


def analysis_size(paths: RunPaths, arch: str, meta: dict[str, str], settings: DriftSettings) -> int:
    """The analysis side for one architecture (module docstring)."""
    if settings.size is not None:
        return int(settings.size)
    from_meta = _size_from_meta(meta)
    if from_meta is not None:
        return from_meta
    if paths.config.exists():
        from evidrift.config import load_config

        for model in load_config(paths.config).models:
            if model.key == arch and model.image_size is not None:
                return int(model.image_size)
        arch = next((m.arch for m in load_config(paths.config).models if m.key == arch), arch)
    from evidrift.models import default_input_size

    try:
        return int(default_input_size(arch))
    except ValueError as exc:
        raise ValueError(
            f"cannot tell the analysis size for arch {arch!r} (no input_size in its maps' metadata, "
            f"no image_size in the config, and: {exc}); set drift.size or pass --size"
        ) from exc


def drift_table(paths: RunPaths, settings: DriftSettings, progress: bool = True) -> pd.DataFrame:
    """Drift between stage 1 and stage 2 for every (arch, method) in the maps store (module docstring)."""
    names = list(settings.metrics) if settings.metrics is not None else default_metric_names(settings.topk)
    names = list(dict.fromkeys(resolve_metric(n)[0] for n in names))
    frames = []
    archs = stored_archs(paths)
    if not archs:
        raise FileNotFoundError(f"no maps in {paths.root / 'maps'}; run `evidrift explain study.yaml` first")
    jobs = [
        (arch, method)
        for arch in archs
        for method in sorted(set(stored_methods(paths, arch, 1)) & set(stored_methods(paths, arch, 2)))
    ]
    if not jobs:
        raise FileNotFoundError(f"no method has maps at both stage1 and stage2 under {paths.root / 'maps'}")
    for arch, method in tqdm(jobs, desc="drift", unit="map set", disable=not progress):
        maps1, ids1, meta1 = read_maps(paths, arch, 1, method)
        maps2, ids2, meta2 = read_maps(paths, arch, 2, method)
        index2 = {image_id: i for i, image_id in enumerate(ids2)}
        keep1 = [i for i, image_id in enumerate(ids1) if image_id in index2]
        keep2 = [index2[ids1[i]] for i in keep1]
        if not keep1:
            continue
        size = analysis_size(paths, arch, {**meta2, **meta1}, settings)
        table = compare(
            maps1[keep1],
            maps2[keep2],
            metrics=names,
            size=size,
            zone_grid=settings.zone_grid,
            chunk_size=settings.chunk_size,
        )
        table.insert(0, "layer", meta1.get("layer", ""))
        table.insert(0, "method", method)
        table.insert(0, "arch", arch)
        table.insert(0, "id", [ids1[i] for i in keep1])
        frames.append(table)
    columns = ["id", "arch", "method", "layer", *names, "degenerate", "degenerate_reason"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def run_drift(
    run_dir: str | Path, settings: DriftSettings | None = None, progress: bool = True
) -> DriftOutputs:
    """The whole step: writes drift.parquet, summary.csv, rankings.csv, reversals.csv, tests.csv,
    kendall.csv into ``run_dir`` (atomically) and returns the tables."""
    paths = RunPaths.at(run_dir)
    settings = settings if settings is not None else settings_from_config(run_dir)
    drift = drift_table(paths, settings, progress=progress)
    write_parquet_atomic(paths.drift, drift)
    metrics = stats.metric_columns(drift)
    summary = stats.summarize(drift, metrics, n_boot=settings.n_boot, ci=settings.ci, seed=settings.seed)
    ranked = stats.rankings(drift, metrics)
    tests = stats.paired_tests(drift, metrics, alpha=settings.alpha)
    rev = stats.reversals(drift, tests, metrics)
    kendall = stats.kendall_between_methods(ranked)
    write_csv_atomic(paths.summary, summary)
    write_csv_atomic(paths.rankings, ranked)
    write_csv_atomic(paths.reversals, rev)
    write_csv_atomic(paths.root / "tests.csv", tests)
    write_csv_atomic(paths.root / "kendall.csv", kendall)
    return DriftOutputs(drift, summary, ranked, rev, tests, kendall)


def summary_rows(
    summary: pd.DataFrame, metrics: Sequence[str] = KEY_METRICS
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (arch, method, 'mean [lo, hi]' per key metric present) for printing."""
    present = [m for m in metrics if m in set(summary["metric"])]
    header = ["arch", "method", "n", *present]
    rows = []
    for (arch, method), group in summary.groupby(["arch", "method"], sort=True):
        by_metric = group.set_index("metric")
        cells = [str(arch), str(method), str(int(by_metric["n"].max()))]
        for m in present:
            r = by_metric.loc[m]
            cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        rows.append(cells)
    return header, rows
