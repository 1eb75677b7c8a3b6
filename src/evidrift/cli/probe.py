"""`evidrift probe | sanity`: the head probe ("How to Probe") and the explanation sanity checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from evidrift.cli.output import ci_text, console, err_console, training_logs

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

    from evidrift.core.paths import RunPaths
    from evidrift.studies.probe.report import write_probe_figures
    from evidrift.studies.probe.stats import best_variants
    from evidrift.studies.probe.study import probing_config, run_probe

    training_logs()
    config = probing_config(study, quick, out)
    paths = RunPaths.at(config.output.dir)
    summary, pairs = run_probe(config, paths, progress)
    figures = write_probe_figures(summary, paths.figures_dir)
    accuracy = summary[summary["metric"] == "correct"]
    table = Table(title="test accuracy per head variant (95% bootstrap CI)")
    for column in ("arch", "variant", "accuracy"):
        table.add_column(column)
    for _, row in accuracy.iterrows():
        table.add_row(
            str(row["arch"]), str(row["variant"]), ci_text(row["mean"], row["ci_low"], row["ci_high"])
        )
    console.print(table)
    best = best_variants(summary)
    for arch, part in best.groupby("arch", sort=False):
        table = Table(title=f"{arch}: best-localizing variant (mean [95% CI]; runner-up mean)")
        for column in ("metric", "method", "best", "mean [CI]", "runner-up"):
            table.add_column(column)
        for _, row in part.iterrows():
            runner = f"{row['runner_up']} {row['runner_up_mean']:.3f}" if row["runner_up"] else "-"
            ci = ci_text(row["mean"], row["ci_low"], row["ci_high"])
            table.add_row(str(row["metric"]), str(row["method"]), str(row["variant"]), ci, runner)
        console.print(table)
    significant = int(pairs["significant"].sum()) if len(pairs) else 0
    console.print(f"paired Wilcoxon tests between variants (Holm): {significant} of {len(pairs)} significant")
    console.print(
        f"tables: {paths.root / 'probe_summary.csv'}, {paths.root / 'probe_pairs.csv'}", highlight=False
    )
    console.print(f"figures: {', '.join(str(f) for f in figures)}", highlight=False)


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

    from evidrift.core.paths import RunPaths
    from evidrift.studies.probe.report import write_sanity_figures
    from evidrift.studies.probe.study import probing_config
    from evidrift.studies.sanity.study import run_sanity

    training_logs()
    config = probing_config(study, quick, out)
    paths = RunPaths.at(config.output.dir)
    summary, checks = run_sanity(config, paths, progress)
    figures = write_sanity_figures(summary, paths.figures_dir)
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
        for key, values in wide.iterrows():
            arch, method = cast(tuple[str, str], key)  # the (arch, method) index of the pivot
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
