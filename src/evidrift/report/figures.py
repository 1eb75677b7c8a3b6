"""The report's figures (matplotlib, Agg backend): pure functions from tables and arrays to PNG bytes.

Each ``*_figure`` function takes plain data (DataFrames, numpy arrays, labels) and returns a matplotlib
``Figure``; ``render_png(fig, path)`` writes it atomically as ``run/figures/{name}.png`` and returns the PNG
bytes for embedding. Mathtext is off (``text.parse_math``) so that a user string such as a class name with
``$`` signs is drawn literally and can never break rendering.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from evidrift.core.io import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 100
#: One colour per architecture, in the order the study lists them (colour-blind safe, Okabe-Ito).
ARCH_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STAGE_COLORS = ("#7a9cc6", "#d9822b")
REVERSAL_COLOR = "#c0392b"
STYLE: dict[RcKeyType, Any] = {
    "text.parse_math": False,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.facecolor": "white",
}


def style() -> AbstractContextManager[None]:
    """The report's matplotlib style as a context manager (no global state is changed)."""
    return matplotlib.rc_context(STYLE)


def render_png(fig: Figure, path: str | os.PathLike[str] | None = None) -> bytes:
    """PNG bytes of ``fig`` (closed afterwards); also written atomically to ``path`` when given."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    data = buffer.getvalue()
    if path is not None:
        write_bytes_atomic(Path(path), data)
    return data


def arch_colors(archs: Sequence[str]) -> dict[str, str]:
    """A stable colour per architecture name, in the given order."""
    return {a: ARCH_COLORS[i % len(ARCH_COLORS)] for i, a in enumerate(archs)}


def shorten(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def legend_above(fig: Figure, ax: Axes, y: float = 1.0, ncol: int | None = None) -> None:
    """One frameless figure legend centred above the panels, from the handles and labels of ``ax``."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=ncol if ncol is not None else max(1, len(labels)),
        frameon=False,
        bbox_to_anchor=(0.5, y),
    )


# --- classification -----------------------------------------------------------------------------------------
def classification_figure(table: pd.DataFrame, stage_labels: Mapping[int, str]) -> Figure:
    """Bars of accuracy, macro-F1 and macro AUROC per arch (groups) × stage (bars) with CI whiskers.

    ``table``: columns arch, stage (int), and for m in accuracy/macro_f1/macro_auroc: m, m_lo, m_hi.
    """
    names = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("macro_auroc", "macro AUROC")]
    archs = list(dict.fromkeys(table["arch"].astype(str)))
    stages = sorted(int(s) for s in table["stage"].unique())
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.9), squeeze=False)
        width = 0.8 / max(len(stages), 1)
        for ax, (column, title) in zip(axes[0], names, strict=True):
            for j, stage in enumerate(stages):
                part = table[table["stage"].astype(int) == stage]
                part = part.set_index(part["arch"].astype(str)).reindex(archs)
                values = part[column].to_numpy(dtype=float)
                low = np.clip(values - part[f"{column}_lo"].to_numpy(dtype=float), 0, None)
                high = np.clip(part[f"{column}_hi"].to_numpy(dtype=float) - values, 0, None)
                xs = np.arange(len(archs)) - 0.4 + width * (j + 0.5)
                ax.bar(
                    xs,
                    values,
                    width * 0.92,
                    color=STAGE_COLORS[j % 2],
                    label=stage_labels.get(stage, str(stage)),
                    yerr=[np.nan_to_num(low), np.nan_to_num(high)],
                    capsize=3,
                    error_kw={"lw": 0.8},
                )
            ax.set_xticks(range(len(archs)))
            ax.set_xticklabels([shorten(a, 18) for a in archs])
            ax.set_ylim(0, 1.12)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        legend_above(fig, axes[0, 0])
        fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


