"""`evidrift compare A B --data D`: drift between two checkpoints, with gates for CI (exit code 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from evidrift.cli.output import console, err_console, fail
from evidrift.cli.study import _print_drift_table


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
    from evidrift.studies.compare.where import class_rows, drifted_rows, zone_rows

    drifted = where.get("most_drifted")
    if drifted is not None and len(drifted):
        metric = str(drifted["metric"].iloc[0])
        _print_rows(f"drift per class ({metric}, mean)", *class_rows(where["by_class"], metric), left=2)
    if where.get("by_zone") is not None and len(where["by_zone"]):
        _print_rows("where the evidence sits: zone mass A → B (change)", *zone_rows(where["by_zone"]))
    if drifted is not None and len(drifted):
        _print_rows(f"most-drifted images (of {n_images}; overlays in the report)", *drifted_rows(drifted), 4)


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
    from evidrift.studies.compare.band import Perturbation
    from evidrift.studies.compare.gates import GateSpec
    from evidrift.studies.compare.study import compare_checkpoints
    from evidrift.studies.compare.verdicts import exit_code, verdict_rows, write_verdicts

    below = _thresholds(fail_below, "--fail-below")
    above = _thresholds(fail_above, "--fail-above")
    spec = GateSpec(below, above, list(fail_beyond_band or []), alpha, band_tolerance)
    for option, path in (("--json", json_out), ("--junit", junit_out)):
        if path is not None and path.is_dir():
            raise fail(f"{option} {path} is a directory; pass the path of the file to write")
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
