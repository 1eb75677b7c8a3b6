"""The study's image sets: phantoms with reports, planted markers and lesion-free twins, in memory.

Three sets from independent seeds (``SeedSequence([seed, set index])``, image i the i-th child):
``base`` (pretraining of the text encoder and the base model), ``finetune`` (the variants) and ``test``
(attention maps, real features). Classes cycle through ``evidrift.data.phantom.CLASSES``. Phantoms are
rendered at max(size, 32) px (the generator's minimum) and area-averaged down to ``size`` when smaller; the
mask is downsampled by "any lesion pixel in the cell".

Planted marker (the marker gate): a bright square of ``marker_size`` px at a random position in the central
80 % of the image, drawn after rendering (so an image and its twin carry the same marker); its report ends
with ``marker``. Base and fine-tune images carry one with probability ``marker``; test images alternately
per class cycle (images 0–4 yes, 5–9 no, ...), so that both halves are balanced over classes.

Twin: every test image is rendered a second time from the same generator without its lesion
(``render_phantom(with_lesion=False)``), marker included; image − twin is non-zero exactly on the lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evidrift.data.phantom import CLASSES, render_phantom
from evidrift.data.reports import report_text
from evidrift.studies.diffusion.config import DataSection

SET_NAMES = ("base", "finetune", "test")


@dataclass(frozen=True)
class ImageSet:
    """One set: ``images`` float32 [N, S, S] in [0, 1], ``masks`` bool [N, S, S] (lesion), ``markers`` bool
    [N, S, S] (planted marker, empty when none), ``twins`` float32 [N, S, S] (lesion-free, test set only,
    else None), ``labels`` / ``reports`` / ``ids`` (N str)."""

    images: np.ndarray
    masks: np.ndarray
    markers: np.ndarray
    labels: list[str]
    reports: list[str]
    ids: list[str]
    twins: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self, images: np.ndarray | None = None) -> torch.Tensor:
        """float32 [N, 1, S, S] in [-1, 1] (the diffusion models' input range)."""
        x = torch.from_numpy(self.images if images is None else images).float()
        return (x * 2.0 - 1.0)[:, None]

    def arrays(self) -> dict[str, np.ndarray]:
        """The set as named numpy arrays (``save_set``/``load_set`` of the pipeline)."""
        out = {
            "images": self.images,
            "masks": self.masks,
            "markers": self.markers,
            "labels": np.asarray(self.labels),
            "reports": np.asarray(self.reports),
            "ids": np.asarray(self.ids),
        }
        if self.twins is not None:
            out["twins"] = self.twins
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ImageSet:
        return cls(
            images=arrays["images"],
            masks=arrays["masks"],
            markers=arrays["markers"],
            labels=[str(v) for v in arrays["labels"]],
            reports=[str(v) for v in arrays["reports"]],
            ids=[str(v) for v in arrays["ids"]],
            twins=arrays.get("twins"),
        )


def _downsample(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[0] == size:
        return image, mask
    x = torch.from_numpy(image)[None, None]
    small = F.adaptive_avg_pool2d(x, size)[0, 0].numpy()
    m = F.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], size)[0, 0].numpy()
    return small.astype(np.float32), m > 0


def plant_marker(rng: np.random.Generator, size: int, side: int) -> np.ndarray:
    """bool [size, size]: a ``side`` × ``side`` square at a random position in the central 80 %."""
    low, high = int(0.1 * size), max(int(0.1 * size) + 1, int(0.9 * size) - side)
    row, col = int(rng.integers(low, high)), int(rng.integers(low, high))
    marker = np.zeros((size, size), dtype=bool)
    marker[row : row + side, col : col + side] = True
    return marker


def render_set(section: DataSection, name: str) -> ImageSet:
    """Render the set ``name`` (``base``, ``finetune`` or ``test``) of ``section``."""
    if name not in SET_NAMES:
        raise ValueError(f"unknown image set {name!r}; one of {SET_NAMES}")
    index = SET_NAMES.index(name)
    n = {"base": section.n_base, "finetune": section.n_finetune, "test": section.n_test}[name]
    children = np.random.SeedSequence([section.seed, index]).spawn(n)
    marker_rng = np.random.default_rng(np.random.SeedSequence([section.seed, index, 0x3A7C]))
    render_size = max(32, section.size)
    images, masks, markers, twins, labels, reports, ids = [], [], [], [], [], [], []
    for i, child in enumerate(children):
        label = CLASSES[i % len(CLASSES)]
        image, mask = render_phantom(label, np.random.default_rng(child), render_size)
        image, mask = _downsample(image, mask, section.size)
        has_marker = (
            (i // len(CLASSES)) % 2 == 0 if name == "test" else bool(marker_rng.random() < section.marker)
        )
        marker = plant_marker(marker_rng, section.size, section.marker_size) if has_marker else None
        marker = marker if marker is not None else np.zeros_like(mask)
        image = np.where(marker, np.float32(1.0), image)
        if name == "test":
            twin, _ = render_phantom(label, np.random.default_rng(child), render_size, with_lesion=False)
            twin, _ = _downsample(twin, mask, section.size)
            twins.append(np.where(marker, np.float32(1.0), twin))
        images.append(image)
        masks.append(mask)
        markers.append(marker)
        labels.append(label)
        reports.append(report_text(label, mask, marker=bool(marker.any())))
        ids.append(f"{name}_{i:05d}")
    return ImageSet(
        images=np.stack(images).astype(np.float32),
        masks=np.stack(masks),
        markers=np.stack(markers),
        labels=labels,
        reports=reports,
        ids=ids,
        twins=np.stack(twins).astype(np.float32) if twins else None,
    )
