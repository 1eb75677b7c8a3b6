"""The ``evidrift`` command line (typer). Thin: parses arguments, calls the library, prints.

Each command lives in its own marked section below; commands import their library modules lazily so that
``evidrift --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from evidrift.config import StudyConfig

app = typer.Typer(
    name="evidrift",
    help="Did fine-tuning change the visual evidence an image classifier relies on? "
    "Explanation drift between checkpoints, offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a user-facing error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from evidrift import __version__

        console.print(__version__)
        raise typer.Exit(0)


# --- validate (config)
@app.command()
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
    from evidrift.config import ConfigError, dump_yaml, load_config
    from evidrift.study import check_study

    try:
        config = load_config(study)
        checked = check_study(config, str(study), data=data)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    console.print(dump_yaml(config), highlight=False, markup=False)
    for line in checked:
        err_console.print(f"checked: {line}", highlight=False, markup=False)


# --- phantoms (data)
@app.command()
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


# --- train / evaluate (models, train)
def _training_logs() -> None:
    """One INFO line per epoch on stderr unless the application configured logging itself."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


@app.command()
def train(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    arch: Annotated[str | None, typer.Option("--arch", help="only this model (its name or arch key)")] = None,
    stage: Annotated[str, typer.Option("--stage", help="0, 1, 2 or all")] = "all",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")] = True,
) -> None:
    """Train the study's models: stage 0 (source pretraining), 1 (frozen backbone), 2 (fine-tuning).

    Resumable: rerun the same command after an interruption; finished stages are skipped.
    Multi-GPU: `torchrun --nproc-per-node N -m evidrift train study.yaml`."""
    from evidrift import distributed
    from evidrift.artifacts import RunPaths
    from evidrift.config import ConfigError, load_config
    from evidrift.train import STAGES, TrainingDivergedError, train_study

    stages = STAGES if stage == "all" else (stage,)
    if any(s not in STAGES for s in stages):
        raise fail(f"--stage must be 0, 1, 2 or all, got {stage!r}")
    _training_logs()
    try:
        config = load_config(study)
        ctx = distributed.setup(config.train.device)
        try:
            done = train_study(config, RunPaths.at(config.output.dir), arch, stages, progress, ctx=ctx)
        finally:
            distributed.cleanup(ctx)
    except (ConfigError, ValueError, FileNotFoundError, TrainingDivergedError) as exc:
        raise fail(str(exc)) from None
    if ctx.is_main:
        for key, checkpoints in done.items():
            for number, path in checkpoints.items():
                console.print(f"{key} stage {number}: {path}", highlight=False)


@app.command()
def evaluate(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    arch: Annotated[str | None, typer.Option("--arch", help="only this model (its name or arch key)")] = None,
) -> None:
    """Classify the test split with the stage-1 and stage-2 checkpoints: eval/{arch}.parquet,
    eval/classification.csv (accuracy, macro-F1, macro AUROC with 95% bootstrap CIs) and
    eval/accuracy_change.csv (the paired stage 1 → stage 2 change, exact McNemar test)."""
    from evidrift import distributed
    from evidrift.artifacts import RunPaths
    from evidrift.config import ConfigError, load_config
    from evidrift.train import evaluate_study

    _training_logs()
    try:
        config = load_config(study)
        ctx = distributed.setup(config.train.device)
        try:
            evaluate_study(config, RunPaths.at(config.output.dir), arch, ctx=ctx)
        finally:
            distributed.cleanup(ctx)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None


# --- explain (cam)
@app.command()
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
    from evidrift import distributed
    from evidrift.artifacts import RunPaths
    from evidrift.config import ConfigError, load_config
    from evidrift.explain import explain_run

    if stage not in ("1", "2", "all"):
        raise fail(f"--stage must be 1, 2 or all, got {stage!r}")
    stages = (1, 2) if stage == "all" else (int(stage),)
    try:
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
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    for s in summaries:
        console.print(
            f"{s.arch} stage {s.stage}: {s.n_images} images, {s.n_shards} shards "
            f"({s.written} written, {s.skipped} already done on this process)",
            highlight=False,
        )