# --- rankings -----------------------------------------------------------------------------------------------
def ranking_figure(
    rankings: pd.DataFrame,
    reversals: pd.DataFrame,
    metrics: Sequence[str],
    methods: Sequence[str],
    archs: Sequence[str],
    columns: int = 4,
) -> Figure:
    """A bump chart per metric: methods on x, the architectures' stability rank on y (1 = most stable, top).

    ``rankings``: columns method, metric, arch, rank. ``reversals``: columns metric, method_a, method_b,
    arch_x, arch_y, significant (``evidrift.reversals.reversals``). A panel whose metric has a reversal is
    tinted, with the counts (all, and significant) in a red title; for the significant ones the two
    architectures' ranks under the two methods are joined by red dashed segments.
    """
    colors = arch_colors(archs)
    rows = max(1, math.ceil(len(metrics) / columns))
    with style():
        fig, axes = plt.subplots(rows, columns, figsize=(2.7 * columns, 2.1 * rows + 0.5), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            part = rankings[rankings["metric"] == metric]
            pos = {m: i for i, m in enumerate(methods)}
            for arch in archs:
                line = part[part["arch"] == arch].set_index("method")["rank"].reindex(list(methods))
                ax.plot(
                    range(len(methods)),
                    line.to_numpy(dtype=float),
                    "-o",
                    color=colors[arch],
                    lw=1.6,
                    ms=4,
                    label=shorten(arch, 20),
                )
            flips = reversals[reversals["metric"] == metric] if len(reversals) else reversals
            if "significant" in flips.columns:
                significant = flips[flips["significant"].astype(bool)]
            else:
                sig_cols = [c for c in flips.columns if c.startswith("significant")]
                significant = flips[flips[sig_cols].astype(bool).any(axis=1)] if sig_cols else flips
            for _, flip in significant.iterrows():
                ma, mb = str(flip["method_a"]), str(flip["method_b"])
                if ma not in pos or mb not in pos:
                    continue
                for arch in (str(flip["arch_x"]), str(flip["arch_y"])):
                    ranks = part[part["arch"] == arch].set_index("method")["rank"]
                    if ma in ranks.index and mb in ranks.index:
                        ax.plot(
                            [pos[ma], pos[mb]], [ranks[ma], ranks[mb]], "--", color=REVERSAL_COLOR, lw=1.2
                        )
            n_flip, n_sig = len(flips), len(significant)
            ax.set_title(
                f"{metric}" + (f"  ({n_flip} reversal{'s' * (n_flip != 1)}, {n_sig} sig.)" if n_flip else ""),
                color=REVERSAL_COLOR if n_flip else "black",
            )
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([shorten(m, 12) for m in methods], rotation=30, ha="right")
            ax.set_ylim(len(archs) + 0.5, 0.5)
            ax.set_yticks(range(1, len(archs) + 1))
            ax.set_xlim(-0.3, len(methods) - 0.7)
            ax.grid(axis="y", alpha=0.25)
            if n_flip:
                ax.set_facecolor("#fdf1f0")
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        axes[0, 0].set_ylabel("rank (1 = most stable)")
        legend_above(fig, axes[0, 0])
        fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


# --- distributions ------------------------------------------------------------------------------------------
def distribution_figure(
    drift: pd.DataFrame,
    metrics: Sequence[str],
    methods: Sequence[str],
    archs: Sequence[str],
    columns: int = 4,
) -> Figure:
    """Box plots per metric: methods on x, one box per architecture (colour), NaN values dropped.

    ``drift``: one row per (image, arch, method) with a column per metric.
    """
    colors = arch_colors(archs)
    rows = max(1, math.ceil(len(metrics) / columns))
    width = 0.8 / max(len(archs), 1)
    with style():
        fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.2 * rows + 0.4), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            for j, arch in enumerate(archs):
                data, xs = [], []
                for i, method in enumerate(methods):
                    selected = (drift["arch"] == arch) & (drift["method"] == method)
                    values = drift.loc[selected, metric].to_numpy(dtype=float)
                    values = values[np.isfinite(values)]
                    if len(values):
                        data.append(values)
                        xs.append(i - 0.4 + width * (j + 0.5))
                if data:
                    box = ax.boxplot(
                        data,
                        positions=xs,
                        widths=width * 0.85,
                        patch_artist=True,
                        showfliers=True,
                        flierprops={"markersize": 2, "alpha": 0.5},
                        medianprops={"color": "black"},
                    )
                    for patch in box["boxes"]:
                        patch.set_facecolor(colors[arch])
                        patch.set_alpha(0.75)
            ax.set_title(metric)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([shorten(m, 12) for m in methods], rotation=30, ha="right")
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.grid(axis="y", alpha=0.25)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        handles = [matplotlib.patches.Patch(color=colors[a], alpha=0.75, label=shorten(a, 20)) for a in archs]
        fig.legend(
            handles=handles, loc="upper center", ncol=len(archs), frameon=False, bbox_to_anchor=(0.5, 1.0)
        )
        fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


