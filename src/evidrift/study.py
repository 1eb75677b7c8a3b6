"""Orchestration of a study (DESIGN § 3): data → stage 0 → stage 1 → stage 2 → evaluate → explain → drift →
report, with markers, resume and ``--force``.

Each step has a *step hash*: the hash of the config parts that step depends on plus the hashes of the steps
it reads from (a DAG, not a chain: the classification CIs depend on ``stats`` but the maps do not, so a new
``stats.n_boot`` reruns evaluate, drift and report and never explain; a new explain method reruns explain,
drift and report and never training). A step runs in three moves:

1. ``steps/{step}.started.json`` is written with the hash (so a later run knows what a partial output is);
2. the step's library function runs — the training, explaining and data functions are resumable themselves
   (epoch checkpoints, shards), so a step killed half-way resumes where it stopped;
3. ``steps/{step}.json`` (``RunPaths.step_marker``) is written last with the hash.

A step whose marker holds the current hash is skipped. When the hash of a partly or fully done step has
changed, outputs that cannot be reused are removed first (maps of another model or method set), and
training relies on the checkpoints' own stage hashes. ``force`` removes the outputs and markers of a step
and of every step after it, so they are redone. Under ``torchrun`` every rank runs the training, evaluation
and explaining (each does its share); rank 0 alone writes the data, drift, report and the markers, and
every step ends at a barrier.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from evidrift import distributed
from evidrift.artifacts import RunPaths, config_hash, write_json_atomic, write_text_atomic
from evidrift.config import StudyConfig, dump_yaml, study_hash
from evidrift.distributed import Context

if TYPE_CHECKING:
    from evidrift.analysis import DriftSettings

logger = logging.getLogger("evidrift.study")

STEPS: tuple[str, ...] = ("data", "stage0", "stage1", "stage2", "evaluate", "explain", "drift", "report")
#: The steps each step reads from (their hashes are part of its hash).
DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "stage0": ("data",),
    "stage1": ("stage0",),
    "stage2": ("stage1",),
    "evaluate": ("stage2",),
    "explain": ("stage2",),
    "drift": ("explain",),
    "report": ("drift", "evaluate"),
}
Printer = Callable[[str], None]


class StudyError(RuntimeError):
    """A study that cannot go on; the message names the step, the file and what to do."""


# --- step hashes --------------------------------------------------------------------------------------------
def _stage_hashes(config: StudyConfig, stage: str) -> dict[str, str]:
    from evidrift.train import stage_hash, uses_stage0

    return {m.key: stage_hash(config, m, stage) for m in config.models if stage != "0" or uses_stage0(m)}


def step_inputs(config: StudyConfig, step: str) -> dict[str, Any]:
    """The config parts one step depends on (JSON-able), without the hashes of the steps it reads from."""
    if step == "data":
        return {"data": config.data.model_dump(mode="json")}
    if step in ("stage0", "stage1", "stage2"):
        return {"stage_hashes": _stage_hashes(config, step[-1])}
    if step == "evaluate":
        return {
            "models": [m.key for m in config.models],
            "stats": config.stats.model_dump(mode="json"),
            "batch_size": config.train.stage2.batch_size,
        }
    if step == "explain":
        return {
            "explain": config.explain.model_dump(mode="json"),
            "cam_layers": {m.key: m.cam_layers for m in config.models},
            "stage_hashes": {s: _stage_hashes(config, s) for s in ("1", "2")},
        }
    if step == "drift":
        return {"drift": config.drift.model_dump(mode="json"), "stats": config.stats.model_dump(mode="json")}
    if step == "report":
        return {"study": study_hash(config)}
    raise ValueError(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")


def step_hashes(config: StudyConfig) -> dict[str, str]:
    """The hash of every step: its own inputs plus the hashes of the steps it depends on."""
    hashes: dict[str, str] = {}
    for step in STEPS:
        upstream = {d: hashes[d] for d in DEPENDS[step]}
        hashes[step] = config_hash({"step": step, "inputs": step_inputs(config, step), "upstream": upstream})
    return hashes


# --- markers ------------------------------------------------------------------------------------------------
def _started_path(paths: RunPaths, step: str) -> Path:
    return paths.step_marker(step).with_suffix(".started.json")


def read_marker(path: Path) -> dict[str, Any] | None:
    """A marker's content, or None when it is absent or unreadable (an interrupted write is never valid)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def step_done(paths: RunPaths, step: str, digest: str) -> bool:
    """True when ``steps/{step}.json`` holds ``digest``."""
    marker = read_marker(paths.step_marker(step))
    return marker is not None and marker.get("hash") == digest


