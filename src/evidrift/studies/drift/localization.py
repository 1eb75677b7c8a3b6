"""Localization of the maps against the ground truth (masks, or masks rasterised from the CSV's boxes): the
drift step's ``localization.parquet`` and ``localization_summary.csv`` (ARCHITECTURE §6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evidrift.studies.drift.analysis import DriftSettings

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from evidrift.core.paths import RunPaths
from evidrift.studies.config import StudyConfig

LOCALIZATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_iou@0.2", "pixel_auroc", "cnr")
#: The lesion mask's share of the image at the analysis size: the energy pointing game of a uniform map.
BASELINE_METRIC = "mask_fraction"
#: Box IoU threshold on the min-max normalized map (``box_iou@t``), for the images with CSV boxes.
BOX_IOU_THRESHOLD = 0.5
BOX_METRIC = f"box_iou@{BOX_IOU_THRESHOLD:g}"


@dataclass
class GroundTruth:
    """The ground truth of one test image at the analysis size: ``mask`` bool [S, S] (the lesion mask, else
    the boxes rasterised: ``box_derived``), ``boxes`` bool [S, S] (the union of the CSV boxes) or None."""

    mask: Any
    boxes: Any
    box_derived: bool


def _ground_truth_at(frame: pd.DataFrame, size: int, resize: str) -> dict[str, GroundTruth]:
    """{image id: GroundTruth} with the model input's pad/crop geometry, for images whose mask (or boxes)
    is non-empty. Boxes are pixel corners of the original image (``manifest.bbox``)."""
    import torch

    from evidrift.data.readers import image_size, read_mask
    from evidrift.data.transforms import resize_image
    from evidrift.metrics.localization import boxes_to_mask

    def at_size(mask: Any) -> Any:
        tensor = torch.as_tensor(mask, dtype=torch.float32)[None, None]
        return resize_image(tensor, size, resize, is_mask=True)[0, 0] > 0.5

    out = {}
    for row in frame.itertuples():
        mask_path = getattr(row, "mask_path", None)
        box_text = getattr(row, "bbox", None)
        boxes = None
        if isinstance(box_text, str) and box_text:
            height, width = image_size(str(row.path))
            boxes = at_size(boxes_to_mask([json.loads(box_text)], (height, width))[0])
        if isinstance(mask_path, str) and mask_path:
            mask, derived = at_size(read_mask(mask_path)), False
        elif boxes is not None:
            mask, derived = boxes, True
        else:
            continue
        if mask.any():
            out[str(row.id)] = GroundTruth(
                mask, boxes if boxes is not None and boxes.any() else None, derived
            )
    return out


def localization_table(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> pd.DataFrame | None:
    """Maps of both stages vs the lesion masks, or masks rasterised from the CSV's boxes when an image has
    no mask (column ``box_derived``): one row per (id, arch, stage, method), a column per
    ``LOCALIZATION_METRICS``, ``box_iou@0.5`` (NaN without boxes) and ``mask_fraction`` (the mask's share of
    the image: a uniform map's energy pointing game), at the drift analysis size; None when
    the data has neither masks nor boxes."""
    import torch

    from evidrift.core.maps_store import read_maps, stored_methods
    from evidrift.metrics import localization as loc
    from evidrift.metrics.common import AnalysisMaps
    from evidrift.studies.drift.analysis import drift_jobs, stored_archs, study_analysis_size

    manifest = pd.read_parquet(paths.manifest)
    has_mask = manifest["mask_path"].notna() if "mask_path" in manifest.columns else False
    has_box = manifest["bbox"].notna() if "bbox" in manifest.columns else False
    with_truth = manifest[(has_mask | has_box) & (manifest["status"] == "ok")]
    if with_truth.empty:
        return None
    with_truth = with_truth[with_truth["split"] == "test"]
    rows = []
    truth_by_size: dict[int, dict[str, GroundTruth]] = {}
    size = study_analysis_size(paths, drift_jobs(paths), settings)  # the drift step's one grid
    for arch in stored_archs(paths):
        for stage in (1, 2):
            for method in stored_methods(paths, arch, stage):
                maps, ids, _ = read_maps(paths, arch, stage, method)
                if size not in truth_by_size:
                    truth_by_size[size] = _ground_truth_at(with_truth, size, config.data.resize)
                truth = truth_by_size[size]
                keep = [i for i, image_id in enumerate(ids) if image_id in truth]
                if not keep:
                    continue
                found = [truth[ids[i]] for i in keep]
                gt = torch.stack([t.mask for t in found])
                prepared = AnalysisMaps(maps[keep], size)
                values = {
                    "pointing_game": loc.pointing_game(prepared, gt),
                    "energy_pointing_game": loc.energy_pointing_game(prepared, gt),
                    "mask_iou@0.2": loc.mask_iou(prepared, gt, k=0.2),
                    "pixel_auroc": loc.pixel_auroc(prepared, gt),
                    "cnr": loc.cnr(prepared, gt),
                }
                with_boxes = [j for j, t in enumerate(found) if t.boxes is not None]
                box_iou = torch.full((len(keep),), float("nan"), dtype=torch.float64)
                if with_boxes:
                    boxes = torch.stack([found[j].boxes for j in with_boxes])
                    box_iou[with_boxes] = loc.box_iou(
                        AnalysisMaps(maps[[keep[j] for j in with_boxes]], size), boxes, t=BOX_IOU_THRESHOLD
                    )
                values[BOX_METRIC] = box_iou
                values[BASELINE_METRIC] = gt.flatten(1).double().mean(dim=1)
                for j, i in enumerate(keep):
                    rows.append(
                        {
                            "id": ids[i],
                            "arch": arch,
                            "stage": stage,
                            "method": method,
                            "box_derived": found[j].box_derived,
                            **{name: float(v[j]) for name, v in values.items()},
                        }
                    )
    return pd.DataFrame(rows) if rows else None


def write_localization(config: StudyConfig, paths: RunPaths, settings: DriftSettings) -> None:
    """``localization.parquet`` and ``localization_summary.csv`` (mean, bootstrap CI per arch × stage × method
    × metric; ``box_derived``: how many of the images' masks were rasterised from boxes) when the data has
    lesion masks or boxes; nothing otherwise."""
    from evidrift import stats
    from evidrift.core.io import write_csv_atomic, write_parquet_atomic

    table = localization_table(config, paths, settings)
    if table is None:
        return
    write_parquet_atomic(paths.localization, table)
    parts = []
    metrics = [
        *LOCALIZATION_METRICS,
        *([BOX_METRIC] if table[BOX_METRIC].notna().any() else []),
        *([BASELINE_METRIC] if BASELINE_METRIC in table.columns else []),
    ]
    for stage, group in table.groupby("stage", sort=True):
        summary = stats.summarize(group, metrics, n_boot=settings.n_boot, ci=settings.ci, seed=settings.seed)
        summary.insert(2, "stage", int(stage))  # type: ignore[arg-type]  # pandas-stubs: key is any scalar
        derived = group.groupby(["arch", "method"])["box_derived"].sum()
        pairs = zip(summary["arch"], summary["method"], strict=True)
        summary["box_derived"] = [int(derived[(arch, method)]) for arch, method in pairs]
        parts.append(summary)
    write_csv_atomic(paths.localization_summary, pd.concat(parts, ignore_index=True))