# --- drift (metrics, stats)
@app.command()
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

    from evidrift.analysis import run_drift, settings_from_config, summary_rows
    from evidrift.config import ConfigError
    from evidrift.metrics.drift import resolve_metric

    if not run_dir.is_dir():
        raise fail(f"run directory {run_dir} does not exist")
    try:
        settings = settings_from_config(run_dir)
        overrides: dict[str, object] = {}
        if metrics:
            overrides["metrics"] = [resolve_metric(m)[0] for m in metrics]
        if size is not None:
            overrides["size"] = size
        if n_boot is not None:
            overrides["n_boot"] = n_boot
        if seed is not None:
            overrides["seed"] = seed
        outputs = run_drift(run_dir, dataclasses.replace(settings, **overrides))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
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


# --- run / demo / compare / report (study)
def _print_drift_table(run_dir: Path, title: str) -> None:
    """The drift summary (arch × method, headline metrics, mean [95% CI]) as a rich table."""
    import pandas as pd
    from rich.table import Table

    from evidrift.analysis import summary_rows

    header, rows = summary_rows(pd.read_csv(run_dir / "summary.csv"))
    table = Table(title=title)
    for column in header:
        table.add_column(
            column, justify="left" if column in ("arch", "layer", "method") else "right", overflow="fold"
        )
    for row in rows:
        table.add_row(*row)
    out = console if console.is_terminal else Console(width=180)  # a log file gets the whole table
    out.print(table)
    for line in _findings_lines(run_dir):
        out.print(line, highlight=False, markup=False)


def _findings_lines(run_dir: Path) -> list[str]:
    """The reversal count beside its permutation null, and the equivalence classes per layer."""
    import pandas as pd

    from evidrift.reversals import summary_line

    lines = []
    reversal_summary = run_dir / "reversals_summary.csv"
    if reversal_summary.is_file():
        lines.append(summary_line(pd.read_csv(reversal_summary)))
    equivalence = run_dir / "equivalence.csv"
    if equivalence.is_file() and equivalence.stat().st_size > 1:
        from evidrift.report.html import equivalence_sentences

        lines += equivalence_sentences(pd.read_csv(equivalence))
    return lines


def _run_and_report(
    config: StudyConfig, out: Path | None, force: list[str], until: str | None, title: str
) -> None:
    from evidrift import distributed
    from evidrift.artifacts import RunPaths
    from evidrift.study import run_study

    paths = RunPaths.at(out if out is not None else config.output.dir)
    ctx = distributed.setup(config.train.device)
    try:
        run_study(
            config,
            paths,
            force=force,
            until=until,
            ctx=ctx,
            echo=lambda line: console.print(line, highlight=False, markup=False),
        )
    finally:
        distributed.cleanup(ctx)
    if ctx.is_main and paths.summary.is_file() and (until is None or until in ("drift", "report")):
        _print_drift_table(paths.root, title)
    if ctx.is_main and paths.report.is_file() and until in (None, "report"):
        console.print(f"report: {paths.report.resolve()}", highlight=False)


_STUDY_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


@app.command()
def run(
    study: Annotated[Path, typer.Argument(help="study.yaml")],
    out: Annotated[
        Path | None, typer.Option("--out", help="run directory (default: the study's output.dir)")
    ] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force",
            help="redo this step and every step after it (repeatable): data, stage0, "
            "stage1, stage2, evaluate, explain, drift, report; all: every step, and replace another study "
            "held by the run directory",
        ),
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="stop after this step")] = None,
) -> None:
    """Run a whole study: data → stage 0 → stage 1 → stage 2 → evaluate → explain → drift → report.

    Resumable: finished steps (same config hash) are skipped, an interrupted one resumes; editing a section
    redoes only the steps that depend on it.
    Multi-GPU: `torchrun --nproc-per-node N -m evidrift run study.yaml`."""
    from evidrift.config import ConfigError, load_config

    _training_logs()
    try:
        config = load_config(study)
        _run_and_report(
            config, out, force or [], until, "explanation drift, stage 1 → stage 2 (mean [95% CI])"
        )
    except (ConfigError, *_STUDY_ERRORS) as exc:
        raise fail(str(exc)) from None


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="run directory (default runs/demo)")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="one small architecture on tiny data (< 2 min)")
    ] = False,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="redo this step and what follows")
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="the paper's sizes (224/299 px, thousands of phantoms), for a GPU; on CPU it "
            "prints its estimated time and asks before starting",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="--full on CPU: start without asking")] = False,
) -> None:
    """The whole study on the embedded phantom chest X-rays, offline: densenet201, resnet50v2 and inceptionv3
    pretrained on a synthetic source task (stage 0), transfer (stage 1) and fine-tuning (stage 2), four CAM
    methods, every drift metric, statistics and the HTML report. Prints the drift table and the report
    path."""
    from evidrift.presets import demo_config

    _training_logs()
    try:
        config = demo_config(quick=quick, out=out, full=full)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if full and not _confirm_full_on_cpu(config, yes):
        console.print("demo --full not started.", highlight=False)
        return
    try:
        _run_and_report(
            config, None, force or [], None, "explanation drift, stage 1 → stage 2 (mean [95% CI])"
        )
    except _STUDY_ERRORS as exc:
        raise fail(str(exc)) from None


