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
training relies on the checkpoints' own stage hashes. The data step's hash includes a fingerprint of the
files it read (``evidrift.data.sources.data_fingerprint``): when it changed, the run says what changed
(files added, removed, modified) and redoes the data step and every step after it.

Before any work ``check_study`` checks what can be checked without training (method and metric names,
architectures, CAM layers, weights files, data paths; ``evidrift validate`` runs it too), every path the run
will write for a model is checked to lie inside the run directory, and a run directory holding another
study (``study_identity``: the data source and path, the models' names, architectures and weights) is
refused unless ``--force all``. ``force`` removes the outputs and markers of a step
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
import yaml

from evidrift import distributed
from evidrift.artifacts import RunPaths, config_hash, write_json_atomic, write_text_atomic
from evidrift.config import ConfigError, StudyConfig, dump_yaml, resolved_dict, study_hash
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


def step_inputs(config: StudyConfig, step: str, fingerprint: dict[str, str] | None = None) -> dict[str, Any]:
    """The config parts one step depends on (JSON-able), without the hashes of the steps it reads from. The
    data step's include the digest of ``fingerprint`` (computed from ``config.data`` when None)."""
    if step == "data":
        from evidrift.data.sources import data_fingerprint, fingerprint_digest

        entries = data_fingerprint(config.data) if fingerprint is None else fingerprint
        return {"data": config.data.model_dump(mode="json"), "files": fingerprint_digest(entries)}
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


def step_hashes(config: StudyConfig, fingerprint: dict[str, str] | None = None) -> dict[str, str]:
    """The hash of every step: its own inputs plus the hashes of the steps it depends on (``fingerprint``:
    the data's, when already computed)."""
    hashes: dict[str, str] = {}
    for step in STEPS:
        upstream = {d: hashes[d] for d in DEPENDS[step]}
        inputs = step_inputs(config, step, fingerprint)
        hashes[step] = config_hash({"step": step, "inputs": inputs, "upstream": upstream})
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


def check_study(config: StudyConfig, source: str = "the study", data: bool = False) -> list[str]:
    """Check everything that can be checked without training; returns one line per thing checked.

    Method and metric names (``check_names``); per model its architecture (timm's registry), its CAM layers
    (the model built on the meta device) and a local weights file (read, keys and shapes matched); the data
    path; with ``data``, the data itself (the data step's checks, nothing written). Raises ``ConfigError``
    naming ``source``, the key, the value and the fix."""
    from evidrift import models

    try:
        check_names(config)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    lines = [f"explain.methods: {', '.join(config.explain.methods)}"]
    for i, model in enumerate(config.models):
        where = f"models[{i}] ({model.key})"
        try:
            layers = models.check_model(model.arch, model.cam_layers, model.weights, model.head)
        except ValueError as exc:
            raise ConfigError(f"{source}: {where}: {exc}") from None
        lines.append(
            f"{where}: arch {models.resolve_arch(model.arch)}, CAM layers {layers}, weights {model.weights}"
        )
    path = config.data.path
    if config.data.source == "folder" and path is not None and not path.is_dir():
        raise ConfigError(
            f"{source}: data.path {path} is not a folder (data.source: folder needs one sub-folder per "
            "class); fix the path"
        )
    if config.data.source == "csv" and path is not None and not path.is_file():
        raise ConfigError(
            f"{source}: data.path {path} is not a file (data.source: csv needs the CSV manifest); "
            "fix the path"
        )
    if config.data.source != "phantom":
        lines.append(f"data.path: {path} exists")
    if data:
        lines.append(_check_data(config, source))
    return lines


def _check_data(config: StudyConfig, source: str) -> str:
    """The data step's checks without writing (``check_study(data=True)``); one line of counts."""
    from evidrift.data.sources import ManifestError, collect_data, summarize

    if config.data.source == "phantom":
        return "data: the phantom set is generated by the data step (nothing to read before it)"
    try:
        prepared = collect_data(config, None, _input_size(config))
    except ManifestError as exc:
        raise ConfigError(f"{source}: data: {exc}") from None
    counts = summarize(prepared.frame)
    splits = ", ".join(f"{n} {split}" for split, n in counts["per_split"].items())
    return (
        f"data: {counts['n']} images ({splits}), {counts['skipped']} unreadable and skipped, "
        f"{len(prepared.ignored)} files ignored, {len(prepared.warnings)} warnings; "
        f"classes {prepared.classes}"
    )


def _input_size(config: StudyConfig) -> int:
    """The largest input side of the study's models at stage 1 and 2 (for the data step's warnings)."""
    from evidrift.train import image_size_for, stage_config

    return max(image_size_for(m, stage_config(config, s)) for m in config.models for s in ("1", "2"))


def check_paths_inside(config: StudyConfig, paths: RunPaths) -> None:
    """Raise ``StudyError`` when a path the run writes for a model (its folder, checkpoints, evaluation table,
    maps) would lie outside the run directory."""
    root = paths.root.resolve()
    for model in config.models:
        key = model.key
        targets = [
            paths.model_dir(key),
            paths.checkpoint(key, 2),
            paths.train_metrics(key),
            paths.eval_table(key),
            *(
                paths.maps_shard(key, stage, method, 0)
                for stage in (1, 2)
                for method in config.explain.methods
            ),
        ]
        for target in targets:
            if not target.resolve().is_relative_to(root):
                raise StudyError(
                    f"model {key!r} would write {target} outside the run directory {root}; give it a `name` "
                    "of letters, digits, '-', '_' and '.'"
                )


def study_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What makes a run directory one study's (from a resolved config or a run's config.yaml): the data
    source and path (the phantom set's parameters), and each model's name, architecture and weights."""
    data = resolved.get("data") or {}
    identity: dict[str, Any] = {"source": data.get("source", "phantom"), "path": data.get("path")}
    if identity["source"] == "phantom":
        phantom = data.get("phantom") or {}
        identity["phantom"] = {k: phantom.get(k) for k in ("n", "size", "seed", "shortcut_marker")}
    models = sorted(
        (str(m.get("name") or m.get("arch")), str(m.get("arch")), str(m.get("weights", "none")))
        for m in resolved.get("models") or []
        if isinstance(m, dict)
    )
    return {"data": identity, "models": [list(m) for m in models]}


def check_same_study(config: StudyConfig, paths: RunPaths, replace: bool) -> bool:
    """Refuse (``StudyError``) a run directory whose config.yaml belongs to another study (its
    ``study_identity`` differs), unless ``replace`` (``--force all``). Returns True when it belongs to
    another study and is to be replaced."""
    if not paths.config.is_file():
        return False
    try:
        stored = yaml.safe_load(paths.config.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        stored = None
    before = study_identity(stored) if isinstance(stored, dict) else None
    after = study_identity(resolved_dict(config))
    if before == after:
        return False
    if replace:
        return True
    if before is None:
        what = f"{paths.config} cannot be read"
    else:
        differences = [
            f"data.{name}: {before['data'].get(name)} there, {after['data'].get(name)} here"
            for name in sorted(set(before["data"]) | set(after["data"]))
            if before["data"].get(name) != after["data"].get(name)
        ]
        if before["models"] != after["models"]:
            differences.append(
                "models (name, arch, weights): "
                f"{[tuple(m) for m in before['models']]} there, {[tuple(m) for m in after['models']]} here"
            )
        what = "; ".join(differences)
    raise StudyError(
        f"the run directory {paths.root} holds another study ({what}); running this one into it would mix "
        "the two. Choose a new run directory (--out DIR or output.dir), or replace that study with "
        "--force all"
    )


def force_steps(step: str) -> list[str]:
    """``step`` and every step after it (what ``--force STEP`` redoes); ``all``: every step."""
    if step == "all":
        return list(STEPS)
    if step not in STEPS:
        raise ValueError(f"--force {step!r}: unknown step; choose one of {', '.join(STEPS)} (or all)")
    return list(STEPS[STEPS.index(step) :])


def _data_change(config: StudyConfig, paths: RunPaths, fingerprint: dict[str, str]) -> str:
    """What changed in the data step's inputs since it last ran here (one phrase)."""
    from evidrift.data.sources import fingerprint_changes, read_fingerprint

    before = read_fingerprint(paths)
    if before is None:
        return "the data step's inputs changed since it ran"
    changes = fingerprint_changes(before, fingerprint)
    if changes:
        return f"the data changed since the data step ran ({config.data.path}: {changes})"
    return "the data settings changed since the data step ran"


# --- the steps ----------------------------------------------------------------------------------------------
def run_data(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    from evidrift.data.sources import prepare_data

    if ctx.is_main:
        prepare_data(config, paths, input_size=_input_size(config))


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
#: The lesion mask's share of the image at the analysis size: the energy pointing game of a uniform map.
BASELINE_METRIC = "mask_fraction"
#: Box IoU threshold on the min-max normalized map (``box_iou@t``), for the images with CSV boxes.
BOX_IOU_THRESHOLD = 0.5
BOX_METRIC = f"box_iou@{BOX_IOU_THRESHOLD:g}"


@dataclass
class GroundTruth:
    """The ground truth of one test image at the analysis size: ``mask`` bool [S, S] (the lesion mask, else
    the boxes rasterised: ``box_derived``), ``boxes`` bool [S, S] (the union of the CSV boxes) or None."""

    mask: Any
    boxes: Any
    box_derived: bool


def _ground_truth_at(frame: pd.DataFrame, size: int, resize: str) -> dict[str, GroundTruth]:
    """{image id: GroundTruth} with the model input's pad/crop geometry, for images whose mask (or boxes)
    is non-empty. Boxes are pixel corners of the original image (``manifest.bbox``)."""
    import torch

    from evidrift.data.readers import image_size, read_mask
    from evidrift.data.transforms import resize_image
    from evidrift.metrics.localization import boxes_to_mask

    def at_size(mask: Any) -> Any:
        tensor = torch.as_tensor(mask, dtype=torch.float32)[None, None]
        return resize_image(tensor, size, resize, is_mask=True)[0, 0] > 0.5

    out = {}
    for row in frame.itertuples():
        mask_path = getattr(row, "mask_path", None)
        box_text = getattr(row, "bbox", None)
        boxes = None
        if isinstance(box_text, str) and box_text:
            height, width = image_size(row.path)
            boxes = at_size(boxes_to_mask([json.loads(box_text)], (height, width))[0])
        if isinstance(mask_path, str) and mask_path:
            mask, derived = at_size(read_mask(mask_path)), False
        elif boxes is not None:
            mask, derived = boxes, True
        else:
            continue
        if mask.any():
            out[str(row.id)] = GroundTruth(
                mask, boxes if boxes is not None and boxes.any() else None, derived
            )
    return out


def localization_table(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> pd.DataFrame | None:
    """Maps of both stages vs the lesion masks, or masks rasterised from the CSV's boxes when an image has
    no mask (column ``box_derived``): one row per (id, arch, stage, method), a column per
    ``LOCALIZATION_METRICS``, ``box_iou@0.5`` (NaN without boxes) and ``mask_fraction`` (the mask's share of
    the image: a uniform map's energy pointing game), at the drift analysis size; None when
    the data has neither masks nor boxes."""
    import torch

    from evidrift.analysis import drift_jobs, stored_archs, study_analysis_size
    from evidrift.artifacts import read_maps, stored_methods
    from evidrift.metrics import localization as loc
    from evidrift.metrics.common import AnalysisMaps

    manifest = pd.read_parquet(paths.manifest)
    has_mask = manifest["mask_path"].notna() if "mask_path" in manifest.columns else False
    has_box = manifest["bbox"].notna() if "bbox" in manifest.columns else False
    with_truth = manifest[(has_mask | has_box) & (manifest["status"] == "ok")]
    if with_truth.empty:
        return None
    with_truth = with_truth[with_truth["split"] == "test"]
    rows = []
    truth_by_size: dict[int, dict[str, GroundTruth]] = {}
    size = study_analysis_size(paths, drift_jobs(paths), settings)  # the drift step's one grid
    for arch in stored_archs(paths):
        for stage in (1, 2):
            for method in stored_methods(paths, arch, stage):
                maps, ids, _ = read_maps(paths, arch, stage, method)
                if size not in truth_by_size:
                    truth_by_size[size] = _ground_truth_at(with_truth, size, config.data.resize)
                truth = truth_by_size[size]
                keep = [i for i, image_id in enumerate(ids) if image_id in truth]
                if not keep:
                    continue
                found = [truth[ids[i]] for i in keep]
                gt = torch.stack([t.mask for t in found])
                prepared = AnalysisMaps(maps[keep], size)
                values = {
                    "pointing_game": loc.pointing_game(prepared, gt),
                    "energy_pointing_game": loc.energy_pointing_game(prepared, gt),
                    "mask_iou@0.2": loc.mask_iou(prepared, gt, k=0.2),
                    "pixel_auroc": loc.pixel_auroc(prepared, gt),
                    "cnr": loc.cnr(prepared, gt),
                }
                with_boxes = [j for j, t in enumerate(found) if t.boxes is not None]
                box_iou = torch.full((len(keep),), float("nan"), dtype=torch.float64)
                if with_boxes:
                    boxes = torch.stack([found[j].boxes for j in with_boxes])
                    box_iou[with_boxes] = loc.box_iou(
                        AnalysisMaps(maps[[keep[j] for j in with_boxes]], size), boxes, t=BOX_IOU_THRESHOLD
                    )
                values[BOX_METRIC] = box_iou
                values[BASELINE_METRIC] = gt.flatten(1).double().mean(dim=1)
                for j, i in enumerate(keep):
                    rows.append(
                        {
                            "id": ids[i],
                            "arch": arch,
                            "stage": stage,
                            "method": method,
                            "box_derived": found[j].box_derived,
                            **{name: float(v[j]) for name, v in values.items()},
                        }
                    )
    return pd.DataFrame(rows) if rows else None


def write_localization(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> None:
    """``localization.parquet`` and ``localization_summary.csv`` (mean, bootstrap CI per arch × stage × method
    × metric; ``box_derived``: how many of the images' masks were rasterised from boxes) when the data has
    lesion masks or boxes; nothing otherwise."""
    from evidrift import stats
    from evidrift.artifacts import write_csv_atomic, write_parquet_atomic

    table = localization_table(config, paths, settings)
    if table is None:
        return
    write_parquet_atomic(paths.root / "localization.parquet", table)
    parts = []
    metrics = [
        *LOCALIZATION_METRICS,
        *([BOX_METRIC] if table[BOX_METRIC].notna().any() else []),
        *([BASELINE_METRIC] if BASELINE_METRIC in table.columns else []),
    ]
    for stage, group in table.groupby("stage", sort=True):
        summary = stats.summarize(group, metrics, n_boot=settings.n_boot, ci=settings.ci, seed=settings.seed)
        summary.insert(2, "stage", int(stage))
        derived = group.groupby(["arch", "method"])["box_derived"].sum()
        pairs = zip(summary["arch"], summary["method"], strict=True)
        summary["box_derived"] = [int(derived[(arch, method)]) for arch, method in pairs]
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
    check_study(config)
    check_paths_inside(config, paths)
    redo: set[str] = set()
    for step in force:
        redo.update(force_steps(step))
    replacing = check_same_study(config, paths, replace=redo == set(STEPS))
    from evidrift.data.sources import data_fingerprint

    fingerprint = data_fingerprint(config.data)
    hashes = step_hashes(config, fingerprint)
    if ctx.is_main:
        if replacing:
            say(f"[all] {paths.root} held another study: replacing it (--force all)")
            _remove(paths.root / "models")
        paths.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.config, dump_yaml(config))
        for step in STEPS:
            if step in redo:
                clear_outputs(config, paths, step)
        previous = _previous_hash(paths, "data")
        if previous is not None and previous != hashes["data"]:
            say(f"[data] {_data_change(config, paths, fingerprint)}: redoing data and every step after it")
            for step in STEPS[1:]:
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
