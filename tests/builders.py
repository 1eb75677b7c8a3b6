"""Builders of test inputs shared by several test files: synthetic run directories (manifest, maps store,
tables), checkpoints with their sidecar, DICOM files. Plain functions, imported as
``from builders import ...`` (``conftest.py`` puts ``tests/`` on ``sys.path``); each writes only what its
arguments say."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import evidrift  # noqa: F401  (before timm)
from evidrift.classifier.checkpoint import CheckpointMeta, save_checkpoint
from evidrift.classifier.config import HeadConfig
from evidrift.classifier.models import default_cam_layers
from evidrift.core.io import write_csv_atomic, write_parquet_atomic, write_text_atomic
from evidrift.core.maps_store import write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.data.phantom import CLASSES, render_phantom, to_png_bytes
from evidrift.studies.config import dump_yaml, parse_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The drift metrics of the synthetic run's tables, in the order the report lists them.
SYNTHETIC_METRICS = (
    "topk_iou@0.2",
    "centroid_shift",
    "peak_shift",
    "zone_tv",
    "spearman",
    "ssim",
    "js",
    "entropy_change",
)


# --- checkpoints --------------------------------------------------------------------------------------------
def checkpoint_meta(
    arch: str,
    classes: Sequence[str],
    model: nn.Module | None = None,
    **overrides: Any,
) -> CheckpointMeta:
    """A complete checkpoint sidecar with test defaults: key = arch, the default head, stage 2, epoch 0,
    64 px, ImageNet mean/std, CE loss, no pretrained weights, config hash "test"; ``cam_layers`` are the
    model's default CAM layers when ``model`` is given. ``overrides`` replace fields (or add extra keys)."""
    fields: dict[str, Any] = {
        "arch": arch,
        "key": arch,
        "head": HeadConfig().model_dump(mode="json"),
        "classes": list(classes),
        "stage": 2,
        "epoch": 0,
        "metrics": {},
        "config_hash": "test",
        "image_size": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "loss": "ce",
        "weights": "none",
    }
    if model is not None:
        fields["cam_layers"] = default_cam_layers(model, arch)
    return CheckpointMeta.model_validate({**fields, **overrides})


def write_checkpoint(
    path: Path, model: nn.Module, arch: str, classes: Sequence[str], **overrides: Any
) -> Path:
    """Save ``model`` with the sidecar ``checkpoint_meta(arch, classes, model, **overrides)``; the weights
    path."""
    return save_checkpoint(path, model, checkpoint_meta(arch, classes, model, **overrides))