def _confirm_full_on_cpu(config: StudyConfig, yes: bool) -> bool:
    """On a CPU device: print the estimated time of the study, then ask (``yes``: do not ask; no terminal
    to answer: not started). On a GPU: True without a word."""
    import torch

    from evidrift import distributed
    from evidrift.budget import estimate_cpu_seconds, format_duration
    from evidrift.precision import resolve_precision

    device = distributed.resolve_device(config.train.device)
    if device.type != "cpu":
        return True
    threads = torch.get_num_threads()
    bf16 = resolve_precision(config.train.precision, device).bf16
    seconds = estimate_cpu_seconds(config, threads, bf16)
    console.print(
        f"demo --full on CPU ({threads} threads, {'bf16' if bf16 else 'fp32'} training): estimated "
        f"{format_duration(seconds)} of training and explaining (a GPU takes minutes).",
        highlight=False,
    )
    if yes:
        return True
    try:
        return bool(typer.confirm("Start it?", default=False))
    except typer.Abort:
        return False


def _thresholds(items: list[str] | None, option: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in items or []:
        name, sep, number = item.partition("=")
        if not sep or not name.strip():
            raise fail(f"{option} {item!r}: write METRIC=VALUE, e.g. {option} topk_iou@0.2=0.5")
        try:
            values[name.strip()] = float(number)
        except ValueError:
            raise fail(
                f"{option} {item!r}: the value {number.strip()!r} is not a number; write METRIC=VALUE with a "
                f"number, e.g. {option} {name.strip()}=0.5"
            ) from None
    return values


def _print_rows(title: str, header: list[str], rows: list[list[str]], left: int = 1) -> None:
    """A rich table (the first ``left`` columns left-aligned); whole in a log file."""
    from rich.table import Table

    table = Table(title=title)
    for n, column in enumerate(header):
        table.add_column(column, justify="left" if n < left else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    (console if console.is_terminal else Console(width=160)).print(table)


def _print_where(where: dict[str, Any], n_images: int) -> None:
    """Where the evidence moved: per class (selection metric), per zone, most-drifted images."""
    from evidrift.compare_where import class_rows, drifted_rows, zone_rows

    drifted = where.get("most_drifted")
    if drifted is not None and len(drifted):
        metric = str(drifted["metric"].iloc[0])
        _print_rows(f"drift per class ({metric}, mean)", *class_rows(where["by_class"], metric), left=2)
    if where.get("by_zone") is not None and len(where["by_zone"]):
        _print_rows("where the evidence sits: zone mass A → B (change)", *zone_rows(where["by_zone"]))
    if drifted is not None and len(drifted):
        _print_rows(f"most-drifted images (of {n_images}; overlays in the report)", *drifted_rows(drifted), 4)


@app.command()
def compare(
    a: Annotated[
        Path, typer.Argument(help="checkpoint A (.safetensors with its .json sidecar), the reference")
    ],
    b: Annotated[Path, typer.Argument(help="checkpoint B, the candidate (same architecture and classes)")],
    data: Annotated[Path, typer.Option("--data", help="images: a folder of class folders or a CSV manifest")],
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default runs/compare)")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods", help="CAM methods (repeatable; default gradcam++, layercam, gradcam, xgradcam)"
        ),
    ] = None,
    fail_below: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-below", help="METRIC=VALUE: exit 1 when the mean of METRIC is below VALUE (repeatable)"
        ),
    ] = None,
    fail_above: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-above", help="METRIC=VALUE: exit 1 when the mean of METRIC is above VALUE (repeatable)"
        ),
    ] = None,
    fail_beyond_band: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-beyond-band",
            help="METRIC (every method) or METRIC@METHOD: exit 1 when A → B drifts beyond the noise band "
            "(one-sided paired Wilcoxon, Holm over every band gate; repeatable)",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="A2: a second checkpoint of A's recipe (another seed); the band"),
    ] = None,
    band: Annotated[
        str | None,
        typer.Option("--band", help="baseline (with --baseline) or input-noise (A alone; a weaker floor)"),
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="level of the band gates' tests")] = 0.05,
    band_tolerance: Annotated[
        float,
        typer.Option("--band-tolerance", help="T: B may drift up to (1 + T) × the band before failing"),
    ] = 1.0,
    noise_sigma: Annotated[
        float, typer.Option("--noise-sigma", help="input-noise band: Gaussian noise std (intensity, 0-1)")
    ] = 0.02,
    noise_shift: Annotated[
        int, typer.Option("--noise-shift", help="input-noise band: max shift in pixels (uniform ±)")
    ] = 2,
    noise_seed: Annotated[int, typer.Option("--noise-seed", help="input-noise band: seed")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write every verdict as JSON to this file")
    ] = None,
    junit_out: Annotated[
        Path | None, typer.Option("--junit", help="write the verdicts as JUnit XML (one testcase per gate)")
    ] = None,
    most_drifted: Annotated[
        int, typer.Option("--most-drifted", min=0, help="most-drifted images listed per method")
    ] = 5,
    split: Annotated[
        str,
        typer.Option("--split", help="which images of a CSV with a split column: all, train, val or test"),
    ] = "all",
    max_images: Annotated[
        int | None, typer.Option("--max-images", min=1, help="explain at most this many")
    ] = None,
) -> None:
    """Explanation drift between two checkpoints of one model on the same images, as a CI gate.

    Both are explained with the same methods on every usable image of --data (target: the label), then
    compared with every drift metric; writes drift.parquet, summary.csv and report.html into --out. With
    --fail-below/--fail-above, exits 1 naming each metric, threshold and value that fails (under any
    method). With --baseline A2 (or --band input-noise), --fail-beyond-band METRIC fails when A → B drifts
    further than the noise band. Exit codes: 0 every gate passed, 1 a gate failed, 2 bad input."""
    from evidrift.compare import CompareError, compare_checkpoints
    from evidrift.compare_band import Perturbation
    from evidrift.compare_gates import GateSpec
    from evidrift.compare_verdicts import exit_code, verdict_rows, write_verdicts

    below = _thresholds(fail_below, "--fail-below")
    above = _thresholds(fail_above, "--fail-above")
    spec = GateSpec(below, above, list(fail_beyond_band or []), alpha, band_tolerance)
    for option, path in (("--json", json_out), ("--junit", junit_out)):
        if path is not None and path.is_dir():
            raise fail(f"{option} {path} is a directory; pass the path of the file to write")
    try:
        result = compare_checkpoints(
            a,
            b,
            data,
            out or Path("runs/compare"),
            methods=methods,
            split=split,
            max_images=max_images,
            gates=[*below, *above],
            baseline=baseline,
            band=band,
            perturbation=Perturbation(noise_sigma, noise_shift, noise_seed),
            gate_spec=spec,
            most_drifted=most_drifted,
            progress=True,
        )
        context = {**result.context, "seconds": round(result.seconds, 1)}
        write_verdicts(result.verdicts, context, json_out, junit_out, result.seconds)
    except (CompareError, *_STUDY_ERRORS) as exc:
        raise fail(str(exc)) from None
    _print_drift_table(
        result.paths.root, f"explanation drift, A → B on {result.n_images} images (mean [95% CI])"
    )
    _print_where(result.where, result.n_images)
    agreement = (result.context.get("band") or {}).get("prediction_agreement")
    if agreement is not None and agreement < 0.9:
        err_console.print(
            f"[bold yellow]warning:[/] the input-noise perturbation changed A's predicted class on "
            f"{1 - agreement:.0%} of the images: it is not irrelevant to this model, so the band is no "
            "floor; lower --noise-sigma/--noise-shift, or pass --baseline A2",
            highlight=False,
            soft_wrap=True,
        )
    if result.verdicts:
        band_note = f", band: {result.band_kind}" if result.band_kind else ""
        _print_rows(f"gates (α = {alpha:g}{band_note})", *verdict_rows(result.verdicts), left=3)
    console.print(f"report: {result.paths.report.resolve()}", highlight=False)
    for path in (json_out, junit_out):
        if path is not None:
            console.print(f"verdicts: {path.resolve()}", highlight=False)
    failures = [v.message for v in result.verdicts if not v.passed]
    for message in failures:
        err_console.print(f"[bold red]gate failed:[/] {message}", highlight=False, soft_wrap=True)
    if exit_code(result.verdicts):
        raise typer.Exit(1)
    if result.verdicts:
        console.print(
            f"all {len(below) + len(above) + len(spec.band)} gate(s) passed "
            f"({len(result.verdicts)} checks: gate × method)",
            highlight=False,
        )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (with config.yaml, drift.parquet, ...)")],
) -> None:
    """(Re)build run_dir/report.html and run_dir/figures/*.png from the run's artifacts."""
    from evidrift.report import build_report

    if not run_dir.is_dir():
        raise fail(f"{run_dir} is not a directory; pass the run directory (the study's output.dir)")
    try:
        path = build_report(run_dir)
    except _STUDY_ERRORS as exc:
        raise fail(str(exc)) from None
    console.print(f"report: {path.resolve()}", highlight=False)


