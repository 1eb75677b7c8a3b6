"""The report's map sections: overlays of typical and most-drifted images (image, stage-1 map, stage-2 map,
difference) and the zone-mass charts, both read from the run's maps store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from evidrift.cam.maps import upsample
from evidrift.core.maps_store import read_maps
from evidrift.core.paths import RunPaths
from evidrift.metrics.common import AnalysisMaps
from evidrift.report import figures as F
from evidrift.report.elements import FigureWriter, Section, fmt

#: Side in pixels of the images and maps drawn in the overlays.
DISPLAY_SIZE = 160
#: The metric that picks the overlay examples (typical = median, most drifted = lowest), first one present.
SELECTION_METRICS = ("topk_iou@0.2", "topk_iou@0.1", "spearman", "pearson", "ssim")


def _display_image(path: str, mask_path: Any, resize: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as the model saw it (same pad/crop geometry) at ``DISPLAY_SIZE``, and its mask (or None)."""
    from evidrift.data.readers import read_image, read_mask
    from evidrift.data.transforms import resize_image

    image = torch.as_tensor(read_image(path))[None, None]
    shown = resize_image(image, DISPLAY_SIZE, resize)[0, 0].numpy()
    mask = None
    if isinstance(mask_path, str) and mask_path and Path(mask_path).is_file():
        raw = torch.as_tensor(np.asarray(read_mask(mask_path), dtype=np.float32))[None, None]
        mask = resize_image(raw, DISPLAY_SIZE, resize, is_mask=True)[0, 0].numpy() > 0.5
    return shown, mask


def pick_examples(values: pd.Series, k: int, lowest_is_drift: bool = True) -> tuple[list[Any], list[Any]]:
    """(typical, most drifted) index labels of ``values`` (NaN ignored): the ``k`` closest to the median and
    the
    ``k`` most drifted (lowest when ``lowest_is_drift``), the two lists disjoint when possible."""
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    if finite.empty or k <= 0:
        return [], []
    drifted = list((finite.sort_values(ascending=lowest_is_drift, kind="stable")).index[:k])
    rest = finite.drop(index=drifted) if len(finite) > k else finite
    median = float(finite.median())
    typical = list((rest - median).abs().sort_values(kind="stable").index[:k])
    return typical, drifted


def overlay_section(
    paths: RunPaths,
    drift: pd.DataFrame | None,
    archs: list[str],
    methods: list[str],
    k: int,
    resize: str,
    stage_labels: tuple[str, str],
    draw: FigureWriter,
) -> Section:
    """Overlays of typical and most-drifted images per arch × method (image, stage A, stage B, difference)."""
    section = Section("overlays", "Examples: typical and most-drifted images", "Examples")
    if drift is None or drift.empty or k == 0:
        section.notes.append("No drift.parquet (or report.examples is 0): no examples to show.")
        return section
    metric = next((m for m in SELECTION_METRICS if m in drift.columns), None)
    if metric is None:
        section.notes.append(f"None of {SELECTION_METRICS} in drift.parquet: cannot pick examples.")
        return section
    manifest = pd.read_parquet(paths.manifest).set_index("id") if paths.manifest.is_file() else None
    if manifest is None:
        section.notes.append("No manifest: cannot show the images.")
        return section
    section.intro = (
        f"Per architecture and method: the {k} images closest to the median {metric} (typical) and the {k} "
        "with "
        f"the lowest {metric} (most drifted). Rows: the image (lesion mask outlined when known), the map of "
        f"{stage_labels[0]} and of {stage_labels[1]}, and the difference of the min-max normalized maps "
        "(red: "
        "more weight in the second, blue: less)."
    )
    cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for arch in archs:
        refs = []
        for method in methods:
            part = drift[(drift["arch"] == arch) & (drift["method"] == method)].set_index("id")
            typical, drifted = pick_examples(part[metric], k)
            chosen = typical + drifted
            if not chosen:
                continue
            try:
                maps_a, ids_a, _ = read_maps(paths, arch, 1, method)
                maps_b, ids_b, _ = read_maps(paths, arch, 2, method)
            except FileNotFoundError as exc:
                section.notes.append(str(exc))
                continue
            pos_a = {i: n for n, i in enumerate(ids_a)}
            pos_b = {i: n for n, i in enumerate(ids_b)}
            images, masks, ma, mb, titles = [], [], [], [], []
            for n, image_id in enumerate(chosen):
                if image_id not in pos_a or image_id not in pos_b or image_id not in manifest.index:
                    continue
                row = manifest.loc[image_id]
                if image_id not in cache:
                    cache[image_id] = _display_image(str(row["path"]), row.get("mask_path"), resize)
                image, mask = cache[image_id]
                images.append(image)
                masks.append(mask)
                ma.append(upsample(maps_a[pos_a[image_id]].float(), DISPLAY_SIZE).numpy())
                mb.append(upsample(maps_b[pos_b[image_id]].float(), DISPLAY_SIZE).numpy())
                kind = "typical" if n < len(typical) else "most drifted"
                titles.append(
                    f"{kind}\n{F.shorten(str(row['label']), 22)}\n"
                    f"{metric} {fmt(part.loc[image_id, metric], 2)}"
                )
            if images:
                fig = F.overlay_figure(images, masks, ma, mb, titles, stage_labels, f"{arch} · {method}")
                refs.append(draw(fig, f"overlay_{arch}_{method}", f"{arch} · {method}"))
        if refs:
            section.groups.append((arch, refs))
    return section


def zone_section(
    paths: RunPaths,
    drift: pd.DataFrame | None,
    archs: list[str],
    methods: list[str],
    grid: tuple[int, int],
    stage_labels: tuple[str, str],
    draw: FigureWriter,
) -> Section:
    """Mean zone masses before vs after, per arch (a panel per method), on the images of drift.parquet."""
    section = Section("zones", "Where the evidence sits: zone masses", "Zones")
    if drift is None or drift.empty:
        section.notes.append("No drift.parquet: the drift step has not run.")
        return section
    labels = F.zone_labels(*grid)
    section.intro = (
        f"Mean share of each map's mass in a {grid[0]} × {grid[1]} grid over the image"
        + (" (upper/middle/lower × patient's right (image left) / left)" if tuple(grid) == (3, 2) else "")
        + f", {stage_labels[0]} vs {stage_labels[1]}, on the images of the drift table."
    )
    for arch in archs:
        rows = []
        for method in methods:
            ids = set(drift.loc[(drift["arch"] == arch) & (drift["method"] == method), "id"].astype(str))
            for side, stage in (("a", 1), ("b", 2)):
                try:
                    maps, map_ids, _ = read_maps(paths, arch, stage, method)
                except FileNotFoundError:
                    continue
                keep = torch.tensor([i in ids for i in map_ids], dtype=torch.bool)
                if not keep.any():
                    continue
                masses = AnalysisMaps(maps[keep], 64).zones(grid).mean(dim=0)
                rows += [
                    {"method": method, "side": side, "zone": z, "mass": float(v)}
                    for z, v in enumerate(masses)
                ]
        if rows:
            frame = pd.DataFrame(rows)
            shown = [m for m in methods if m in set(frame["method"])]
            fig = F.zone_figure(frame, shown, labels, stage_labels, arch)
            section.figures.append(draw(fig, f"zones_{arch}", f"Zone masses, {arch}"))
    return section