def _previous_hash(paths: RunPaths, step: str) -> str | None:
    """The hash the step last started or finished with (None when it never ran here)."""
    for path in (_started_path(paths, step), paths.step_marker(step)):
        marker = read_marker(path)
        if marker is not None:
            return str(marker.get("hash"))
    return None


def _remove(*targets: Path) -> None:
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def clear_outputs(config: StudyConfig, paths: RunPaths, step: str) -> None:
    """Remove what ``step`` wrote (so that it is redone from scratch) and its markers."""
    if step == "data":
        _remove(paths.data_dir)
    elif step in ("stage0", "stage1", "stage2"):
        stage = step[-1]
        for model in config.models:
            folder = paths.model_dir(model.key)
            if folder.is_dir():
                _remove(*folder.glob(f"stage{stage}.*"))
    elif step == "evaluate":
        _remove(paths.root / "eval")
    elif step == "explain":
        _remove(paths.root / "maps")
    elif step == "drift":
        _remove(
            paths.drift,
            paths.summary,
            paths.rankings,
            paths.reversals,
            paths.root / "tests.csv",
            paths.root / "kendall.csv",
            *paths.root.glob("localization*"),
        )
    elif step == "report":
        _remove(paths.report, paths.figures_dir)
    _remove(paths.step_marker(step), _started_path(paths, step))


def check_names(config: StudyConfig) -> None:
    """Fail before any work when an explain method or a drift metric name is unknown (ValueError naming
    the key, the name and the known names), rather than after hours of training."""
    from evidrift.cam import resolve_method
    from evidrift.metrics.drift import resolve_metric

    for method in config.explain.methods:
        try:
            resolve_method(method)
        except ValueError as exc:
            raise ValueError(f"explain.methods: {exc}") from None
    if config.drift.metrics != "all":
        for metric in config.drift.metrics:
            try:
                resolve_metric(metric)
            except ValueError as exc:
                raise ValueError(f"drift.metrics: {exc}") from None


def force_steps(step: str) -> list[str]:
    """``step`` and every step after it (what ``--force STEP`` redoes)."""
    if step not in STEPS:
        raise ValueError(f"--force {step!r}: unknown step; choose one of {', '.join(STEPS)}")
    return list(STEPS[STEPS.index(step) :])


