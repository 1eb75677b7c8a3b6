"""`evidrift validate | phantoms | train | evaluate | explain | drift`: the drift study's steps one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from evidrift.cli.output import console, err_console, fail, training_logs
from evidrift.cli.study import _findings_lines


# --- validate (config)
def validate(
    study: Annotated[Path, typer.Argument(help="study.yaml to check")],
    data: Annotated[
        bool, typer.Option("--data", help="also read and check the data (the data step's checks, no writes)")
    ] = False,
) -> None:
    """Validate a study file and print the resolved config (every default filled in) with its hash.

    Checks everything that can be checked without training: keys and values, method and metric names,
    architectures (timm's registry), CAM layers (the model built on the meta device), weights files, data
    paths; with --data, every image, mask, box and split. What was checked is printed on stderr."""
    from evidrift.studies.config import dump_yaml, load_config
    from evidrift.studies.drift.study import check_study

    config = load_config(study)
    checked = check_study(config, str(study), data=data)
    console.print(dump_yaml(config), highlight=False, markup=False)
    for line in checked:
        err_console.print(f"checked: {line}", highlight=False, markup=False)


# --- phantoms (data)
def phantoms(
    out: Annotated[Path, typer.Argument(help="folder to write the set into (created if needed)")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of images, balanced over the classes")] = 500,
    size: Annotated[int, typer.Option("--size", min=32, max=2048, help="image side in pixels")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="seed; the same seed gives byte-identical files")] = 0,
    shortcut: Annotated[
        float,
        typer.Option("--shortcut", min=0.0, max=1.0, help="probability of the class's burnt-in marker"),
    ] = 0.0,
    source: Annotated[
        bool, typer.Option("--source", help="write the stage-0 source set (shapes/textures) instead")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="processes (default: one per core, up to 8)")
    ] = None,
    preview: Annotated[bool, typer.Option("--preview/--no-preview", help="also write preview.png")] = True,
) -> None:
    """Generate the phantom chest X-ray set: PNG images, lesion-mask PNGs, manifest.csv and preview.png."""
    from evidrift.data.phantom import generate_phantom_set, write_preview
    from evidrift.data.source_task import generate_source_set

    if source:
        manifest = generate_source_set(out, n, size, seed, workers=workers)
    else:
        manifest = generate_phantom_set(out, n, size, seed, shortcut_marker=shortcut, workers=workers)
    console.print(f"wrote {n} images and {manifest}", highlight=False)
    if preview:
        sheet = write_preview(manifest, out / "preview.png", per_class=6 if source else 4)
        console.print(f"preview: {sheet}", highlight=False)


def train(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    arch: Annotated[str | None, typer.Option("--arch", help="only this model (its name or arch key)")] = None,
    stage: Annotated[str, typer.Option("--stage", help="0, 1, 2 or all")] = "all",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")] = True,
) -> None:
    """Train the study's models: stage 0 (source pretraining), 1 (frozen backbone), 2 (fine-tuning).

    Resumable: rerun the same command after an interruption; finished stages are skipped.
    Multi-GPU: `torchrun --nproc-per-node N -m evidrift train study.yaml`."""
    from evidrift.classifier.training import STAGES, train_study
    from evidrift.core import distributed
    from evidrift.core.paths import RunPaths
    from evidrift.studies.config import load_config

    stages = STAGES if stage == "all" else (stage,)
    if any(s not in STAGES for s in stages):
        raise fail(f"--stage must be 0, 1, 2 or all, got {stage!r}")
    training_logs()
    config = load_config(study)
    ctx = distributed.setup(config.train.device)
    try:
        done = train_study(config, RunPaths.at(config.output.dir), arch, stages, progress, ctx=ctx)
    finally:
        distributed.cleanup(ctx)
    if ctx.is_main:
        for key, checkpoints in done.items():
            for number, path in checkpoints.items():
                console.print(f"{key} stage {number}: {path}", highlight=False)


def evaluate(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    arch: Annotated[str | None, typer.Option("--arch", help="only this model (its name or arch key)")] = None,
) -> None:
    """Classify the test split with the stage-1 and stage-2 checkpoints: eval/{arch}.parquet,
    eval/classification.csv (accuracy, macro-F1, macro AUROC with 95% bootstrap CIs) and
    eval/accuracy_change.csv (the paired stage 1 → stage 2 change, exact McNemar test)."""
    from evidrift.classifier.evaluate import evaluate_study
    from evidrift.core import distributed
    from evidrift.core.paths import RunPaths
    from evidrift.studies.config import load_config

    training_logs()
    config = load_config(study)
    ctx = distributed.setup(config.train.device)
    try:
        evaluate_study(config, RunPaths.at(config.output.dir), arch, ctx=ctx)
    finally:
        distributed.cleanup(ctx)


# --- explain (cam)
def explain(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    arch: Annotated[str | None, typer.Option("--arch", help="only this model (its name or arch key)")] = None,
    stage: Annotated[str, typer.Option("--stage", help="1, 2 or all")] = "all",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")] = True,
) -> None:
    """Compute the CAM maps of the selected test images (explain.samples) for each model and stage and write
    the maps store (maps/{arch}/stage{s}/{method}.part*.safetensors).

    Resumable: finished shards are skipped. Multi-GPU: `torchrun --nproc-per-node N -m evidrift explain
    study.yaml` (each rank explains its share of the shards)."""
    from evidrift.core import distributed
    from evidrift.core.paths import RunPaths
    from evidrift.studies.config import load_config
    from evidrift.studies.drift.explain import explain_run

    if stage not in ("1", "2", "all"):
        raise fail(f"--stage must be 1, 2 or all, got {stage!r}")
    stages = (1, 2) if stage == "all" else (int(stage),)
    config = load_config(study)
    keys = [m.key for m in config.models]
    if arch is not None and arch not in keys:
        raise fail(f"--arch {arch!r} is not a model of {study}; the models are {keys}")
    ctx = distributed.setup(config.train.device)
    try:
        paths = RunPaths.at(config.output.dir)
        summaries = [
            explain_run(config, paths, key, s, ctx=ctx, progress=progress)
            for key in ([arch] if arch else keys)
            for s in stages
        ]
        distributed.barrier(ctx)
    finally:
        distributed.cleanup(ctx)
    for s in summaries:
        console.print(
            f"{s.arch} stage {s.stage}: {s.n_images} images, {s.n_shards} shards "
            f"({s.written} written, {s.skipped} already done on this process)",
            highlight=False,
        )


# --- drift (metrics, stats)
def drift(
    run_dir: Annotated[Path, typer.Argument(help="run directory holding maps/ (from `evidrift explain`)")],
    metrics: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="drift metric (repeatable; default: config or all)"),
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="analysis side in pixels (default: config, else input size)")
    ] = None,
    n_boot: Annotated[
        int | None, typer.Option(help="bootstrap resamples (default: config stats.n_boot)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="bootstrap seed (default: config stats.seed)")] = None,
) -> None:
    """Drift between stage-1 and stage-2 maps: drift.parquet, summary.csv, rankings.csv, reversals.csv."""
    import dataclasses

    from rich.table import Table

    from evidrift.metrics.drift import resolve_metric
    from evidrift.studies.drift.analysis import run_drift, settings_from_config, summary_rows

    if not run_dir.is_dir():
        raise fail(f"run directory {run_dir} does not exist")
    settings = settings_from_config(run_dir)
    overrides: dict[str, Any] = {}
    if metrics:
        overrides["metrics"] = [resolve_metric(m)[0] for m in metrics]
    if size is not None:
        overrides["size"] = size
    if n_boot is not None:
        overrides["n_boot"] = n_boot
    if seed is not None:
        overrides["seed"] = seed
    outputs = run_drift(run_dir, dataclasses.replace(settings, **overrides))
    header, rows = summary_rows(outputs.summary)
    table = Table(title=f"explanation drift, stage 1 → stage 2 (mean [95% CI]) — {run_dir}")
    for column in header:
        table.add_column(column, justify="left" if column in ("arch", "layer", "method") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{len(outputs.drift)} pairs, {int(outputs.drift['degenerate'].sum())} degenerate; "
        f"tables in {run_dir}",
        highlight=False,
    )
    for line in _findings_lines(run_dir):
        console.print(line, highlight=False, markup=False)
