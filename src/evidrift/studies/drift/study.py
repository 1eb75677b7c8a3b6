"""The drift study (ARCHITECTURE §3): data → stage 0 → stage 1 → stage 2 → evaluate → explain → drift →
report, declared as ``DRIFT_STEPS`` and run by the generic runner (``core.steps``: hashes, markers, resume,
``--force``, ``--until``, torchrun barriers).

Each step's hash covers the config keys it uses and the hashes of the steps it reads (a DAG, not a chain:
the classification CIs depend on ``stats`` but the maps do not). Training, explaining and the data step are
resumable themselves (epoch checkpoints, shards), so a step killed half-way resumes where it stopped. The
data step's hash includes a fingerprint of the files it read (``evidrift.data.sources.data_fingerprint``):
when it changed, the run says what changed (files added, removed, modified) and redoes the data step and
every step after it.

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

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evidrift.core import distributed, steps
from evidrift.core.config import ConfigError
from evidrift.core.distributed import Context
from evidrift.core.errors import EvidriftError, UsageError
from evidrift.core.io import write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Printer, Step, StepResult
from evidrift.studies.config import StudyConfig, dump_yaml, resolved_dict
from evidrift.studies.drift.localization import write_localization

if TYPE_CHECKING:
    from evidrift.studies.drift.analysis import DriftSettings

logger = logging.getLogger("evidrift.studies.drift.study")


class StudyError(EvidriftError, RuntimeError):
    """A study that cannot go on; the message names the step, the file and what to do."""


# --- what each step depends on and writes ----------------------------------------------------------------
def _stage_hashes(config: StudyConfig, stage: str) -> dict[str, str]:
    from evidrift.classifier.training import stage_hash, uses_stage0

    return {m.key: stage_hash(config, m, stage) for m in config.models if stage != "0" or uses_stage0(m)}


def _data_inputs(config: StudyConfig) -> dict[str, Any]:
    """The digest of the files the data step reads (``data_fingerprint``), besides the ``data`` section."""
    from evidrift.data.sources import data_fingerprint, fingerprint_digest

    return {"files": fingerprint_digest(data_fingerprint(config.data))}


def _stage_outputs(stage: str) -> Callable[[StudyConfig, RunPaths], list[Path]]:
    def outputs(config: StudyConfig, paths: RunPaths) -> list[Path]:
        return [f for m in config.models for f in sorted(paths.model_dir(m.key).glob(f"stage{stage}.*"))]

    return outputs


def _drift_outputs(config: StudyConfig, paths: RunPaths) -> list[Path]:
    return [
        paths.drift,
        paths.summary,
        paths.rankings,
        paths.reversals,
        paths.tests,
        paths.kendall,
        *sorted(paths.root.glob("localization*")),
    ]


def check_names(config: StudyConfig) -> None:
    """Fail before any work when an explain method or a drift metric name is unknown (ValueError naming
    the key, the name and the known names), rather than after hours of training."""
    from evidrift.cam import resolve_method
    from evidrift.metrics.drift import resolve_metric

    for method in config.explain.methods:
        try:
            resolve_method(method)
        except ValueError as exc:
            raise UsageError(f"explain.methods: {exc}") from None
    if config.drift.metrics != "all":
        for metric in config.drift.metrics:
            try:
                resolve_metric(metric)
            except ValueError as exc:
                raise UsageError(f"drift.metrics: {exc}") from None


def check_study(config: StudyConfig, source: str = "the study", data: bool = False) -> list[str]:
    """Check everything that can be checked without training; returns one line per thing checked.

    Method and metric names (``check_names``); per model its architecture (timm's registry), its CAM layers
    (the model built on the meta device) and a local weights file (read, keys and shapes matched); the data
    path; with ``data``, the data itself (the data step's checks, nothing written). Raises ``ConfigError``
    naming ``source``, the key, the value and the fix."""
    from evidrift.classifier import models

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
    from evidrift.classifier.training import image_size_for, stage_config

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
        from evidrift.classifier.training import train_study

        train_study(config, paths, stages=(stage,), ctx=ctx)

    return run


def run_evaluate(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    from evidrift.classifier.evaluate import evaluate_study

    evaluate_study(config, paths, ctx=ctx)


def run_explain(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    """Maps of both stages of every model; StudyError when no model has a single image to explain."""
    from evidrift.studies.drift.explain import explain_run

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
    """The drift step's settings (``studies.drift.analysis.DriftSettings``) from its config sections."""
    from evidrift.studies.drift.analysis import DriftSettings

    return DriftSettings.from_config(config)


def run_drift(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    """Drift table and statistics (``studies.drift.analysis``), then localization against the masks if any."""
    if not ctx.is_main:
        return
    from evidrift.studies.drift.analysis import run_drift as analyze

    settings = drift_settings(config)
    analyze(paths.root, settings)
    write_localization(config, paths, settings)


def run_report(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
    if ctx.is_main and config.report.enabled:
        from evidrift.studies.drift.report import build_report

        build_report(paths.root, config)


def _report_inputs(config: StudyConfig) -> dict[str, Any]:
    """What the report shows besides the tables it reads: the models' names, the seed, the data's resize."""
    return {"models": [m.key for m in config.models], "seed": config.seed, "resize": config.data.resize}


#: The drift study, in order. Each step's hash covers the config keys it uses and the steps it reads: a new
#: ``stats.n_boot`` reruns evaluate, drift and report and never explain; a new explain method reruns explain,
#: drift and report and never training; the probe and sanity sections rerun none of them.
DRIFT_STEPS: tuple[Step[StudyConfig], ...] = (
    Step("data", run_data, config=("data",), inputs=_data_inputs, outputs=lambda c, p: [p.data_dir]),
    Step(
        "stage0",
        _run_stage("0"),
        reads=("data",),
        inputs=lambda c: {"stages": _stage_hashes(c, "0")},
        outputs=_stage_outputs("0"),
    ),
    Step(
        "stage1",
        _run_stage("1"),
        reads=("stage0",),
        inputs=lambda c: {"stages": _stage_hashes(c, "1")},
        outputs=_stage_outputs("1"),
    ),
    Step(
        "stage2",
        _run_stage("2"),
        reads=("stage1",),
        inputs=lambda c: {"stages": _stage_hashes(c, "2")},
        outputs=_stage_outputs("2"),
    ),
    Step(
        "evaluate",
        run_evaluate,
        reads=("stage2",),
        config=("stats", "train.stage2.batch_size"),
        inputs=lambda c: {"models": [m.key for m in c.models]},
        outputs=lambda c, p: [p.eval_dir],
    ),
    Step(
        "explain",
        run_explain,
        reads=("stage2",),
        config=("explain",),
        inputs=lambda c: {
            "cam_layers": {m.key: m.cam_layers for m in c.models},
            "stages": {s: _stage_hashes(c, s) for s in ("1", "2")},
        },
        outputs=lambda c, p: [p.maps_root],
        clear_on_change=True,
    ),
    Step("drift", run_drift, reads=("explain",), config=("drift", "stats"), outputs=_drift_outputs),
    Step(
        "report",
        run_report,
        reads=("drift", "evaluate"),
        config=("report",),
        inputs=_report_inputs,
        outputs=lambda c, p: [p.report, p.figures_dir],
    ),
)
#: The step names, in order.
STEPS: tuple[str, ...] = tuple(step.name for step in DRIFT_STEPS)
Runner = Callable[[StudyConfig, RunPaths, Context], None]


def step_hashes(config: StudyConfig) -> dict[str, str]:
    """The hash of every drift step (``core.steps.step_hashes`` of ``DRIFT_STEPS``)."""
    return steps.step_hashes(DRIFT_STEPS, config)


def force_steps(step: str) -> list[str]:
    """``step`` and every step after it (what ``--force STEP`` redoes); ``all``: every step."""
    return [s.name for s in steps.steps_from(DRIFT_STEPS, step)]


def run_study(
    config: StudyConfig,
    paths: RunPaths | None = None,
    force: Iterable[str] = (),
    until: str | None = None,
    ctx: Context | None = None,
    echo: Printer | None = None,
    runners: Mapping[str, Runner] | None = None,
) -> list[StepResult]:
    """Check the study, then run ``DRIFT_STEPS`` on the generic runner; returns what each step did.

    ``paths``: the run directory (default ``config.output.dir``); ``force``: steps to redo together with
    every step after them; ``until``: stop after this step; ``echo``: one line per step (e.g. ``print``);
    ``runners``: replacements for the step functions (tests).
    """
    paths = paths or RunPaths.at(config.output.dir)
    ctx = ctx or distributed.setup(config.train.device)
    swap = runners or {}
    declared = tuple(replace(s, run=swap[s.name]) if s.name in swap else s for s in DRIFT_STEPS)
    say = echo if (echo is not None and ctx.is_main) else (lambda _line: None)
    steps.check_until(declared, until)
    redo = {s.name for name in force for s in steps.steps_from(declared, name)}
    check_study(config)
    check_paths_inside(config, paths)
    replacing = check_same_study(config, paths, replace=redo == set(STEPS))
    from evidrift.data.sources import data_fingerprint

    fingerprint = data_fingerprint(config.data)
    hashes = steps.step_hashes(declared, config)
    if ctx.is_main:
        if replacing:
            say(f"[all] {paths.root} held another study: replacing it (--force all)")
            steps.remove(paths.models_dir)
        paths.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(paths.config, dump_yaml(config))
        previous = steps.previous_hash(paths, "data")
        if previous is not None and previous != hashes["data"] and "data" not in redo:
            say(f"[data] {_data_change(config, paths, fingerprint)}: redoing data and every step after it")
            for step in declared:
                steps.clear_step(step, config, paths)
    distributed.barrier(ctx)
    return steps.run_steps(declared, config, paths, ctx, force=force, until=until, echo=echo, hashes=hashes)
