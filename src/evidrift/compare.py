"""`evidrift compare A B --data D`: explanation drift between two checkpoints of one model, as a CI gate.

The comparison is a small study in its own run directory: the two checkpoints play the parts of stage 1 (A,
the reference) and stage 2 (B, the candidate), linked into ``models/{arch}/stage{1,2}.*``; every usable image
of ``--data`` (or of one split of a CSV that has a ``split`` column) is marked ``test``; then the study's own
evaluate, explain (``samples: all``, target = the label), drift and report steps run, so a comparison and a
study compute everything the same way. It is recomputed from scratch every time — a gate must never pass on
a stale result. ``check_gates`` turns ``--fail-below METRIC=V`` / ``--fail-above METRIC=V`` into messages
naming the metric, the method, the threshold and the mean value that fails.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evidrift.artifacts import RunPaths, write_parquet_atomic, write_text_atomic
from evidrift.config import DEFAULT_EXPLAIN_METHODS, StudyConfig, dump_yaml, parse_config
from evidrift.study import drift_settings, write_localization

SPLITS = ("all", "train", "val", "test")


class CompareError(ValueError):
    """Checkpoints that cannot be compared, or a gate that cannot be checked; the message says why and how."""


@dataclass(frozen=True)
class CompareResult:
    paths: RunPaths
    arch: str
    n_images: int
    summary: pd.DataFrame


# --- checks -------------------------------------------------------------------------------------------------
def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of a checkpoint (verified against its weights); CompareError naming the file otherwise."""
    from evidrift.models import read_checkpoint_meta, sidecar_path

    file = Path(path)
    if file.is_file() and (file.suffix != ".safetensors" or not sidecar_path(file).is_file()):
        raise CompareError(
            f"{file} is not an evidrift checkpoint: compare needs a .safetensors file with the .json sidecar "
            "that evidrift writes beside it (architecture, classes, input size, normalization); train it "
            "with evidrift (`evidrift run` / `evidrift train`), or rebuild the model and save it with "
            "`evidrift.models.save_checkpoint(path, model, meta)`"
        )
    try:
        return read_checkpoint_meta(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CompareError(f"cannot read checkpoint {path}: {exc}") from None


def check_compatible(a: Path, meta_a: Mapping[str, Any], b: Path, meta_b: Mapping[str, Any]) -> None:
    """Raise CompareError unless A and B are the same architecture with the same class list (same order)."""
    arch_a, arch_b = (
        meta_a.get("timm_name") or meta_a.get("arch"),
        meta_b.get("timm_name") or meta_b.get("arch"),
    )
    if arch_a != arch_b:
        raise CompareError(
            f"checkpoints of different architectures: {a} is {arch_a!r}, {b} is {arch_b!r}; "
            "compare two checkpoints of one model (e.g. before and after an update)"
        )
    classes_a, classes_b = list(meta_a.get("classes") or []), list(meta_b.get("classes") or [])
    if classes_a != classes_b:
        only_a = sorted(set(classes_a) - set(classes_b))
        only_b = sorted(set(classes_b) - set(classes_a))
        detail = (
            f"only in A: {only_a}, only in B: {only_b}"
            if (only_a or only_b)
            else "same names in another order"
        )
        raise CompareError(
            f"checkpoints with different class lists: {a} has {classes_a}, {b} has {classes_b} ({detail}); "
            "maps of different target classes cannot be compared"
        )


def resolve_gates(names: Iterable[str]) -> dict[str, str]:
    """{given name: canonical metric name}; CompareError naming an unknown metric and the known ones."""
    from evidrift.metrics.drift import resolve_metric

    out = {}
    for name in names:
        try:
            out[name] = resolve_metric(name)[0]
        except ValueError as exc:
            raise CompareError(f"gate metric {name!r}: {exc}") from None
    return out


def check_gates(
    summary: pd.DataFrame, fail_below: Mapping[str, float], fail_above: Mapping[str, float]
) -> list[str]:
    """One message per failed gate and method: the mean of the metric over the images (``summary.csv``) must
    be ≥ the ``fail_below`` threshold and ≤ the ``fail_above`` one. A NaN mean (every map degenerate)
    fails."""
    failures = []
    for gates, option, worse in ((fail_below, "--fail-below", "<"), (fail_above, "--fail-above", ">")):
        canonical = resolve_gates(gates)
        for name, threshold in gates.items():
            metric = canonical[name]
            rows = summary[summary["metric"] == metric]
            if rows.empty:
                raise CompareError(
                    f"{option} {name}: the metric {metric!r} was not computed (summary.csv has "
                    f"{sorted(summary['metric'].unique())})"
                )
            for _, row in rows.iterrows():
                value = float(row["mean"])
                bad = math.isnan(value) or (value < threshold if worse == "<" else value > threshold)
                if bad:
                    failures.append(
                        f"{metric} under {row['method']} ({row['arch']}): "
                        f"mean {value:.4f} {worse} {threshold:g} "
                        f"({option} {name}={threshold:g}; n = {int(row['n'])} images)"
                    )
    return failures


# --- the comparison -----------------------------------------------------------------------------------------
def _link(source: Path, target: Path) -> None:
    """``target`` → ``source`` (symlink; a copy where links are not allowed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)


def compare_config(
    meta: Mapping[str, Any], data: Path, out: Path, methods: Sequence[str] | None, max_images: int | None
) -> StudyConfig:
    """The study that compares two checkpoints described by ``meta`` on the images of ``data``."""
    source = "csv" if data.is_file() else "folder"
    raw = {
        "data": {
            "source": source,
            "path": str(data.resolve()),
            "classes": list(meta["classes"]),
            "augment": False,
            "on_bad_image": "skip",
        },
        "models": [
            {
                "arch": meta.get("timm_name") or meta["arch"],
                "weights": "compare",
                "name": meta.get("key") or meta.get("arch"),
                "image_size": int(meta["image_size"]),
                "head": meta["head"],
                "cam_layers": list(meta.get("cam_layers") or ["default"]),
            }
        ],
        "explain": {
            "methods": list(methods or DEFAULT_EXPLAIN_METHODS),
            "samples": "all",
            "target": "label",
            "max_images": max_images,
        },
        "train": {"loss": meta.get("loss", "ce")},
        "report": {"title": "evidrift compare: checkpoint A → B"},
        "output": {"dir": str(out)},
    }
    return parse_config(raw, "the compare study")


def _select_images(paths: RunPaths, split: str) -> int:
    """Mark the images to compare as the ``test`` split of the run's manifest; returns how many."""
    manifest = pd.read_parquet(paths.manifest)
    chosen = manifest["status"] == "ok"
    if split != "all":
        chosen &= manifest["split"] == split
    if not chosen.any():
        raise CompareError(f"no usable image in {paths.manifest} for --split {split}")
    manifest["split"] = manifest["split"].where(~chosen, "test")
    manifest.loc[~chosen & (manifest["split"] == "test"), "split"] = "val"
    write_parquet_atomic(paths.manifest, manifest)
    return int(chosen.sum())


def compare_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    split: str = "all",
    max_images: int | None = None,
    gates: Iterable[str] = (),
) -> CompareResult:
    """Explain every usable image of ``data`` with checkpoints ``a`` and ``b`` and measure the drift A → B;
    writes the run directory ``out`` (drift.parquet, summary.csv, report.html, ...). ``gates``: metric names
    checked up front, so that a typo fails before any work."""
    a, b, data, out = Path(a), Path(b), Path(data), Path(out)
    if split not in SPLITS:
        raise CompareError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if not data.exists():
        raise CompareError(f"--data {data} does not exist; pass a folder of class folders or a CSV manifest")
    resolve_gates(gates)
    from evidrift.cam import resolve_method

    for method in methods or ():
        try:
            resolve_method(method)
        except ValueError as exc:
            raise CompareError(f"--methods: {exc}") from None
    meta_a, meta_b = checkpoint_meta(a), checkpoint_meta(b)
    check_compatible(a, meta_a, b, meta_b)
    config = compare_config(meta_a, data, out, methods, max_images)
    from evidrift import distributed
    from evidrift.analysis import run_drift
    from evidrift.data.sources import prepare_data
    from evidrift.evaluate import evaluate_study
    from evidrift.explain import explain_run
    from evidrift.report import build_report

    paths = RunPaths.at(out)
    for stale in ("maps", "eval", "figures", "steps"):
        if (paths.root / stale).is_dir():
            shutil.rmtree(paths.root / stale)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.config, dump_yaml(config))
    prepare_data(config, paths, input_size=int(meta_a["image_size"]))
    n_images = _select_images(paths, split)
    if max_images is not None:
        n_images = min(n_images, max_images)
    key = config.models[0].key
    for stage, checkpoint in (("1", a), ("2", b)):
        target = paths.checkpoint(key, stage)
        _link(checkpoint, target)
        _link(checkpoint.with_suffix(".json"), target.with_suffix(".json"))
    ctx = distributed.setup(config.train.device)
    scope = "every usable image" if split == "all" else f"the {split} split"
    evaluate_study(config, paths, ctx=ctx, title=f"classification of {scope} of --data")
    for stage in (1, 2):
        explain_run(config, paths, key, stage, ctx=ctx, progress=False)
    settings = drift_settings(config)
    run_drift(paths.root, settings, progress=False)
    write_localization(config, paths, settings)
    build_report(
        paths.root, config, stage_labels=(f"A ({a.name})", f"B ({b.name})"), subtitle=f"A = {a}, B = {b}"
    )
    return CompareResult(paths, key, n_images, pd.read_csv(paths.summary))