# --- the steps ----------------------------------------------------------------------------------------------
def run_data(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    from evidrift.data.sources import prepare_data

    if ctx.is_main:
        prepare_data(config, paths)


def _run_stage(stage: str) -> Callable[[StudyConfig, RunPaths, Context], None]:
    def run(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        from evidrift.train import train_study

        train_study(config, paths, stages=(stage,), ctx=ctx)

    return run


def run_evaluate(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    from evidrift.evaluate import evaluate_study

    evaluate_study(config, paths, ctx=ctx)


def run_explain(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    """Maps of both stages of every model; StudyError when no model has a single image to explain."""
    from evidrift.explain import explain_run

    explained = {}
    for model in config.models:
        for stage in (1, 2):
            explained[model.key] = explain_run(config, paths, model.key, stage, ctx=ctx).n_images
    if not any(explained.values()):
        raise StudyError(
            f"explain.samples = {config.explain.samples!r} selected no test image for any model "
            f"({paths.root / 'eval'} has the predictions): no model classifies a test image correctly "
            "at the required stages. Train longer (train.stage*.epochs), or set explain.samples to tp_any "
            "or all, then rerun (finished steps are kept)."
        )


def drift_settings(config: StudyConfig) -> DriftSettings:
    """The drift step's settings (``evidrift.analysis.DriftSettings``) from the study's drift and stats."""
    from evidrift.analysis import DriftSettings

    return DriftSettings.from_config(config)


def run_drift(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    """Drift table and statistics (``evidrift.analysis``), then localization against the masks if any."""
    if not ctx.is_main:
        return
    from evidrift.analysis import run_drift as analyze

    settings = drift_settings(config)
    analyze(paths.root, settings)
    write_localization(config, paths, settings)


LOCALIZATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_iou@0.2", "pixel_auroc", "cnr")


def _masks_at(frame: pd.DataFrame, size: int, resize: str) -> dict[str, Any]:
    """{image id: bool mask [size, size]} with the model input's pad/crop geometry, for non-empty masks."""
    import torch

    from evidrift.data.readers import read_mask
    from evidrift.data.transforms import resize_image

    out = {}
    for row in frame.itertuples():
        mask = torch.as_tensor(read_mask(row.mask_path), dtype=torch.float32)[None, None]
        resized = resize_image(mask, size, resize, is_mask=True)[0, 0] > 0.5
        if resized.any():
            out[str(row.id)] = resized
    return out


def localization_table(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> pd.DataFrame | None:
    """Maps of both stages vs the lesion masks: one row per (id, arch, stage, method), a column per
    ``LOCALIZATION_METRICS`` (at the drift analysis size); None when the data has no masks."""
    import torch

    from evidrift.analysis import drift_jobs, stored_archs, study_analysis_size
    from evidrift.artifacts import read_maps, stored_methods
    from evidrift.metrics import localization as loc
    from evidrift.metrics.common import AnalysisMaps

    manifest = pd.read_parquet(paths.manifest)
    if "mask_path" not in manifest.columns:
        return None
    with_masks = manifest[manifest["mask_path"].notna() & (manifest["status"] == "ok")]
    if with_masks.empty:
        return None
    with_masks = with_masks[with_masks["split"] == "test"]
    rows = []
    masks_by_size: dict[int, dict[str, Any]] = {}
    size = study_analysis_size(paths, drift_jobs(paths), settings)  # the drift step's one grid
    for arch in stored_archs(paths):
        for stage in (1, 2):
            for method in stored_methods(paths, arch, stage):
                maps, ids, _ = read_maps(paths, arch, stage, method)
                if size not in masks_by_size:
                    masks_by_size[size] = _masks_at(with_masks, size, config.data.resize)
                masks = masks_by_size[size]
                keep = [i for i, image_id in enumerate(ids) if image_id in masks]
                if not keep:
                    continue
                gt = torch.stack([masks[ids[i]] for i in keep])
                prepared = AnalysisMaps(maps[keep], size)
                values = {
                    "pointing_game": loc.pointing_game(prepared, gt),
                    "energy_pointing_game": loc.energy_pointing_game(prepared, gt),
                    "mask_iou@0.2": loc.mask_iou(prepared, gt, k=0.2),
                    "pixel_auroc": loc.pixel_auroc(prepared, gt),
                    "cnr": loc.cnr(prepared, gt),
                }
                for j, i in enumerate(keep):
                    rows.append(
                        {
                            "id": ids[i],
                            "arch": arch,
                            "stage": stage,
                            "method": method,
                            **{name: float(v[j]) for name, v in values.items()},
                        }
                    )
    return pd.DataFrame(rows) if rows else None


def write_localization(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> None:
    """``localization.parquet`` and ``localization_summary.csv`` (mean, bootstrap CI per arch × stage × method
    × metric) when the data has lesion masks; nothing otherwise."""
    from evidrift import stats
    from evidrift.artifacts import write_csv_atomic, write_parquet_atomic

    table = localization_table(config, paths, settings)
    if table is None:
        return
    write_parquet_atomic(paths.root / "localization.parquet", table)
    parts = []
    for stage, group in table.groupby("stage", sort=True):
        summary = stats.summarize(
            group, list(LOCALIZATION_METRICS), n_boot=settings.n_boot, ci=settings.ci, seed=settings.seed
        )
        summary.insert(2, "stage", int(stage))
        parts.append(summary)
    write_csv_atomic(paths.root / "localization_summary.csv", pd.concat(parts, ignore_index=True))


def run_report(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    if ctx.is_main and config.report.enabled:
        from evidrift.report import build_report

        build_report(paths.root, config)


RUNNERS: dict[str, Callable[[StudyConfig, RunPaths, Context], None]] = {
    "data": run_data,
    "stage0": _run_stage("0"),
    "stage1": _run_stage("1"),
    "stage2": _run_stage("2"),
    "evaluate": run_evaluate,
    "explain": run_explain,
    "drift": run_drift,
    "report": run_report,
}
#: Steps whose partial outputs from another config must go before they run again (training checks its own
#: stage hashes per model; data, evaluate, drift and report overwrite their files).
CLEAR_ON_CHANGE = frozenset({"explain"})


@dataclass
class StepResult:
    step: str
    status: str  # "ran" or "skipped"
    seconds: float
    digest: str


def run_study(
    config: StudyConfig,
    paths: RunPaths | None = None,
    force: Iterable[str] = (),
    until: str | None = None,
    ctx: Context | None = None,
    echo: Printer | None = None,
    runners: dict[str, Callable[[StudyConfig, RunPaths, Context], None]] | None = None,
) -> list[StepResult]:
    """Run the study's steps in order, skipping the done ones; returns what each step did.

    ``paths``: the run directory (default ``config.output.dir``); ``force``: steps to redo together with
    every step after them; ``until``: stop after this step; ``echo``: one line per step (e.g. ``print``);
    ``runners``: replacements for the step functions (tests).
    """
    paths = paths or RunPaths.at(config.output.dir)
    ctx = ctx or distributed.setup(config.train.device)
    runners = {**RUNNERS, **(runners or {})}
    say = echo if (echo is not None and ctx.is_main) else (lambda _line: None)
    if until is not None and until not in STEPS:
        raise ValueError(f"--until {until!r}: unknown step; choose one of {', '.join(STEPS)}")
    check_names(config)
    redo: set[str] = set()
    for step in force:
        redo.update(force_steps(step))
    hashes = step_hashes(config)
    if ctx.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.config, dump_yaml(config))
        for step in STEPS:
            if step in redo:
                clear_outputs(config, paths, step)
    distributed.barrier(ctx)
    results: list[StepResult] = []
    for step in STEPS:
        digest = hashes[step]
        if step_done(paths, step, digest):
            results.append(StepResult(step, "skipped", 0.0, digest))
            say(f"[{step}] done before (hash {digest}), skipped")
        else:
            start, cpu_start = time.perf_counter(), time.process_time()
            if ctx.is_main:
                previous = _previous_hash(paths, step)
                if step in CLEAR_ON_CHANGE and previous is not None and previous != digest:
                    clear_outputs(config, paths, step)
                write_json_atomic(_started_path(paths, step), {"step": step, "hash": digest})
            distributed.barrier(ctx)
            say(f"[{step}] running ...")
            runners[step](config, paths, ctx)
            distributed.barrier(ctx)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if ctx.is_main:
                write_json_atomic(
                    paths.step_marker(step),
                    {
                        "step": step,
                        "hash": digest,
                        "seconds": round(seconds, 3),
                        "cpu_seconds": round(cpu, 3),
                    },
                )
                _remove(_started_path(paths, step))
            distributed.barrier(ctx)
            results.append(StepResult(step, "ran", seconds, digest))
            say(f"[{step}] done in {seconds:.1f} s")
        if step == until:
            break
    return results
