"""Figures and the HTML section of the head probing study and the sanity checks (issue 7).

``write_probe_figures`` / ``write_sanity_figures`` draw PNGs (matplotlib Agg) from the tables that
``studies.probe.study`` and ``studies.sanity.study`` write; ``probe_report_section(run_dir)`` returns one
HTML fragment (figures embedded as base64 PNG, every table cell and label escaped) for whatever of the two
studies the run directory holds, or ``""`` when it holds neither.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from evidrift.core.paths import RunPaths

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from evidrift.report.figures import legend_above, render_png, style
from evidrift.studies.probe.stats import metric_order
from evidrift.studies.sanity.study import SIMILARITY_METRICS

_LINES = ("-", "--", ":", "-.")


def _save(fig: Figure, path: Path) -> Path:
    render_png(fig, path)
    return path


def _ci_err(frame: pd.DataFrame) -> list[list[float]]:
    low = (frame["mean"] - frame["ci_low"]).clip(lower=0).fillna(0)
    high = (frame["ci_high"] - frame["mean"]).clip(lower=0).fillna(0)
    return [low.tolist(), high.tolist()]


# --- figures ------------------------------------------------------------------------------------------------
def probe_figure(frame: pd.DataFrame, arch: str) -> Figure:
    """Head probing figure of one architecture: a panel per metric, variants on x, one bar per CAM method
    with its bootstrap CI (accuracy: one bar); dashed line: chance level 1/n² of gridpg@n."""
    metrics = metric_order(frame["metric"].tolist())
    variants = list(dict.fromkeys(frame["variant"]))
    methods = [m for m in dict.fromkeys(frame["method"]) if m != "-"]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.8, wspace=0.25, top=1 - 0.55 / (3.4 * rows))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = frame[frame["metric"] == metric]
        groups = ["-"] if metric == "correct" else methods
        width = 0.8 / max(len(groups), 1)
        for g, method in enumerate(groups):
            values = part[part["method"] == method].set_index("variant").reindex(variants)
            xs = [i - 0.4 + width * (g + 0.5) for i in range(len(variants))]
            label = "accuracy" if method == "-" else str(method)
            ax.bar(xs, values["mean"], width, yerr=_ci_err(values), capsize=2, label=label)
        ax.set_title("accuracy" if metric == "correct" else metric)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=35, ha="right")
        if metric.startswith("gridpg@"):
            n = int(metric.split("@")[1])
            ax.axhline(1 / n**2, color="grey", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    legend_above(fig, axes.flat[min(1, len(metrics) - 1)])
    fig.suptitle(f"head probing, {arch} (mean, 95% CI)", y=1.0 + 0.3 / (3.4 * rows))
    return fig


def sanity_figure(frame: pd.DataFrame, arch: str, mode: str) -> Figure:
    """Randomization curves of one (architecture, mode): a panel per similarity metric, steps on x (the
    block randomized at each step), one curve per CAM method with its CI band."""
    metrics = [m for m in SIMILARITY_METRICS if m in set(frame["metric"])]
    steps = frame[["step", "block"]].drop_duplicates().sort_values("step")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, (method, part) in enumerate(frame[frame["metric"] == metric].groupby("method", sort=False)):
            part = part.sort_values("step")
            # distinct line styles keep coinciding methods visible (gradcam = xgradcam on a linear head)
            ax.plot(
                part["step"],
                part["mean"],
                marker="osD^v"[i % 5],
                ms=3,
                ls=_LINES[i % len(_LINES)],
                label=str(method),
            )
            ax.fill_between(part["step"], part["ci_low"], part["ci_high"], alpha=0.15)
        ax.set_title(metric)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(steps["step"])
        ax.set_xticklabels(steps["block"], rotation=60, ha="right")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("similarity to the original maps")
    legend_above(fig, axes[0, 0], y=1.08)
    fig.suptitle(f"{mode} randomization, {arch}", y=1.14)
    return fig


def write_probe_figures(summary: pd.DataFrame, figures_dir: str | os.PathLike[str]) -> list[Path]:
    """``figures_dir/probe_{arch}.png`` per architecture of ``summary`` (the ``probe_summary.csv`` table)."""
    out: list[Path] = []
    with style():
        for arch, frame in summary.groupby("arch", sort=True):
            path = Path(figures_dir) / f"probe_{_file_part(str(arch))}.png"
            out.append(_save(probe_figure(frame, str(arch)), path))
    return out


def write_sanity_figures(summary: pd.DataFrame, figures_dir: str | os.PathLike[str]) -> list[Path]:
    """``figures_dir/sanity_{arch}_{mode}.png`` per (architecture, mode) of ``summary``
    (the ``sanity_summary.csv`` table)."""
    out: list[Path] = []
    with style():
        for (arch, mode), frame in summary.groupby(["arch", "mode"], sort=True):
            path = Path(figures_dir) / f"sanity_{_file_part(str(arch))}_{mode}.png"
            out.append(_save(sanity_figure(frame, str(arch), str(mode)), path))
    return out


def _file_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --- HTML ---------------------------------------------------------------------------------------------------
def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    source = f"data:image/png;base64,{data}"
    return f'<figure><img alt="{html.escape(alt)}" src="{source}" style="max-width:100%"></figure>'


def _fmt(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if math.isfinite(low) and math.isfinite(high):
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]"
    return f"{mean:.3f}"


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], bold: set[tuple[int, int]] | None = None
) -> str:
    bold = bold or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f"<td><b>{html.escape(c)}</b></td>" if (i, j) in bold else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="table-wrap">{table}</div>'


def probe_table(summary: pd.DataFrame, arch: str, method: str) -> tuple[list[str], list[list[str]], set]:
    """(header, rows, bold cells) of one arch × method: a row per variant, a column per metric, mean [CI];
    the best variant per localization metric is bold (highest mean)."""
    frame = summary[(summary["arch"] == arch) & (summary["method"].isin([method, "-"]))]
    metrics = metric_order(frame["metric"].tolist())
    variants = list(dict.fromkeys(frame["variant"]))
    header = ["variant", *["accuracy" if m == "correct" else m for m in metrics]]
    rows, bold = [], set()
    for variant in variants:
        row = [variant]
        for metric in metrics:
            hit = frame[(frame["variant"] == variant) & (frame["metric"] == metric)]
            row.append(_fmt(*hit[["mean", "ci_low", "ci_high"]].iloc[0].tolist()) if len(hit) else "n/a")
        rows.append(row)
    for j, metric in enumerate(metrics, start=1):
        if metric.split("@")[0] in ("entropy", "gini", "grid_entropy", "grid_gini"):
            continue
        part = frame[frame["metric"] == metric].set_index("variant")["mean"].reindex(variants)
        if part.notna().any():
            bold.add((variants.index(part.idxmax()), j))
    return header, rows, bold


def probe_report_section(run_dir: str | os.PathLike[str]) -> str:
    """HTML fragment (escaped) with the head probing study and the sanity checks found in ``run_dir``.

    Missing figures are drawn from the summaries first. Returns ``""`` when neither study has run.
    """
    root = Path(run_dir)
    figures = RunPaths.at(root).figures_dir
    parts: list[str] = []
    probe_summary = RunPaths.at(root).probe_summary
    if probe_summary.is_file():
        summary = pd.read_csv(probe_summary)
        parts.append('<section id="probe"><h2>Head probing</h2>')
        parts.append(
            "<p>Heads trained on one frozen backbone with the same budget and seed; each cell is the mean "
            "[95% bootstrap CI]. gridpg@n: share of the smoothed map's positive mass inside the target's "
            "cell of an n&times;n grid of full-size images (chance 1/n&sup2;); pointing games against the "
            "lesion masks. Bold: best variant per metric.</p>"
        )
        pool_file = RunPaths.at(root).probe_pool
        if pool_file.is_file():
            pool = pd.read_csv(pool_file)
            cols = ["arch", "class", "n_test", "n_pool"]
            parts.append(
                "<p>Grid pool: test images that every variant classifies correctly with confidence "
                "&ge; the threshold (n_pool of n_test per class).</p>"
            )
            parts.append(_table(cols, [[_cell(r[c]) for c in cols] for _, r in pool.iterrows()]))
        for arch in sorted(summary["arch"].unique()):
            for method in [m for m in dict.fromkeys(summary["method"]) if m != "-"]:
                header, rows, bold = probe_table(summary, arch, method)
                parts.append(f"<h3>{html.escape(str(arch))} &middot; {html.escape(str(method))}</h3>")
                parts.append(_table(header, rows, bold))
            figure = figures / f"probe_{_file_part(str(arch))}.png"
            if not figure.is_file():
                write_probe_figures(summary[summary["arch"] == arch], figures)
            parts.append(_img(figure, f"head probing figure for {arch}"))
        baseline_file = RunPaths.at(root).probe_baseline
        if baseline_file.is_file():
            versus = pd.read_csv(baseline_file)
            local = versus[versus["metric"].str.split("@").str[0].isin(["gridpg", "energy_pointing_game"])]
            if len(local):
                parts.append(
                    "<p>Every variant against the CE-linear probe (paired mean difference, variant &minus; "
                    "ce-linear, with its 95% bootstrap CI; Wilcoxon, Holm over the variants): GridPG and "
                    "energy pointing game.</p>"
                )
                cols = ["arch", "method", "metric", "variant", "n", "mean_diff", "ci_low", "ci_high"]
                cols.append("p_holm")
                parts.append(_table(cols, [[_cell(r[c]) for c in cols] for _, r in local.iterrows()]))
        pairs_file = RunPaths.at(root).probe_pairs
        if pairs_file.is_file():
            pairs = pd.read_csv(pairs_file)
            significant = pairs[pairs["significant"].astype(bool)]
            parts.append(
                f"<p>Paired Wilcoxon tests between variants (Holm-corrected): {len(significant)} of "
                f"{len(pairs)} comparisons significant.</p>"
            )
            if len(significant):
                cols = ["arch", "method", "metric", "variant_a", "variant_b", "mean_diff", "p_holm"]
                rows = [[_cell(r[c]) for c in cols] for _, r in significant.head(40).iterrows()]
                parts.append(_table(cols, rows))
        parts.append("</section>")
    sanity_summary = RunPaths.at(root).sanity_summary
    if sanity_summary.is_file():
        summary = pd.read_csv(sanity_summary)
        parts.append('<section id="sanity"><h2>Sanity checks: parameter randomization</h2>')
        parts.append(
            "<p>Similarity of the maps to the trained model's maps while blocks are re-initialized, from "
            "the head down (cascading) or one at a time (independent). Faithful maps fall towards 0.</p>"
        )
        selftest = RunPaths.at(root).sanity_selftest
        if selftest.is_file():
            result = json.loads(selftest.read_text(encoding="utf-8"))
            rows = [
                [
                    str(r["arch"]),
                    str(r["method"]),
                    str(r["check"]),
                    str(r["metric"]),
                    _cell(r["value"]),
                    str(r["expected"]),
                    "pass" if r["passed"] else ("FAIL" if r.get("kind", "metrics") == "metrics" else "flag"),
                ]
                for r in result["checks"]
            ]
            parts.append("<h3>Self-test</h3>")
            parts.append(
                "<p>Identical checkpoints must give zero drift (FAIL = a bug in the metrics). A fully "
                "randomized model must give a large drift; a method that keeps its maps is flagged: its maps "
                "may not reflect what the model learned.</p>"
            )
            parts.append(_table(["arch", "method", "check", "metric", "value", "expected", "result"], rows))
        for (arch, mode), _ in summary.groupby(["arch", "mode"], sort=True):
            figure = figures / f"sanity_{_file_part(str(arch))}_{mode}.png"
            if not figure.is_file():
                write_sanity_figures(summary[(summary["arch"] == arch) & (summary["mode"] == mode)], figures)
            parts.append(_img(figure, f"{mode} randomization curves for {arch}"))
        parts.append("</section>")
    return "\n".join(parts)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
