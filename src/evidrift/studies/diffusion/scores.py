"""Localization of attention maps against the lesion masks (ARCHITECTURE §6 metrics, ``evidrift.metrics``).

``localization_rows`` scores maps [N, S, S] against masks [N, S, S] with the project's functions (as
``evidrift.studies.drift.localization.localization_table`` calls them): pointing game, energy pointing
game, mask IoU@0.2, pixel
AUROC, CNR, the GMM IoU / mIoU / box IoU of chest-distillation, and box IoU@0.5 against the mask's bounding
box. Images of the ``normal`` class (empty mask) are left out by the caller. ``summary`` gives per group and
metric n, mean and the seeded percentile-bootstrap CI (``evidrift.stats.describe``).

Baselines: ``mean_mask_prior`` (per class, the mean lesion mask of the fine-tune set: where lesions of that
class usually are, no image information), the start-token map and the random-init UNet (computed by the
pipeline through the same capture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from evidrift.metrics import localization as loc
from evidrift.metrics.common import AnalysisMaps
from evidrift.stats import describe

LOCALIZATION_COLUMNS = (
    "pointing_game",
    "energy_pointing_game",
    "mask_iou@0.2",
    "pixel_auroc",
    "cnr",
    "gmm_iou",
    "gmm_miou",
    "gmm_box_iou",
    "box_iou@0.5",
)

#: The metric the gates and the trade-off plot read.
PRIMARY_METRIC = "pixel_auroc"


#: The cheaper subset for the per-timestep and per-layer tables (no GMM fits).
TABLE_COLUMNS = ("pointing_game", "energy_pointing_game", "pixel_auroc", "cnr")


def localization_values(
    maps: Tensor, masks: Tensor, metrics: Sequence[str] = LOCALIZATION_COLUMNS
) -> dict[str, Tensor]:
    """Localization metrics (names of ``LOCALIZATION_COLUMNS``) of maps float [N, S, S] vs bool masks
    [N, S, S]: name → float64 [N]. ``box_iou@0.5`` scores against the mask's bounding box."""
    prepared = AnalysisMaps(maps.float(), (masks.shape[-2], masks.shape[-1]))
    functions = {
        "pointing_game": lambda: loc.pointing_game(prepared, masks),
        "energy_pointing_game": lambda: loc.energy_pointing_game(prepared, masks),
        "mask_iou@0.2": lambda: loc.mask_iou(prepared, masks, k=0.2),
        "pixel_auroc": lambda: loc.pixel_auroc(prepared, masks),
        "cnr": lambda: loc.cnr(prepared, masks),
        "gmm_iou": lambda: loc.gmm_iou(prepared, masks),
        "gmm_miou": lambda: loc.gmm_miou(prepared, masks),
        "gmm_box_iou": lambda: loc.gmm_box_iou(prepared, masks),
        "box_iou@0.5": lambda: loc.box_iou(prepared, loc.bounding_box_mask(masks.bool()), t=0.5),
    }
    unknown = [m for m in metrics if m not in functions]
    if unknown:
        raise ValueError(f"unknown localization metrics {unknown}; known: {list(functions)}")
    return {name: functions[name]() for name in metrics}


def localization_rows(
    maps: Tensor,
    masks: Tensor,
    ids: Sequence[str],
    labels: Sequence[str],
    metrics: Sequence[str] = LOCALIZATION_COLUMNS,
    **keys: str | int | float,
) -> pd.DataFrame:
    """One row per image: ``keys`` (e.g. model, timestep), id, label and one column per metric."""
    values = localization_values(maps, masks, metrics)
    frame = pd.DataFrame({name: v.numpy() for name, v in values.items()})
    frame.insert(0, "label", list(labels))
    frame.insert(0, "id", list(ids))
    for i, (key, value) in enumerate(keys.items()):
        frame.insert(i, key, value)
    return frame


def summary(
    rows: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], n_boot: int, seed: int
) -> pd.DataFrame:
    """Per group of ``by`` and metric: n, n_nan, mean, median, std, ci_low, ci_high (95 %, seeded)."""
    out = []
    for key, group in rows.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            stats = describe(group[metric].to_numpy(dtype=np.float64), n_boot=n_boot, seed=seed)
            out.append({**dict(zip(by, key, strict=True)), "metric": metric, **stats})
    return pd.DataFrame(out)


def mean_mask_prior(masks: np.ndarray, labels: Sequence[str], query_labels: Sequence[str]) -> Tensor:
    """float32 [N, S, S]: for each label of ``query_labels`` the mean of ``masks`` [M, S, S] over the
    training images of that label (zeros when the label has none)."""
    label_array = np.asarray(labels)
    priors: dict[str, np.ndarray] = {}
    for label in set(query_labels):
        chosen = masks[label_array == label]
        priors[label] = chosen.mean(axis=0) if len(chosen) else np.zeros(masks.shape[1:])
    return torch.from_numpy(np.stack([priors[label] for label in query_labels]).astype(np.float32))


def paired_difference(
    a: pd.DataFrame, b: pd.DataFrame, metric: str, n_boot: int, seed: int
) -> dict[str, float]:
    """Mean and CI of a[metric] − b[metric] on the ids finite in both (frames with ``id`` columns)."""
    joined = a[["id", metric]].merge(b[["id", metric]], on="id", suffixes=("_a", "_b"))
    diff = (joined[f"{metric}_a"] - joined[f"{metric}_b"]).to_numpy(dtype=np.float64)
    stats = describe(diff, n_boot=n_boot, seed=seed)
    return {"n": stats["n"], "mean": stats["mean"], "ci_low": stats["ci_low"], "ci_high": stats["ci_high"]}
