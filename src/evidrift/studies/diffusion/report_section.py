"""The diffusion study's report (ARCHITECTURE §11) through the project's report builder (``evidrift.report``:
``Section``/``Table``/``FigureWriter`` elements, the ``report.html`` template, escaped text).

Sections: the verdict and gates (the trade-off is only read when every gate passes; otherwise the report
says the comparison is inconclusive), localization per model with CIs, fidelity, drift beside its noise
floor, and figures: the trade-off plot (fidelity vs localization, arrows base → variant), attention maps per
class × model with the lesion outlined, sample grids per model, localization vs timestep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from evidrift.core.io import config_hash
from evidrift.core.paths import RunPaths
from evidrift.report import figures as F
from evidrift.report.elements import Cell, FigureWriter, Section, Table, fmt, fmt_ci
from evidrift.report.html import render_report
from evidrift.studies.diffusion.config import DiffusionConfig, config_dict
from evidrift.studies.diffusion.scores import PRIMARY_METRIC

FIDELITY_METRIC = "fd"  # Fréchet distance in the in-run classifier's feature space; lower = better


def _table(frame: pd.DataFrame, columns: list[str], caption: str = "") -> Table:
    rows = [
        [Cell(fmt(v) if not isinstance(v, str) else v) for v in record]
        for record in frame[columns].itertuples(index=False)
    ]
    return Table(header=columns, rows=rows, caption=caption)


def localization_table(loc: pd.DataFrame, metrics: list[str]) -> Table:
    rows = []
    for (model, kind), group in loc.groupby(["model", "kind"], sort=False):
        by_metric = group.set_index("metric")
        rows.append(
            [Cell(str(model), "text"), Cell(str(kind), "text")]
            + [Cell(fmt_ci(*by_metric.loc[m, ["mean", "ci_low", "ci_high"]])) for m in metrics]
        )
    return Table(["model", "map", *metrics], rows, "mean [95 % bootstrap CI] over the lesion test images", 2)


def _number(frame: pd.DataFrame, row: str, column: str) -> float:
    """The cell (``row``, ``column``) of ``frame`` as a float; TypeError when it is not a number."""
    value = frame.loc[row, column]
    if not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{column} of {row!r} is {value!r}, not a number")
    return float(value)


def tradeoff_figure(loc: pd.DataFrame, fidelity: pd.DataFrame, variants: Sequence[str]) -> Any:
    """x: localization (``PRIMARY_METRIC`` of the query word's map), y: Fréchet distance; arrows base →
    variant."""
    query = loc[(loc["kind"] == "query") & (loc["metric"] == PRIMARY_METRIC)].set_index("model")
    by_model = fidelity.set_index("model")
    fd = by_model[FIDELITY_METRIC]
    with F.style():
        fig, ax = F.plt.subplots(figsize=(5.2, 3.8))
        models = ["base", *variants]
        colors = F.arch_colors(models)
        for model in models:
            if model not in query.index or model not in fd.index:
                continue
            x, y = _number(query, model, "mean"), float(fd.loc[model])
            low, high = _number(query, model, "ci_low"), _number(query, model, "ci_high")
            yerr = None
            if {"fd_ci_low", "fd_ci_high"} <= set(by_model.columns):
                fd_low, fd_high = (_number(by_model, model, c) for c in ("fd_ci_low", "fd_ci_high"))
                yerr = [[y - fd_low], [fd_high - y]]
            ax.errorbar(
                [x],
                [y],
                xerr=[[x - low], [high - x]],
                yerr=yerr,
                fmt="o",
                color=colors[model],
                label=model,
                capsize=3,
            )
            if model != "base" and "base" in query.index:
                bx, by = _number(query, "base", "mean"), float(fd.loc["base"])
                ax.annotate(
                    "", xy=(x, y), xytext=(bx, by), arrowprops={"arrowstyle": "->", "color": colors[model]}
                )
        if "real" in fd.index:
            ax.axhline(float(fd.loc["real"]), color="#888", linestyle=":", label="real-vs-real floor")
        ax.set_xlabel(f"localization: {PRIMARY_METRIC} (higher = better)")
        ax.set_ylabel("Fréchet distance, in-run features (lower = better)")
        ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def timestep_figure(per_t: pd.DataFrame) -> Any:
    rows = per_t[per_t["metric"] == PRIMARY_METRIC]
    with F.style():
        fig, ax = F.plt.subplots(figsize=(5.2, 3.4))
        for model, group in rows.groupby("model", sort=False):
            group = group.sort_values("timestep")
            ax.plot(group["timestep"], group["mean"], marker="o", label=str(model))
            ax.fill_between(group["timestep"], group["ci_low"], group["ci_high"], alpha=0.15)
        ax.set_xlabel("timestep t (noise level of the real image)")
        ax.set_ylabel(PRIMARY_METRIC)
        ax.legend(fontsize=7)
        fig.tight_layout()
    return fig


def maps_figure(paths: RunPaths, models: list[str], ctx: dict[str, Any]) -> Any:
    """One test image per lesion class (rows) × model (columns): the query word's map over the image, the
    lesion outlined."""
    from evidrift.studies.diffusion.pipeline import load_set, read_scaled

    test = load_set(paths, "test", ctx)
    labels = [c for c in dict.fromkeys(test.labels) if c != "normal"]
    picks = [test.labels.index(c) for c in labels]
    maps = {m: read_scaled(paths, m, "query")[0] for m in models}
    with F.style():
        fig, axes = F.plt.subplots(
            len(picks), len(models) + 1, figsize=(1.5 * (len(models) + 1), 1.5 * len(picks)), squeeze=False
        )
        for r, i in enumerate(picks):
            axes[r, 0].imshow(test.images[i], cmap="gray", vmin=0, vmax=1)
            axes[r, 0].contour(test.masks[i], levels=[0.5], colors="lime", linewidths=0.6)
            axes[r, 0].set_ylabel(labels[r].replace("_", " "), fontsize=6)
            for c, model in enumerate(models):
                ax = axes[r, c + 1]
                m = maps[model][i].numpy()
                ax.imshow(test.images[i], cmap="gray", vmin=0, vmax=1, extent=(0, 1, 1, 0))
                ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, 1, 1, 0))
                ax.contour(
                    np.linspace(0, 1, test.masks[i].shape[1]),
                    np.linspace(0, 1, test.masks[i].shape[0]),
                    test.masks[i],
                    levels=[0.5],
                    colors="white",
                    linewidths=0.6,
                )
                if r == 0:
                    ax.set_title(model, fontsize=6)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, 0].set_title("image + lesion", fontsize=6)
        fig.tight_layout()
    return fig


def samples_figure(paths: RunPaths, models: list[str], per_class: int = 4) -> Any:
    with F.style():
        fig, axes = F.plt.subplots(len(models), 1, figsize=(9.0, 0.55 * len(models) + 0.5), squeeze=False)
        for r, model in enumerate(models):
            with np.load(paths.root / "samples" / f"{model}.npz", allow_pickle=False) as data:
                images, labels = data["images"], [str(v) for v in data["labels"]]
            tiles = []
            for label in dict.fromkeys(labels):
                chosen = [i for i, lab in enumerate(labels) if lab == label][:per_class]
                tiles.append(np.concatenate([images[i] for i in chosen], axis=1))
            axes[r, 0].imshow(np.concatenate(tiles, axis=1), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(model, fontsize=6, rotation=0, ha="right", va="center")
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
        axes[0, 0].set_title(
            f"{per_class} samples per prompt class: " + ", ".join(dict.fromkeys(labels)), fontsize=7
        )
        fig.tight_layout()
    return fig


def diffusion_sections(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> list[Section]:
    draw = FigureWriter(paths.figures_dir)
    variants = list(config.train.variants)
    models = ["base", *variants]
    loc = pd.read_csv(paths.root / "localization.csv")
    fidelity = pd.read_csv(paths.root / "fidelity.csv")
    drift = pd.read_csv(paths.root / "drift.csv")
    gates = pd.read_csv(paths.root / "gates.csv")
    per_t = pd.read_csv(paths.root / "localization_timestep.csv")
    verdict = json.loads((paths.root / "verdict.json").read_text(encoding="utf-8"))
    conclusive = verdict["verdict"] == "conclusive"
    gate_section = Section(
        "diffusion-gates",
        "Do the attention maps mean anything? (gates)",
        nav="Gates",
        intro=(
            "Verdict: the comparison is conclusive; the trade-off below can be read."
            if conclusive
            else "Verdict: INCONCLUSIVE - failed gates: "
            + ", ".join(verdict["failed"])
            + ". The trade-off figure is shown for inspection only; no trade-off is drawn from these maps."
        ),
        tables=[
            _table(gates, ["model", "gate", "value", "ci_low", "ci_high", "chance", "threshold", "passed"])
        ],
    )
    metrics = [
        "pointing_game",
        "energy_pointing_game",
        "pixel_auroc",
        "cnr",
        "gmm_iou",
        "gmm_miou",
        "box_iou@0.5",
    ]
    figures = [
        draw(
            tradeoff_figure(loc, fidelity, variants),
            "diffusion_tradeoff",
            "Fidelity vs localization (base → variant)",
        ),
        draw(timestep_figure(per_t), "diffusion_timesteps", "Localization vs timestep"),
        draw(
            maps_figure(paths, [*models, "random_unet"], ctx),
            "diffusion_maps",
            "Query-word attention per class × model",
        ),
        draw(samples_figure(paths, models), "diffusion_samples", "Generated samples"),
    ]
    localization = Section(
        "diffusion-localization",
        "Localization of the query words' cross-attention",
        nav="Localization",
        intro=(
            "Normal images are left out; baselines: random-init UNet, the start token's map, "
            "the per-class mean mask."
        ),
        tables=[localization_table(loc, metrics)],
        figures=figures,
    )
    fidelity_section = Section(
        "diffusion-fidelity",
        "Fidelity (in-run classifier features)",
        nav="Fidelity",
        tables=[_table(fidelity, [c for c in fidelity.columns])],
    )
    drift_section = Section(
        "diffusion-drift",
        "Drift of the maps, base → variant, beside the noise floor (base, two noise seeds)",
        nav="Drift",
        tables=[
            _table(
                drift,
                [
                    "model",
                    "metric",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "floor_mean",
                    "floor_ci_low",
                    "floor_ci_high",
                ],
            )
        ],
    )
    return [gate_section, localization, fidelity_section, drift_section]


def write_report(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    """``report.html`` (self-contained) and ``figures/diffusion_*.png``."""
    resolved = config_dict(config)
    render_report(
        paths,
        title="evidrift - diffusion study: attention localization vs fidelity",
        subtitle=f"preset {config.preset}; variants: {', '.join(config.train.variants)}",
        sections=diffusion_sections(config, paths, ctx),
        config_text=json.dumps(resolved, indent=2),
        seed=config.train.seed,
        config_hash=config_hash(resolved),
        archs=["base", *config.train.variants],
        methods=["cross-attention"],
        n_images=config.data.n_test,
    )
