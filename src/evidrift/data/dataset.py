"""A torch Dataset over manifest rows (ARCHITECTURE §3): reads, preprocesses and (optionally) augments images.

Augmentation is deterministic per (seed, epoch, index): every item draws from its own ``torch.Generator``
seeded by ``SeedSequence([seed, epoch, index])``, so results do not depend on the worker count or the order
in which a DataLoader asks for items. Call ``set_epoch(epoch)`` at the start of each epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from evidrift.core.errors import DataError
from evidrift.data.readers import ImageReadError, read_image, read_mask
from evidrift.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of one item's augmentation."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(
        2, np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1]))


class ManifestDataset(Dataset[dict[str, Any]]):
    """Items of a manifest frame (rows with status ``ok``; pass ``frame[frame.status == "ok"]``).

    ``__getitem__(i)`` → dict(image float32 [3, S, S] normalized, label int, id str, index int, and when
    ``with_mask``: mask float32 [S, S] in {0, 1} (zeros when the row has no mask), has_mask bool).
    ``label`` is ``label_idx`` when the frame has it, else the label's index in ``classes``.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        classes: Sequence[str],
        size: int,
        resize: str = "pad",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        with_mask: bool = False,
        seed: int = 0,
    ) -> None:
        if "status" in frame.columns and (frame["status"] != "ok").any():
            bad = frame.loc[frame["status"] != "ok", "path"].iloc[0]
            raise ValueError(
                f"ManifestDataset needs rows with status 'ok'; e.g. {bad} is not (filter the frame)"
            )
        self.frame = frame.reset_index(drop=True)
        self.classes = list(classes)
        self.paths = self.frame["path"].astype(str).tolist()
        self.ids = (
            self.frame["id"].astype(str).tolist()
            if "id" in self.frame
            else [str(i) for i in range(len(frame))]
        )
        if "label_idx" in self.frame:
            self.labels = [int(v) for v in self.frame["label_idx"]]
        else:
            unknown = sorted(set(self.frame["label"]) - set(self.classes))
            if unknown:
                raise DataError(f"labels {unknown} are not in classes {self.classes}")
            self.labels = [self.classes.index(v) for v in self.frame["label"]]
        masks = self.frame["mask_path"] if "mask_path" in self.frame else [None] * len(self.frame)
        self.mask_paths = [m if isinstance(m, str) and m else None for m in masks]
        self.with_mask = with_mask
        self.seed = seed
        self.epoch = 0
        self.preprocess = Preprocess(size, resize, mean, std, augment=augment, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not os.path.isfile(self.paths[index]):
            raise ImageReadError(
                f"{self.paths[index]}: no such file; it was listed by the data step (run/data/manifest"
                ".parquet) and has since been moved or deleted: restore it, or rerun `evidrift run "
                "study.yaml` (the data step notices the change and rebuilds the manifest; `--force data` "
                "rebuilds it in any case)"
            )
        image = read_image(self.paths[index])
        mask_path = self.mask_paths[index]
        mask = None
        if self.with_mask:
            mask = read_mask(mask_path) if mask_path is not None else np.zeros(image.shape, dtype=bool)
            if mask.shape != image.shape:
                raise DataError(
                    f"mask {mask_path} is {mask.shape} but image {self.paths[index]} is {image.shape}"
                )
        generator = None
        if self.preprocess.augment:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        tensor, target = self.preprocess(image, mask, generator)
        item: dict[str, Any] = {
            "image": tensor,
            "label": self.labels[index],
            "id": self.ids[index],
            "index": index,
        }
        if self.with_mask:
            item["mask"] = target
            item["has_mask"] = mask_path is not None
        return item
