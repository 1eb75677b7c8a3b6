"""The report section of ``evidrift compare``: the gates' verdicts and where the evidence moved.

Reads ``OUT/gate/`` (written by ``evidrift.studies.compare.study``: verdicts.json, by_class.csv, by_zone.csv,
most_drifted.csv) and the maps store; shows the verdicts (value, threshold or band, p, pass/fail), drift per
class and per zone, and the most-drifted images with their overlays (image, map of A, map of B, difference),
so a failed gate says what to look at. Every string is escaped by the template.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from evidrift.cam.maps import upsample
from evidrift.core.maps_store import read_maps
from evidrift.core.paths import RunPaths
from evidrift.report import figures as F
from evidrift.report.elements import (
    Cell,
    FigureRef,
    FigureWriter,
    Section,
    Table,
    fmt,
    fmt_ci,
    read_csv_or_none,
)
from evidrift.report.map_sections import DISPLAY_SIZE, _display_image


def has_compare_gate(paths: RunPaths) -> bool:
    """Whether the run is a comparison with a gate folder (``OUT/gate/verdicts.json``)."""
    return (paths.gate_dir / "verdicts.json").is_file()


def _verdict_table(document: dict[str, Any]) -> Table:
    rows = []
    for v in document.get("gates", []):
        value = fmt_ci(v.get("value"), v.get("ci_low"), v.get("ci_high"))
        if v["gate"] == "fail-beyond-band":
            reference = (
                f"band {fmt_ci(v.get('band_mean'), v.get('band_ci_low'), v.get('band_ci_high'))}, "
                f"edge {fmt(v.get('threshold'))} (T = {fmt(v.get('tolerance'), 2)})"
            )
            p = f"{_p(v.get('p'))} ({_p(v.get('p_holm'))})"
        else:
            reference = f"{'≥' if v['gate'] == 'fail-below' else '≤'} {fmt(v.get('threshold'))}"
            p = "—"
        verdict = Cell("PASS", "total") if v["passed"] else Cell("FAIL", "sig")
        metric = f"|{v['metric']}|" if v.get("statistic", "mean") != "mean" else v["metric"]
        rows.append(
            [
                Cell(v["gate"]),
                Cell(metric),
                Cell(v["method"]),
                Cell(str(v.get("n", ""))),
                Cell(value),
                Cell(reference, "text"),
                Cell(p),
                verdict,
            ]
        )
    header = ["gate", "metric", "method", "n", "A → B mean [95% CI]", "threshold / band", "p (Holm)", ""]
    return Table(header, rows, caption="Verdicts (exit code 1 when any fails)", numeric_from=3)


def _p(value: Any) -> str:
    """A p-value: 4 decimals, or 2 significant digits below 0.001 ("n/a" when missing)."""
    if value is None or fmt(value) == "n/a":
        return "n/a"
    return f"{float(value):.2g}" if float(value) < 1e-3 else f"{float(value):.4f}"


def _class_table(by_class: pd.DataFrame, metric: str) -> Table:
    part = by_class[by_class["metric"] == metric]
    methods = list(dict.fromkeys(part["method"].astype(str)))
    has_band = part["band_mean"].notna().any()
    header = ["class", *[f"{m}" + (" (band)" if has_band else "") for m in methods]]
    rows = []
    for label in dict.fromkeys(part["class"].astype(str)):
        cells = [Cell(label)]
        for method in methods:
            r = part[(part["class"] == label) & (part["method"] == method)]
            if r.empty:
                cells.append(Cell("n/a"))
                continue
            text = f"{fmt(r['mean'].item())} (n = {int(r['n'].item())})"
            if has_band:
                text += f" · band {fmt(r['band_mean'].item())}"
            cells.append(Cell(text))
        rows.append(cells)
    return Table(header, rows, caption=f"Mean {metric} A → B per class", numeric_from=1)


def _zone_table(by_zone: pd.DataFrame) -> Table:
    methods = list(dict.fromkeys(by_zone["method"].astype(str)))
    rows = []
    for zone in dict.fromkeys(by_zone["zone"].astype(str)):
        cells = [Cell(zone)]
        for method in methods:
            r = by_zone[(by_zone["zone"] == zone) & (by_zone["method"] == method)]
            cells.append(
                Cell(
                    f"{fmt(r['mass_a'].item(), 2)} → {fmt(r['mass_b'].item(), 2)} "
                    f"({r['change'].item():+.2f}; |Δ| {fmt(r['mean_abs_change'].item(), 2)})"
                )
                if len(r)
                else Cell("n/a")
            )
        rows.append(cells)
    caption = "Mean share of the map's mass per zone, A → B (mean change; mean per-image |change|)"
    return Table(["zone", *methods], rows, caption=caption, numeric_from=1)


def _drifted_table(table: pd.DataFrame) -> Table:
    rows = [
        [
            Cell(str(r["method"])),
            Cell(str(int(r["rank"]))),
            Cell(str(r["id"])),
            Cell(str(r["label"])),
            Cell(fmt(r["value"])),
            Cell(fmt(r["band_value"])),
            Cell(str(r["path"]), "text"),
        ]
        for _, r in table.iterrows()
    ]
    metric = str(table["metric"].iloc[0])
    header = ["method", "rank", "id", "class", f"{metric} A → B", "band", "file"]
    return Table(header, rows, caption=f"Most-drifted images by {metric}", numeric_from=4)


def _overlays(
    paths: RunPaths, table: pd.DataFrame, resize: str, stage_labels: tuple[str, str], draw: FigureWriter
) -> list[tuple[str, list[FigureRef]]]:
    manifest = pd.read_parquet(paths.manifest)
    manifest = manifest.assign(id=manifest["id"].astype(str)).drop_duplicates("id").set_index("id")
    groups = []
    for (arch, method), part in table.groupby(["arch", "method"], sort=False):
        maps_a, ids_a, _ = read_maps(paths, str(arch), 1, str(method))
        maps_b, ids_b, _ = read_maps(paths, str(arch), 2, str(method))
        pos_a = {i: n for n, i in enumerate(ids_a)}
        pos_b = {i: n for n, i in enumerate(ids_b)}
        images, masks, ma, mb, titles = [], [], [], [], []
        for _, row in part.iterrows():
            image_id = str(row["id"])
            if image_id not in pos_a or image_id not in pos_b or image_id not in manifest.index:
                continue
            info = manifest.loc[image_id]
            image, mask = _display_image(str(info["path"]), info.get("mask_path"), resize)
            images.append(image)
            masks.append(mask)
            ma.append(upsample(maps_a[pos_a[image_id]].float(), DISPLAY_SIZE).numpy())
            mb.append(upsample(maps_b[pos_b[image_id]].float(), DISPLAY_SIZE).numpy())
            label = F.shorten(str(row["label"]), 20)
            titles.append(f"#{int(row['rank'])} {label}\n{row['metric']} {fmt(row['value'], 2)}")
        if images:
            heading = f"{arch} · {method}: most drifted"
            fig = F.overlay_figure(images, masks, ma, mb, titles, stage_labels, heading)
            ref = draw(fig, f"gate_drifted_{arch}_{method}", heading)
            groups.append((f"{arch} · {method}", [ref]))
    return groups


def compare_gate_section(
    paths: RunPaths, resize: str, stage_labels: tuple[str, str], draw: FigureWriter
) -> Section:
    """The section (module docstring)."""
    section = Section("gate", "Gate verdicts and where the evidence moved", "Gate")
    folder = paths.gate_dir
    document = json.loads((folder / "verdicts.json").read_text(encoding="utf-8"))
    band = document.get("band") or {}
    kind = band.get("kind")
    section.intro = (
        "Each gate is checked per method. Fixed thresholds compare the mean over the images with the value "
        "given; a band gate compares, image by image, the drift A → B with the noise band "
        + (
            "drift(A, A2) of a second checkpoint of A's recipe"
            if kind == "baseline"
            else "of A's maps under a small input perturbation (a weaker floor)"
            if kind == "input-noise"
            else "(none measured in this run)"
        )
        + ": one-sided Wilcoxon signed-rank test of u(A, B) − (1 + T)·u(band) per image (u = dissimilarity, "
        "0 = identical maps), Holm-corrected over every band gate; p is the chance of seeing B this much "
        "further from A than the band's edge if it were not."
    )
    if document.get("gates"):
        section.tables.append(_verdict_table(document))
    else:
        section.notes.append("No gate was requested: the tables below describe the drift only.")
    drifted = read_csv_or_none(folder / "most_drifted.csv")
    by_class = read_csv_or_none(folder / "by_class.csv")
    by_zone = read_csv_or_none(folder / "by_zone.csv")
    if drifted is not None and len(drifted) and by_class is not None and len(by_class):
        section.tables.append(_class_table(by_class, str(drifted["metric"].iloc[0])))
    if by_zone is not None and len(by_zone):
        section.tables.append(_zone_table(by_zone))
    if drifted is not None and len(drifted):
        section.tables.append(_drifted_table(drifted))
        section.groups.extend(_overlays(paths, drifted, resize, stage_labels, draw))
    return section
