"""`evidrift run | demo | report`: a whole study on the step runner, the offline demo, and the report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evidrift.core.paths import RunPaths

if TYPE_CHECKING:
    from evidrift.studies.config import StudyConfig

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from evidrift.cli.output import console, fail, training_logs


# --- run / demo / compare / report (study)
def _print_drift_table(run_dir: Path, title: str) -> None:
    """The drift summary (arch × method, headline metrics, mean [95% CI]) as a rich table."""
    import pandas as pd
    from rich.table import Table

    from evidrift.studies.drift.analysis import summary_rows

    header, rows = summary_rows(pd.read_csv(RunPaths.at(run_dir).summary))
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
    reversal_summary = RunPaths.at(run_dir).reversals_summary
    if reversal_summary.is_file():
        lines.append(summary_line(pd.read_csv(reversal_summary)))
    equivalence = RunPaths.at(run_dir).equivalence
    if equivalence.is_file() and equivalence.stat().st_size > 1:
        from evidrift.studies.drift.report import equivalence_sentences

        lines += equivalence_sentences(pd.read_csv(equivalence))
    return lines


def _run_and_report(
    config: StudyConfig, out: Path | None, force: list[str], until: str | None, title: str
) -> None:
    from evidrift.core import distributed
    from evidrift.core.paths import RunPaths
    from evidrift.studies.drift.study import run_study

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
    from evidrift.studies.config import load_config

    training_logs()
    config = load_config(study)
    _run_and_report(config, out, force or [], until, "explanation drift, stage 1 → stage 2 (mean [95% CI])")


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
    from evidrift.studies.drift.presets import demo_config

    training_logs()
    config = demo_config(quick=quick, out=out, full=full)
    if full and not _confirm_full_on_cpu(config, yes):
        console.print("demo --full not started.", highlight=False)
        return
    _run_and_report(config, None, force or [], None, "explanation drift, stage 1 → stage 2 (mean [95% CI])")


def _confirm_full_on_cpu(config: StudyConfig, yes: bool) -> bool:
    """On a CPU device: print the estimated time of the study, then ask (``yes``: do not ask; no terminal
    to answer: not started). On a GPU: True without a word."""
    import torch

    from evidrift.classifier.precision import resolve_precision
    from evidrift.core import distributed
    from evidrift.studies.drift.budget import estimate_cpu_seconds, format_duration

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


def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (with config.yaml, drift.parquet, ...)")],
) -> None:
    """(Re)build run_dir/report.html and run_dir/figures/*.png from the run's artifacts."""
    from evidrift.studies.drift.report import build_report

    if not run_dir.is_dir():
        raise fail(f"{run_dir} is not a directory; pass the run directory (the study's output.dir)")
    path = build_report(run_dir)
    console.print(f"report: {path.resolve()}", highlight=False)