# --- DICOM --------------------------------------------------------------------------------------------------
def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    **elements: object,
) -> Path:
    """An uncompressed (explicit VR little endian) secondary-capture DICOM of ``pixels`` ((H, W) or
    (frames, H, W), stored as 16-bit unsigned, or signed with ``signed``), modality DX, ``bits_stored`` bits
    used; ``elements`` set further data elements (``RescaleSlope=2.0``, ``NumberOfFrames=2`` ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- run directories ----------------------------------------------------------------------------------------
def write_manifest(
    paths: RunPaths, rows: Sequence[Mapping[str, Any]], classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """Write ``rows`` as the run's manifest (``data/manifest.parquet``) and, given ``classes``, the class list
    (``data/classes.json``); returns the manifest frame."""
    manifest = pd.DataFrame([dict(r) for r in rows])
    write_parquet_atomic(paths.manifest, manifest)
    if classes is not None:
        write_text_atomic(paths.data_dir / "classes.json", json.dumps(list(classes)))
    return manifest


def write_maps(
    paths: RunPaths,
    arch: str,
    stage: int,
    method: str,
    maps: torch.Tensor,
    ids: Sequence[str],
    layer: str,
    split_at: Sequence[int] = (),
    extra: Mapping[str, str] | None = None,
) -> None:
    """Store ``maps`` ((N, h, w) float) of images ``ids`` for (arch, stage, method) at ``layer``, in shards
    0, 1, ... that start at the indices ``split_at`` (one shard without)."""
    bounds = [0, *split_at, len(ids)]
    for shard, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        write_maps_shard(paths, arch, stage, method, shard, maps[lo:hi], list(ids[lo:hi]), layer, extra=extra)


def blob(h: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    """An (h, h) float32 Gaussian blob centred at (cy, cx) with standard deviation ``sigma`` (pixels)."""
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)


def make_synthetic_run(
    root: Path,
    classes: Sequence[str] = CLASSES,
    archs: Sequence[str] = ("densenet201", "resnet50v2"),
    methods: Sequence[str] = ("gradcam++", "layercam", "gradcam"),
    per_class: int = 3,
    size: int = 64,
) -> RunPaths:
    """A finished-looking drift run directory in the run-directory formats: config.yaml, phantom images and
    masks (``per_class`` test images + one train, one val per class; class 0's train image is skipped),
    manifest, classification table, maps store (8×8 blobs at the lesion, moved at stage 2, in two shards;
    the first arch/method's first stage-2 map is all zero), drift table, summary / rankings / reversals,
    localization summary."""
    paths = RunPaths.at(root)
    rng = np.random.default_rng(0)
    config = parse_config(
        {
            "models": [{"arch": a} for a in archs],
            "explain": {"methods": list(methods)},
            "report": {"examples": 2},
        }
    )
    write_text_atomic(paths.config, dump_yaml(config))
    rows, centres = [], {}
    for c, label in enumerate(classes):
        for k in range(per_class + 2):
            image, mask = render_phantom(CLASSES[c % len(CLASSES)], np.random.default_rng(100 * c + k), size)
            image_id = f"{c}_{k}"
            image_path = root / "images" / f"{image_id}.png"
            mask_path = root / "images" / f"{image_id}_mask.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image_path.write_bytes(to_png_bytes(image))
            mask_path.write_bytes(to_png_bytes(mask))
            split = "test" if k < per_class else ("train" if k == per_class else "val")
            status = "skipped: truncated PNG" if (c == 0 and k == per_class) else "ok"
            rows.append(
                {
                    "id": image_id,
                    "path": str(image_path),
                    "label": label,
                    "label_idx": c,
                    "split": split,
                    "patient_id": None,
                    "mask_path": str(mask_path),
                    "bbox": None,
                    "status": status,
                }
            )
            ys, xs = np.nonzero(mask)
            centres[image_id] = (ys.mean() / size * 8, xs.mean() / size * 8) if len(ys) else (4.0, 4.0)
    manifest = write_manifest(paths, rows, classes)
    test_ids = manifest.loc[(manifest["split"] == "test") & (manifest["status"] == "ok"), "id"].tolist()
    cls_rows, drift_rows = [], []
    for a, arch in enumerate(archs):
        for stage in (1, 2):
            acc = 0.6 + 0.1 * stage + 0.05 * a
            cls_rows.append(
                {
                    "arch": arch,
                    "stage": stage,
                    "n": len(test_ids),
                    "accuracy": acc,
                    "accuracy_lo": acc - 0.1,
                    "accuracy_hi": acc + 0.08,
                    "macro_f1": acc - 0.05,
                    "macro_f1_lo": acc - 0.15,
                    "macro_f1_hi": acc,
                    "macro_auroc": acc + 0.1,
                    "macro_auroc_lo": acc,
                    "macro_auroc_hi": 0.99,
                }
            )
        for m, method in enumerate(methods):
            maps1, maps2 = [], []
            for n, image_id in enumerate(test_ids):
                cy, cx = centres[image_id]
                maps1.append(blob(8, cy, cx, 1.2))
                shift = rng.normal(0, 1.0 + a + 0.5 * m, 2)
                maps2.append(blob(8, cy + shift[0], cx + shift[1], 1.5))
                if a == 0 and m == 0 and n == 0:
                    maps2[-1] = np.zeros((8, 8), np.float32)  # a degenerate stage-2 map
                iou = float(np.clip(0.9 - 0.12 * np.hypot(*shift), 0, 1))
                drift_rows.append(
                    {
                        "id": image_id,
                        "arch": arch,
                        "method": method,
                        "topk_iou@0.2": iou,
                        "centroid_shift": float(np.hypot(*shift) / 11.3),
                        "peak_shift": float(np.hypot(*shift) / 10),
                        "zone_tv": float(rng.uniform(0, 0.4)),
                        "spearman": float(rng.uniform(0.2, 1)),
                        "ssim": float(rng.uniform(0.3, 1)),
                        "js": float(rng.uniform(0, 0.3)),
                        "entropy_change": float(rng.normal(0, 0.05)),
                        "degenerate": False,
                        "degenerate_reason": "",
                    }
                )
                if a == 0 and m == 0 and n == 0:
                    drift_rows[-1].update(
                        {"topk_iou@0.2": float("nan"), "degenerate": True, "degenerate_reason": "b: all zero"}
                    )
            for stage, maps in ((1, maps1), (2, maps2)):
                write_maps(paths, arch, stage, method, torch.tensor(np.stack(maps)), test_ids, "layer", (3,))
    write_csv_atomic(paths.eval_table("classification").with_suffix(".csv"), pd.DataFrame(cls_rows))
    drift = pd.DataFrame(drift_rows)
    write_parquet_atomic(paths.drift, drift)
    summary_rows, rank_rows = [], []
    for metric in SYNTHETIC_METRICS:
        for method in methods:
            means = {}
            for arch in archs:
                v = drift.loc[(drift["arch"] == arch) & (drift["method"] == method), metric].dropna()
                means[arch] = float(v.mean())
                summary_rows.append(
                    {
                        "arch": arch,
                        "method": method,
                        "metric": metric,
                        "n": len(v),
                        "mean": v.mean(),
                        "median": v.median(),
                        "std": v.std(),
                        "ci_low": v.quantile(0.1),
                        "ci_high": v.quantile(0.9),
                    }
                )
            higher = metric in ("topk_iou@0.2", "spearman", "ssim")
            order = sorted(archs, key=lambda x: -means[x] if higher else means[x])
            rank_rows += [
                {"method": method, "metric": metric, "arch": x, "rank": order.index(x) + 1, "mean": means[x]}
                for x in archs
            ]
    write_csv_atomic(paths.summary, pd.DataFrame(summary_rows))
    write_csv_atomic(paths.rankings, pd.DataFrame(rank_rows))
    reversal = {
        "metric": "spearman",
        "method_a": methods[0],
        "method_b": methods[-1],
        "arch_x": archs[0],
        "arch_y": archs[-1],
        "diff_under_a": 0.05,
        "diff_under_b": -0.04,
        "significant_a": True,
        "significant_b": False,
    }
    write_csv_atomic(
        paths.reversals, pd.DataFrame([reversal] if len(archs) > 1 else [], columns=list(reversal))
    )
    loc_rows = [
        {
            "arch": arch,
            "method": method,
            "stage": stage,
            "metric": metric,
            "n": 10,
            "mean": 0.5 + 0.1 * stage,
            "ci_low": 0.4,
            "ci_high": 0.8,
        }
        for arch in archs
        for method in methods
        for stage in (1, 2)
        for metric in ("pointing_game", "energy_pointing_game", "mask_iou@0.2")
    ]
    write_csv_atomic(paths.root / "localization_summary.csv", pd.DataFrame(loc_rows))
    return paths


class BlobImages(torch.utils.data.Dataset):
    """Tiny 3-class images: a bright square in the left / middle / right third, noise, seeded flips."""

    def __init__(self, n: int, size: int = 32, seed: int = 0, augment: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, n)
        self.images = rng.normal(0, 0.3, (n, 3, size, size)).astype(np.float32)
        third = size // 3
        for i, label in enumerate(self.labels):
            self.images[i, :, size // 3 : 2 * size // 3, label * third : (label + 1) * third] += 2.0
        self.seed, self.augment, self.epoch = seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i])
        if self.augment and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            image = image.flip(1)  # vertical flip keeps the class
        return {"image": image, "label": int(self.labels[i]), "id": str(i), "index": i}