# --- probe / sanity (probing)
# Options shared by `probe` and `sanity`.
ProbingStudy = Annotated[Path | None, typer.Argument(help="study.yaml (omit with --quick)")]
ProbingQuick = Annotated[
    bool, typer.Option("--quick", help="smoke run: the quick demo preset (phantoms, resnet18 at 64 px)")
]
ProbingOut = Annotated[
    Path | None, typer.Option("--out", help="run directory (default: output.dir; --quick: runs/probe-quick)")
]
ProbingProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")]


def _ci_text(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


@app.command()
def probe(
    study: ProbingStudy = None,
    quick: ProbingQuick = False,
    out: ProbingOut = None,
    progress: ProbingProgress = True,
) -> None:
    """Head probing study ("How to Probe"): heads {ce, bce} x {linear, linear_nobias, per-position mlp2/mlp3,
    B-cos bcos1-3} on one frozen backbone, each explained (signed Grad-CAM at the reference layer,
    Input x Gradient, Integrated Gradients, LRP, B-cos) and scored (accuracy, GridPG on full-resolution
    grids, pointing games against the lesion masks, entropy, Gini).

    Writes probe.parquet, probe_summary.csv, probe_pairs.csv, probe_pool.csv, probe_vs_baseline.csv and
    figures/probe_*.png into the run directory; `evidrift report` includes them. Trained heads are reused."""
    from rich.table import Table

    from evidrift.artifacts import RunPaths
    from evidrift.config import ConfigError
    from evidrift.probe import probing_config, run_probe
    from evidrift.probe_stats import best_variants
    from evidrift.report.probe_section import write_probe_figures

    _training_logs()
    try:
        config = probing_config(study, quick, out)
        paths = RunPaths.at(config.output.dir)
        summary, pairs = run_probe(config, paths, progress)
        figures = write_probe_figures(summary, paths.figures_dir)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    accuracy = summary[summary["metric"] == "correct"]
    table = Table(title="test accuracy per head variant (95% bootstrap CI)")
    for column in ("arch", "variant", "accuracy"):
        table.add_column(column)
    for _, row in accuracy.iterrows():
        table.add_row(
            str(row["arch"]), str(row["variant"]), _ci_text(row["mean"], row["ci_low"], row["ci_high"])
        )
    console.print(table)
    best = best_variants(summary)
    for arch, part in best.groupby("arch", sort=False):
        table = Table(title=f"{arch}: best-localizing variant (mean [95% CI]; runner-up mean)")
        for column in ("metric", "method", "best", "mean [CI]", "runner-up"):
            table.add_column(column)
        for _, row in part.iterrows():
            runner = f"{row['runner_up']} {row['runner_up_mean']:.3f}" if row["runner_up"] else "-"
            ci = _ci_text(row["mean"], row["ci_low"], row["ci_high"])
            table.add_row(str(row["metric"]), str(row["method"]), str(row["variant"]), ci, runner)
        console.print(table)
    significant = int(pairs["significant"].sum()) if len(pairs) else 0
    console.print(f"paired Wilcoxon tests between variants (Holm): {significant} of {len(pairs)} significant")
    console.print(
        f"tables: {paths.root / 'probe_summary.csv'}, {paths.root / 'probe_pairs.csv'}", highlight=False
    )
    console.print(f"figures: {', '.join(str(f) for f in figures)}", highlight=False)


@app.command()
def sanity(
    study: ProbingStudy = None,
    quick: ProbingQuick = False,
    out: ProbingOut = None,
    progress: ProbingProgress = True,
) -> None:
    """Sanity checks: cascading and independent parameter randomization (similarity of the maps to the
    trained model's at every step), and the metrics' self-test (identical checkpoints give zero drift, a
    randomized model a large one). Explains the run's stage-2 checkpoint, else stage 1 (trained if missing).

    Writes sanity.parquet, sanity_summary.csv, sanity_selftest.json and figures/sanity_*.png; exits 1 when
    the metrics' self-test fails (a method that survives randomization is flagged, not an error)."""
    from rich.table import Table

    from evidrift.artifacts import RunPaths
    from evidrift.config import ConfigError
    from evidrift.probe import probing_config
    from evidrift.report.probe_section import write_sanity_figures
    from evidrift.sanity import run_sanity

    _training_logs()
    try:
        config = probing_config(study, quick, out)
        paths = RunPaths.at(config.output.dir)
        summary, checks = run_sanity(config, paths, progress)
        figures = write_sanity_figures(summary, paths.figures_dir)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    short = {
        "spearman_abs": "rho",
        "spearman_signed": "rho signed",
        "ssim": "ssim",
        "topk_iou@0.2": "iou@0.2",
        "hog_spearman": "rho HOG",
    }
    for mode, part in summary.groupby("mode", sort=True):
        last = part.loc[part.groupby(["arch", "method", "metric"])["step"].idxmax()]
        wide = last.pivot_table(index=["arch", "method"], columns="metric", values="mean", sort=False)
        wide = wide[[m for m in short if m in wide.columns]]
        table = Table(title=f"{mode}: similarity to the original maps after the last step (mean)")
        for column in ("arch", "method", *(short[m] for m in wide.columns)):
            table.add_column(column)
        for (arch, method), values in wide.iterrows():
            table.add_row(str(arch), str(method), *(f"{v:.3f}" for v in values))
        console.print(table)
    console.print(f"CIs and every step: {paths.root / 'sanity_summary.csv'}", highlight=False)
    failed = [c for c in checks if not c["passed"] and c["kind"] == "metrics"]
    flagged = [c for c in checks if not c["passed"] and c["kind"] == "method"]
    for check in failed:
        where = f"{check['arch']} {check['method']} {check['check']}: {check['metric']}"
        err_console.print(
            f"self-test FAILED: {where} = {check['value']:.4g}, expected {check['expected']}", highlight=False
        )
    for check in flagged:
        err_console.print(
            f"sanity flag: {check['arch']} {check['method']} maps barely change when every block is "
            f"randomized ({check['metric']} = {check['value']:.3f}, expected {check['expected']}): they may "
            "not reflect what the model learned",
            highlight=False,
        )
    metric_checks = [c for c in checks if c["kind"] == "metrics"]
    console.print(
        f"metric self-test: {len(metric_checks) - len(failed)} of {len(metric_checks)} checks passed; "
        f"randomized-model checks flagged {len(flagged)}",
        highlight=False,
    )
    console.print(f"figures: {', '.join(str(f) for f in figures)}", highlight=False)
    if failed:
        raise typer.Exit(1)