# --- overlays -----------------------------------------------------------------------------------------------
def _minmax(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(m.astype(np.float32), nan=0.0).clip(min=0)
    span = float(m.max() - m.min())
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def overlay_figure(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    maps_a: Sequence[np.ndarray],
    maps_b: Sequence[np.ndarray],
    titles: Sequence[str],
    stage_labels: tuple[str, str],
    heading: str,
) -> Figure:
    """Columns = images; rows = the image (lesion mask outlined), the map of stage A over it, of stage B, and
    the difference B − A of the min-max normalized maps (red: more evidence after, blue: less).

    ``images`` [S, S] float in [0, 1]; ``maps_*`` [S, S] float ≥ 0 already upsampled to the image size.
    """
    n = len(images)
    short = [label.split(" (")[0] for label in stage_labels]
    row_names = ["image", short[0], short[1], f"{short[1]} − {short[0]}"]
    with style():
        fig, axes = plt.subplots(4, max(n, 1), figsize=(1.75 * max(n, 1) + 0.4, 7.3), squeeze=False)
        for j in range(n):
            image = images[j]
            qa, qb = _minmax(maps_a[j]), _minmax(maps_b[j])
            mask = masks[j]
            for i in range(4):
                ax = axes[i, j]
                ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
                if i == 0 and mask is not None and mask.any():
                    ax.contour(mask.astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=0.9)
                elif i in (1, 2):
                    ax.imshow(
                        qa if i == 1 else qb, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear"
                    )
                elif i == 3:
                    ax.imshow(qb - qa, cmap="RdBu_r", alpha=0.7, vmin=-1, vmax=1, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if j == 0:
                    ax.set_ylabel(row_names[i], fontsize=8)
            axes[0, j].set_title(titles[j], fontsize=7)
        fig.suptitle(heading, fontsize=9, y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.3, w_pad=0.3)
    return fig


# --- zones --------------------------------------------------------------------------------------------------
def zone_labels(rows: int, cols: int) -> list[str]:
    """Cell names of a zone grid, row-major. For the default 3 × 2 grid on a PA radiograph: upper/middle/lower
    × R/L (the patient's right lung is on the image's left)."""
    if (rows, cols) == (3, 2):
        return [f"{r} {s}" for r in ("upper", "middle", "lower") for s in ("R", "L")]
    return [f"r{r + 1}c{c + 1}" for r in range(rows) for c in range(cols)]


def zone_figure(
    zones: pd.DataFrame,
    methods: Sequence[str],
    labels: Sequence[str],
    stage_labels: tuple[str, str],
    arch: str,
) -> Figure:
    """Mean share of the map's mass per zone, stage A vs stage B, one panel per method.

    ``zones``: rows (method, stage ∈ {a, b}, zone index) with a ``mass`` column (mean over images).
    """
    with style():
        fig, axes = plt.subplots(
            1, len(methods), figsize=(2.9 * len(methods), 2.5), squeeze=False, sharey=True
        )
        xs = np.arange(len(labels))
        for ax, method in zip(axes[0], methods, strict=True):
            for j, side in enumerate(("a", "b")):
                part = zones[(zones["method"] == method) & (zones["side"] == side)].set_index("zone")["mass"]
                values = part.reindex(range(len(labels))).to_numpy(dtype=float)
                ax.bar(xs - 0.2 + 0.4 * j, values, 0.38, color=STAGE_COLORS[j], label=stage_labels[j])
            ax.set_title(f"{shorten(arch, 20)} · {method}")
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=40, ha="right")
            ax.grid(axis="y", alpha=0.25)
        axes[0, 0].set_ylabel("mean share of map mass")
        legend_above(fig, axes[0, 0], ncol=2)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


# --- localization -------------------------------------------------------------------------------------------
def localization_figure(
    summary: pd.DataFrame,
    metrics: Sequence[str],
    methods: Sequence[str],
    archs: Sequence[str],
    stage_labels: Mapping[int, str],
    baselines: Mapping[tuple[str, str], float] | None = None,
) -> Figure:
    """Localization against ground-truth masks: a panel per (metric row, architecture column); methods on x,
    one bar per stage with CI whiskers. ``summary``: columns arch, method, stage (int), metric, mean, ci_low,
    ci_high. ``baselines`` {(metric, arch): value}: a dashed line (e.g. a uniform map's score)."""
    stages = sorted(int(s) for s in summary["stage"].unique())
    with style():
        fig, axes = plt.subplots(
            len(metrics),
            len(archs),
            figsize=(0.7 * len(methods) * len(archs) + 2.2, 2.1 * len(metrics) + 0.4),
            squeeze=False,
            sharey="row",
        )
        width = 0.8 / max(len(stages), 1)
        for i, metric in enumerate(metrics):
            for k, arch in enumerate(archs):
                ax = axes[i, k]
                for j, stage in enumerate(stages):
                    part = summary[
                        (summary["metric"] == metric)
                        & (summary["stage"].astype(int) == stage)
                        & (summary["arch"] == arch)
                    ]
                    part = part.set_index("method").reindex(list(methods))
                    mean = part["mean"].to_numpy(dtype=float)
                    low = np.nan_to_num(np.clip(mean - part["ci_low"].to_numpy(dtype=float), 0, None))
                    high = np.nan_to_num(np.clip(part["ci_high"].to_numpy(dtype=float) - mean, 0, None))
                    xs = np.arange(len(methods)) - 0.4 + width * (j + 0.5)
                    ax.bar(
                        xs,
                        mean,
                        width * 0.92,
                        color=STAGE_COLORS[j % 2],
                        yerr=[low, high],
                        capsize=2,
                        label=stage_labels.get(stage, str(stage)),
                        error_kw={"lw": 0.7},
                    )
                ax.set_xticks(range(len(methods)))
                ax.set_xticklabels([shorten(m, 12) for m in methods], rotation=30, ha="right")
                ax.grid(axis="y", alpha=0.25)
                baseline = (baselines or {}).get((metric, arch))
                if baseline is not None and np.isfinite(baseline):
                    ax.axhline(baseline, color="0.3", ls="--", lw=0.9, label="uniform map")
                if i == 0:
                    ax.set_title(shorten(arch, 24))
                if k == 0:
                    ax.set_ylabel(metric)
        legend_above(fig, axes[0, 0], ncol=len(stages))
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig
