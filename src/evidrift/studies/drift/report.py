"""The drift study's report: every section of a drift run, rendered by ``report.html.render_report``.

``build_report(run_dir)`` reads whatever the run holds — ``config.yaml``, ``data/manifest.parquet``,
``eval/classification.csv``, ``drift.parquet``, ``summary.csv``, ``rankings.csv``, ``reversals.csv``,
``localization_summary.csv``, the maps store — and writes ``report.html`` and ``figures/*.png``. Sections
whose inputs are missing say so instead of failing, so a partial run can be reported. An ``evidrift compare``
run adds the compare study's gate section; a run where the probe or sanity study ran adds theirs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
import yaml

from evidrift.core.maps_store import read_maps, stored_methods
from evidrift.core.paths import RunPaths
from evidrift.report import figures as F
from evidrift.report.elements import (
    Cell,
    FigureWriter,
    Section,
    Table,
    ci_columns,
    fmt,
    fmt_ci,
    fmt_p,
    ordered,
    read_csv_or_none,
)
from evidrift.report.html import render_report
from evidrift.report.map_sections import overlay_section, zone_section
from evidrift.report.method_labels import (
    drift_for_display,
    layers_of,
    methods_for_display,
    summary_for_display,
)
from evidrift.studies.compare.report import compare_gate_section, has_compare_gate
from evidrift.studies.config import StudyConfig, dump_yaml, parse_config, study_hash
from evidrift.studies.drift.localization import LOCALIZATION_METRICS

#: The headline drift metrics of the report (summary table, distributions), in this order when present; the
#: console table shows five (analysis.CONSOLE_METRICS).
REPORT_METRICS = (
    "topk_iou@0.2",
    "dice@0.2",
    "zone_agreement",
    "spearman",
    "ssim",
    "centroid_shift",
    "peak_shift",
    "zone_tv",
    "js",
    "entropy_change",
)


#: The headline metrics split into the two drift tables: agreement (1 = identical) and change (0 = identical).
AGREEMENT_METRICS = ("topk_iou@0.2", "dice@0.2", "zone_agreement", "pearson", "spearman", "cosine", "ssim")


# --- config -------------------------------------------------------------------------------------------------
def load_run_config(paths: RunPaths) -> StudyConfig:
    """The study config of ``run/config.yaml`` (its ``config_hash`` key dropped); defaults if absent."""
    if not paths.config.is_file():
        return StudyConfig()
    raw = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    raw.pop("config_hash", None)
    return parse_config(raw, str(paths.config))


def recorded_hash(paths: RunPaths) -> str | None:
    """The ``config_hash`` written at the top of ``run/config.yaml`` (the hash the run ran with), if any."""
    if not paths.config.is_file():
        return None
    raw = yaml.safe_load(paths.config.read_text(encoding="utf-8")) or {}
    value = raw.get("config_hash") if isinstance(raw, dict) else None
    return str(value) if value is not None else None


# --- sections -----------------------------------------------------------------------------------------------
def dataset_section(paths: RunPaths) -> Section:
    """Classes × splits counts (usable images), and the skipped files with their reasons."""
    section = Section("data", "Dataset", "Data")
    if not paths.manifest.is_file():
        section.notes.append(f"No manifest at {paths.manifest}: the data step has not run.")
        return section
    manifest = pd.read_parquet(paths.manifest)
    classes_file = paths.data_dir / "classes.json"
    classes = json.loads(classes_file.read_text(encoding="utf-8")) if classes_file.is_file() else None
    labels = ordered(manifest["label"], classes)
    ok = manifest[manifest["status"] == "ok"]
    splits = [s for s in ("train", "val", "test") if s in set(ok["split"])] or sorted(set(ok["split"]))
    rows = []
    for label in labels:
        part = ok[ok["label"] == label]
        counts = [int((part["split"] == s).sum()) for s in splits]
        rows.append([Cell(label), *[Cell(str(c)) for c in counts], Cell(str(sum(counts)))])
    totals = [int((ok["split"] == s).sum()) for s in splits]
    rows.append([Cell("all", "total"), *[Cell(str(c), "total") for c in totals], Cell(str(len(ok)), "total")])
    section.tables.append(
        Table(["class", *splits, "total"], rows, caption="usable images per class and split")
    )
    skipped = manifest[manifest["status"] != "ok"]
    has_masks = "mask_path" in manifest.columns and manifest["mask_path"].notna().any()
    has_boxes = "bbox" in manifest.columns and manifest["bbox"].notna().any()
    truth = {
        (True, True): "; lesion masks and boxes available.",
        (True, False): "; lesion masks available.",
        (False, True): "; lesion boxes available (localization on masks rasterised from them, box-derived).",
        (False, False): "; no lesion masks.",
    }[(bool(has_masks), bool(has_boxes))]
    section.intro = (
        f"{len(manifest)} images listed, {len(ok)} usable, {len(skipped)} skipped; {len(labels)} classes"
        + truth
    )
    ignored_file = paths.data_dir / "ignored.json"
    ignored = json.loads(ignored_file.read_text(encoding="utf-8")) if ignored_file.is_file() else []
    if ignored:
        shown = ", ".join(ignored[:12]) + (", ..." if len(ignored) > 12 else "")
        section.notes.append(f"{len(ignored)} files ignored (neither images nor DICOM): {shown}")
    if len(skipped):
        first = skipped.head(50)
        rows = [
            [Cell(str(r["id"])), Cell(str(r["status"]).removeprefix("skipped: "))]
            for _, r in first.iterrows()
        ]
        caption = "skipped files (on_bad_image: skip)" + (
            f", first 50 of {len(skipped)}" if len(skipped) > 50 else ""
        )
        section.tables.append(Table(["image", "reason"], rows, caption=caption, numeric_from=99))
    return section


def classification_section(paths: RunPaths, stage_labels: Mapping[int, str], draw: FigureWriter) -> Section:
    """Accuracy, macro-F1 and macro AUROC per arch × stage with bootstrap CIs (eval/classification.csv)."""
    section = Section("classification", "Classification", "Accuracy")
    table = read_csv_or_none(paths.classification)
    if table is None or table.empty:
        section.notes.append("No eval/classification.csv: the evaluate step has not run.")
        return section
    for m in ("accuracy", "macro_f1", "macro_auroc"):  # CI columns: m_lo/m_hi or m_ci_low/m_ci_high
        table = table.rename(columns={f"{m}_ci_low": f"{m}_lo", f"{m}_ci_high": f"{m}_hi"})
    rows = []
    moved = "weight_change_backbone" in table.columns
    for _, r in table.iterrows():
        rows.append(
            [
                Cell(str(r["arch"])),
                Cell(stage_labels.get(int(r["stage"]), str(r["stage"])), "text"),
                Cell(str(int(r["n"])) if "n" in r and fmt(r["n"]) != "n/a" else ""),
                *[
                    Cell(fmt_ci(r[m], r[f"{m}_lo"], r[f"{m}_hi"]))
                    for m in ("accuracy", "macro_f1", "macro_auroc")
                ],
                *(
                    [Cell(fmt(r["weight_change_backbone"], 4)), Cell(fmt(r["weight_change_head"], 4))]
                    if moved
                    else []
                ),
            ]
        )
    section.intro = "Test split; mean [95% percentile-bootstrap CI over images]." + (
        " Δθ: how far the stage moved the weights, ‖θ_end − θ_start‖ / ‖θ_start‖ of the backbone and of the "
        "head (stage 1 trains the head only; stage 2 starts from stage 1's checkpoint)."
        if moved
        else ""
    )
    columns = ["architecture", "stage", "n", "accuracy", "macro-F1", "macro AUROC"]
    section.tables.append(
        Table([*columns, *(["Δθ backbone", "Δθ head"] if moved else [])], rows, numeric_from=2)
    )
    section.figures.append(
        draw(F.classification_figure(table, stage_labels), "classification", "Classification")
    )
    changes = read_csv_or_none(paths.accuracy_change)
    if changes is not None and not changes.empty:
        first, second = (stage_labels.get(s, f"stage {s}").split(" (")[0] for s in (1, 2))
        section.tables.append(
            Table(
                ["architecture", "n", f"right only at {first}", f"right only at {second}", "accuracy change",
                 "exact McNemar p"],
                [
                    [
                        Cell(str(r["arch"])), Cell(str(int(r["n"]))), Cell(str(int(r["only_stage1"]))),
                        Cell(str(int(r["only_stage2"]))), Cell(f"{float(r['change']):+.3f}"),
                        Cell(fmt_p(r["p_mcnemar"])),
                    ]
                    for _, r in changes.iterrows()
                ],
                caption=f"Did accuracy change from {first} to {second}? Paired on the same test images: only "
                "the images right at one stage count (exact binomial test, two-sided).",
            )
        )  # fmt: skip
    return section


def drift_summary_section(
    summary: pd.DataFrame | None,
    drift: pd.DataFrame | None,
    archs: list[str],
    methods: list[str],
    stage_labels: tuple[str, str],
) -> Section:
    """Mean [95% CI] of the headline metrics per arch × method, and every metric in a collapsed table."""
    section = Section("drift", "Explanation drift", "Drift")
    if summary is None or summary.empty:
        section.notes.append("No summary.csv: the drift step has not run.")
        return section
    low, high = ci_columns(summary)
    metrics = ordered(summary["metric"])
    key = [m for m in REPORT_METRICS if m in metrics] or metrics[:8]
    n_images = summary.groupby(["arch", "method"])["n"].max().astype(int).to_dict() if "n" in summary else {}
    section.intro = (
        f"Each row compares the maps of the same images under {stage_labels[0]} and {stage_labels[1]}; each "
        "cell is the mean [95% percentile-bootstrap CI] over images. Overlap and correlation metrics are 1 "
        "for identical maps; shifts (fraction of the image diagonal), zone_tv and js are 0."
    )
    indexed = summary.set_index(["arch", "method", "metric"])
    agreement = [m for m in key if m in AGREEMENT_METRICS]
    change = [m for m in key if m not in AGREEMENT_METRICS]
    for columns, caption in (
        (agreement, "agreement: 1 = identical maps (higher = more stable)"),
        (change, "change: 0 = identical maps (lower = more stable)"),
    ):
        if not columns:
            continue
        rows = []
        for arch in archs:
            for method in methods:
                cells = [Cell(arch), Cell(method, "text"), Cell(str(n_images.get((arch, method), "")))]
                for metric in columns:
                    if (arch, method, metric) in indexed.index:
                        r = indexed.loc[[(arch, method, metric)]].iloc[0]  # the first row of that key
                        cells.append(Cell(fmt_ci(r["mean"], r[low], r[high])))
                    else:
                        cells.append(Cell("—"))
                rows.append(cells)
        section.tables.append(
            Table(["architecture", "method", "images", *columns], rows, caption, numeric_from=2)
        )
    full_rows = []
    for _, r in summary.iterrows():
        full_rows.append(
            [
                Cell(str(r["arch"])),
                Cell(str(r["method"]), "text"),
                Cell(str(r["metric"]), "text"),
                Cell(str(int(r["n"])) if "n" in r and fmt(r["n"]) != "n/a" else ""),
                Cell(fmt(r["mean"])),
                Cell(f"[{fmt(r[low])}, {fmt(r[high])}]"),
                Cell(fmt(r["median"]) if "median" in r else ""),
                Cell(fmt(r["std"]) if "std" in r else ""),
            ]
        )
    section.details.append(
        (
            "Every metric (summary.csv)",
            Table(
                ["architecture", "method", "metric", "n", "mean", "95% CI", "median", "std"],
                full_rows,
                numeric_from=3,
            ),
        )
    )
    return section


def ranking_section(
    rankings: pd.DataFrame | None,
    reversals: pd.DataFrame | None,
    archs: list[str],
    methods: list[str],
    draw: FigureWriter,
) -> Section:
    """How the architectures order by stability under each method, per metric; rank reversals listed."""
    section = Section("rankings", "Rankings and rank reversals", "Rankings")
    if rankings is None or rankings.empty:
        section.notes.append("No rankings.csv: the drift step has not run.")
        return section
    if len(archs) < 2:
        section.notes.append("One architecture only: there is nothing to rank.")
        return section
    reversals = reversals if reversals is not None else pd.DataFrame()
    metrics = ordered(rankings["metric"], REPORT_METRICS)
    n_rev = len(reversals)
    section.intro = (
        "Rank 1 = the architecture whose explanations drift least under that method and metric "
        "(direction-aware). "
        "A rank reversal is a pair of methods under which two architectures swap order on the images "
        "explained in all four cells: the conclusion 'architecture X is more stable' then depends on the CAM "
        "method. It is significant when the per-image interaction (Wilcoxon, Holm over every reversal of the "
        "study) and each method's own one-sided paired test survive. Equivalent methods count once. Panels "
        "with reversals are tinted; significant ones are drawn as red dashed segments. "
        f"{n_rev} reversal{'s' * (n_rev != 1)} found."
    )
    section.figures.append(
        draw(
            F.ranking_figure(rankings, reversals, metrics, methods, archs), "rankings", "Rankings per metric"
        )
    )
    if n_rev:
        cols = list(reversals.columns)
        sig = ["significant"] if "significant" in cols else [c for c in cols if c.startswith("significant")]
        rows = []
        listed = (
            reversals.sort_values([c for c in ("metric",) if c in cols]) if "metric" in cols else reversals
        )
        for _, r in listed.head(200).iterrows():
            flagged = any(bool(r[c]) for c in sig)
            rows.append(
                [
                    Cell(fmt(r[c]) if isinstance(r[c], float) else str(r[c]), "sig" if flagged else "")
                    for c in cols
                ]
            )
        caption = "rank reversals (reversals.csv); significant reversals highlighted"
        if n_rev > 200:
            caption += f"; first 200 of {n_rev}"
        section.details.append(
            ("Rank reversals (reversals.csv)", Table(cols, rows, caption=caption, numeric_from=99))
        )
    return section


def distribution_section(
    drift: pd.DataFrame | None, archs: list[str], methods: list[str], draw: FigureWriter
) -> Section:
    section = Section("distributions", "Metric distributions", "Distributions")
    if drift is None or drift.empty:
        section.notes.append("No drift.parquet: the drift step has not run.")
        return section
    numeric = [
        c
        for c in drift.columns
        if c not in ("id", "arch", "method") and pd.api.types.is_float_dtype(drift[c])
    ]
    key = [m for m in REPORT_METRICS if m in numeric] or numeric[:8]
    section.intro = "Per-image values (boxes: quartiles, whiskers 1.5 IQR) of the headline metrics."
    section.figures.append(
        draw(F.distribution_figure(drift, key, methods, archs), "distributions", "Distributions")
    )
    return section


def uniform_baselines(summary: pd.DataFrame) -> dict[tuple[str, str], float]:
    """{("energy_pointing_game", arch): mean mask_fraction of the arch's explained images} from a
    localization summary (mean over its methods and stages, which explain the same images or nearly)."""
    rows = summary[summary["metric"] == "mask_fraction"]
    return {("energy_pointing_game", str(a)): float(g["mean"].mean()) for a, g in rows.groupby("arch")}


def localization_section(
    paths: RunPaths,
    archs: list[str],
    methods: list[str],
    stage_labels: Mapping[int, str],
    draw: FigureWriter,
) -> Section:
    """Localization against the ground-truth masks (``localization_summary.csv``), when the data has masks."""
    section = Section("localization", "Localization against the lesion masks", "Localization")
    summary = read_csv_or_none(paths.localization_summary)
    if summary is None or summary.empty:
        section.notes.append("The data has no lesion masks (or the localization step has not run).")
        return section
    low, high = ci_columns(summary)
    summary = summary.rename(columns={low: "ci_low", high: "ci_high"})
    metrics = ordered(summary["metric"], LOCALIZATION_METRICS)
    if "box_derived" in summary.columns and summary["box_derived"].fillna(0).gt(0).any():
        section.notes.append(
            "Box-derived ground truth: images without a lesion mask are scored against their CSV boxes "
            "rasterised as masks; box_iou@0.5 compares the bounding box of the map's values ≥ 0.5 (min-max "
            "normalized) with the boxes."
        )
    section.intro = (
        "Maps of the explained test images with a non-empty lesion mask, at each stage: pointing game (the "
        "peak "
        "inside the lesion), energy pointing game (share of the map's mass inside), mask IoU of the top 20% "
        "and pixel AUROC. Mean [95% CI]."
    )
    rows = []
    for arch in archs:
        for method in methods:
            for stage, label in stage_labels.items():
                part = summary[
                    (summary["arch"] == arch) & (summary["method"] == method) & (summary["stage"] == stage)
                ]
                if part.empty:
                    continue
                by_metric = part.set_index("metric")
                cells = [Cell(arch), Cell(method, "text"), Cell(label, "text")]
                for metric in metrics:
                    if metric in by_metric.index:
                        r = by_metric.loc[metric]
                        cells.append(Cell(fmt_ci(r["mean"], r["ci_low"], r["ci_high"])))
                    else:
                        cells.append(Cell("—"))
                rows.append(cells)
    shown = [m for m in metrics if m in LOCALIZATION_METRICS[:3]] or metrics[:3]
    baselines = uniform_baselines(summary)
    if baselines:
        section.notes.append(
            "Uniform-map baseline of the energy pointing game (the mean lesion-mask share of the image, the "
            "dashed line in the figure): "
            + ", ".join(f"{arch} {value:.3f}" for (_, arch), value in sorted(baselines.items()))
            + ". A map that looks at the lesions scores well above it."
        )
    section.figures.append(
        draw(
            F.localization_figure(summary, shown, methods, archs, stage_labels, baselines),
            "localization",
            "Localization",
        )
    )
    section.details.append(
        ("Localization table", Table(["architecture", "method", "stage", *metrics], rows, numeric_from=3))
    )
    return section


def degenerate_section(
    paths: RunPaths,
    drift: pd.DataFrame | None,
    archs: list[str],
    methods: list[str],
    stage_labels: tuple[str, str],
) -> Section:
    """Maps with no positive mass (all zero after ReLU) or non-finite values, per arch × method × stage, and
    the drift rows flagged degenerate (their metrics are NaN, never silent numbers)."""
    section = Section("degenerate", "Degenerate maps", "Degenerate maps")
    section.intro = (
        "A degenerate map (all zero, or non-finite) gives NaN for the metrics it breaks and a flag; it is "
        "counted "
        "here rather than silently averaged."
    )
    flag_cols = [c for c in (drift.columns if drift is not None else []) if c == "degenerate"]
    rows = []
    for arch in archs:
        for method in methods:
            counts = []
            total = None
            for stage in (1, 2):
                try:
                    maps, _, _ = read_maps(paths, arch, stage, method)
                except FileNotFoundError:
                    counts.append("—")
                    continue
                m = maps.float()
                bad = (~torch.isfinite(m).flatten(1).all(1)) | ~(m.nan_to_num(0.0) > 0).flatten(1).any(1)
                counts.append(str(int(bad.sum())))
                total = len(m)
            flagged = ""
            if drift is not None and flag_cols:
                part = drift[(drift["arch"] == arch) & (drift["method"] == method)]
                flagged = str(int(part[flag_cols].any(axis=1).sum()))
            rows.append(
                [
                    Cell(arch),
                    Cell(method, "text"),
                    Cell(str(total) if total is not None else "—"),
                    *[Cell(c) for c in counts],
                    Cell(flagged),
                ]
            )
    header = [
        "architecture",
        "method",
        "maps",
        f"degenerate, {stage_labels[0]}",
        f"degenerate, {stage_labels[1]}",
        "drift rows flagged",
    ]
    section.tables.append(Table(header, rows, numeric_from=2))
    return section


def overview_section(
    paths: RunPaths,
    summary: pd.DataFrame | None,
    reversals: pd.DataFrame | None,
    drift: pd.DataFrame | None,
    archs: list[str],
    stage_labels: tuple[str, str],
) -> Section:
    """The findings in a few sentences: accuracy per stage, the headline drift per architecture (range over
    methods), the rank reversals and the degenerate maps."""
    section = Section("overview", "At a glance", "Overview")
    table = read_csv_or_none(paths.classification)
    if summary is None or summary.empty:
        section.notes.append("The drift step has not run yet.")
        return section
    low, high = ci_columns(summary)
    headline = next(
        (m for m in ("topk_iou@0.2", "topk_iou@0.1", "spearman") if m in set(summary["metric"])), None
    )
    changes = read_csv_or_none(paths.accuracy_change)
    for arch in archs:
        parts = [arch + ":"]
        if table is not None and not table.empty:
            acc = table[table["arch"].astype(str) == arch].set_index("stage")["accuracy"]
            if 1 in acc.index and 2 in acc.index:
                first, second = (label.split(" (")[0] for label in stage_labels)
                text = f"accuracy {fmt(acc[1], 2)} at {first} → {fmt(acc[2], 2)} at {second}"
                change = None if changes is None or changes.empty else changes[changes["arch"] == arch]
                if change is not None and len(change):
                    text += f" (paired McNemar p = {fmt_p(change['p_mcnemar'].iloc[0])})"
                parts.append(text + ";")
        for metric in [m for m in (headline, "centroid_shift") if m]:
            rows = summary[(summary["arch"] == arch) & (summary["metric"] == metric)].dropna(subset=["mean"])
            if rows.empty:
                continue
            lo, hi = rows.iloc[rows["mean"].argmin()], rows.iloc[rows["mean"].argmax()]
            if len(rows) == 1:
                parts.append(f"{metric} {fmt_ci(lo['mean'], lo[low], lo[high], 2)} under {lo['method']};")
            else:
                parts.append(
                    f"{metric} from {fmt(lo['mean'], 2)} ({lo['method']}) "
                    f"to {fmt(hi['mean'], 2)} ({hi['method']});"
                )
        section.bullets.append(" ".join(parts).rstrip(";") + ".")
    size = summary["analysis_size"].dropna() if "analysis_size" in summary.columns else pd.Series(dtype=float)
    if len(size):
        section.bullets.append(
            f"Every architecture's maps are compared on one {int(size.iloc[0])} × {int(size.iloc[0])} grid."
        )
    reversal_summary = read_csv_or_none(paths.reversals_summary)
    if len(archs) > 1 and reversal_summary is not None and not reversal_summary.empty:
        from evidrift.reversals import summary_line

        section.bullets.append(
            f"{summary_line(reversal_summary)} — between non-equivalent CAM methods, on the images explained "
            "under all four (architecture, method) cells; see Rankings."
        )
    equivalence = read_csv_or_none(paths.equivalence)
    if equivalence is not None and not equivalence.empty:
        for text in equivalence_sentences(equivalence):
            section.bullets.append(text)
    if drift is not None and "degenerate" in drift.columns:
        flagged = int(drift["degenerate"].astype(bool).sum())
        section.bullets.append(
            f"{flagged} of {len(drift)} map pairs have a degenerate map "
            "(their metrics are NaN and left out of the statistics)."
        )
    return section


def equivalence_sentences(equivalence: pd.DataFrame) -> list[str]:
    """One sentence per layer naming the methods that coincide there for every architecture, with the
    weakest agreement measured (equivalence.csv)."""
    from evidrift.reversals import equivalence_classes

    classes = equivalence_classes(equivalence)
    out = []
    for layer, mapping in classes.items():
        groups: dict[str, list[str]] = {}
        for method, head in mapping.items():
            groups.setdefault(head, []).append(method)
        merged = [sorted(g) for g in groups.values() if len(g) > 1]
        where = f"at layer {layer}" if layer else "at the CAM layer"
        if not merged:
            out.append(f"No two methods coincide {where}: every method counts in the rankings.")
            continue
        part = equivalence[equivalence["layer"].fillna("").astype(str) == layer]
        texts = []
        for group in merged:
            pairs = part[part["method_a"].isin(group) & part["method_b"].isin(group)]
            identical = pairs["reason"].astype(str).str.startswith("identical").all()
            how = (
                f"identical maps, max |Δ| {pairs['max_abs_diff'].max():.0e}"
                if identical
                else f"median Spearman ≥ {fmt(pairs['median_spearman'].min(), 3)}"
            )
            texts.append(" ≡ ".join(group) + f" ({how} in every architecture)")
        out.append(
            f"Equivalent {where}: {'; '.join(texts)}. They count as one method in rankings, reversals and "
            "Kendall τ (at a layer that feeds global average pooling and a linear head the CAM gradient is "
            "constant over space, which makes gradcam ≡ xgradcam ≡ hirescam and gradcam++ ≈ layercam)."
        )
    return out


def _archs_methods(
    config: StudyConfig, paths: RunPaths, drift: pd.DataFrame | None
) -> tuple[list[str], list[str]]:
    archs = [m.key for m in config.models]
    methods = list(config.explain.methods)
    if drift is not None and not drift.empty:
        archs = ordered(drift["arch"], archs)
        archs = [a for a in archs if a in set(drift["arch"].astype(str))]
        methods = ordered(drift["method"], methods)
        methods = [m for m in methods if m in set(drift["method"].astype(str))]
    else:
        present = [a for a in archs if stored_methods(paths, a, 1)]
        archs = present or archs
    return archs, methods


def build_report(
    run_dir: str | os.PathLike[str],
    config: StudyConfig | None = None,
    stage_labels: tuple[str, str] = ("stage 1 (transfer)", "stage 2 (fine-tuned)"),
    title: str | None = None,
    subtitle: str = "",
) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/figures/*.png``; returns the HTML path.

    ``config``: the study (read from ``run/config.yaml`` when None). ``stage_labels``: names of the two
    checkpoints compared (stage 1 / stage 2, or A / B for ``evidrift compare``).
    """
    paths = RunPaths.at(run_dir)
    config = config or load_run_config(paths)
    draw = FigureWriter(paths.figures_dir)
    drift = pd.read_parquet(paths.drift) if paths.drift.is_file() else None
    several_layers = len(layers_of(drift)) > 1
    if drift is not None:
        drift = drift_for_display(drift)
        drift = drift.assign(
            arch=drift["arch"].astype(str), method=drift["method"].astype(str), id=drift["id"].astype(str)
        )
    summary = read_csv_or_none(paths.summary)
    if summary is not None:
        summary = summary_for_display(summary, several_layers)
    archs, methods = _archs_methods(config, paths, drift)
    stage_map = {1: stage_labels[0], 2: stage_labels[1]}
    reversals = read_csv_or_none(paths.reversals)
    if reversals is not None:
        reversals = methods_for_display(reversals, ("method_a", "method_b"), several_layers)
    rankings = read_csv_or_none(paths.rankings)
    if rankings is not None:
        rankings = methods_for_display(rankings, ("method",), several_layers)
    summary_methods = ordered(summary["method"]) if summary is not None and not summary.empty else methods
    sections = [
        overview_section(paths, summary, reversals, drift, archs, stage_labels),
        dataset_section(paths),
        classification_section(paths, stage_map, draw),
        drift_summary_section(summary, drift, archs, summary_methods, stage_labels),
        ranking_section(
            rankings, reversals, archs, ordered(rankings["method"]) if rankings is not None else methods, draw
        ),
        distribution_section(drift, archs, methods, draw),
        overlay_section(
            paths, drift, archs, methods, config.report.examples, config.data.resize, stage_labels, draw
        ),
        zone_section(paths, drift, archs, methods, config.drift.zone_grid, stage_labels, draw),
        localization_section(paths, archs, methods, stage_map, draw),
        degenerate_section(paths, drift, archs, methods, stage_labels),
    ]
    if has_compare_gate(paths):  # an `evidrift compare` run: its verdicts and where the evidence moved
        sections.insert(1, compare_gate_section(paths, config.data.resize, stage_labels, draw))
    extra = ""
    if any(paths.root.glob("probe*")) or any(paths.root.glob("sanity*")):  # issue 7's studies have run here
        from evidrift.studies.probe.report import probe_report_section

        extra = probe_report_section(paths.root)
    config_text = paths.config.read_text(encoding="utf-8") if paths.config.is_file() else dump_yaml(config)
    return render_report(
        paths,
        title=title or config.report.title,
        subtitle=subtitle,
        sections=sections,
        config_text=config_text,
        seed=config.seed,
        config_hash=recorded_hash(paths) or study_hash(config),
        archs=archs,
        methods=methods,
        n_images=int(drift["id"].nunique()) if drift is not None and not drift.empty else 0,
        extra_html=extra,
    )
