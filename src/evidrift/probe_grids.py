"""The GridPG inputs of the probing study: n × n grids that tile test images of different classes into
one input, their cells, and the smoothing applied to maps before they are scored
(``metrics.localization.gridpg``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def cell_edges(size: int, n: int) -> list[int]:
    """Pixel boundaries of n cells along a side of ``size`` pixels: n + 1 ints from 0 to size, edge r =
    ceil(r · size / n), so that pixel i lies in cell floor(i · n / size) — the cells of
    ``metrics.localization.gridpg``."""
    if n < 1 or size < n:
        raise ValueError(f"cannot split {size} pixels into {n} cells")
    return [-(-r * size // n) for r in range(n + 1)]


def cell_masks(height: int, width: int, n: int) -> torch.Tensor:
    """bool [n², H, W]: the cells of an n × n grid in row-major order (cell k = row k // n, column k % n)."""
    rows, cols = cell_edges(height, n), cell_edges(width, n)
    masks = torch.zeros(n * n, height, width, dtype=torch.bool)
    for k in range(n * n):
        r, c = divmod(k, n)
        masks[k, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = True
    return masks


def tile_grid(images: torch.Tensor, cells: Sequence[int], n: int, fill: float = 0.0) -> torch.Tensor:
    """One n × n grid input: image i [3, S, S] downscaled (bilinear, antialiased) into cell ``cells[i]``.

    images [m, 3, H, W] float32 (m ≤ n², already normalized) → [3, H, W]; cells without an image hold
    ``fill``. Cells are row-major (``cell_masks``); ``cells`` must be distinct.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [m, 3, H, W], got shape {tuple(images.shape)}")
    if (
        len(set(cells)) != len(cells)
        or len(cells) != images.shape[0]
        or not all(0 <= c < n * n for c in cells)
    ):
        raise ValueError(f"cells {list(cells)} must be {images.shape[0]} distinct indices in [0, {n * n})")
    _, channels, height, width = images.shape
    rows, cols = cell_edges(height, n), cell_edges(width, n)
    grid = torch.full((channels, height, width), float(fill), dtype=images.dtype)
    for image, cell in zip(images, cells, strict=True):
        r, c = divmod(cell, n)
        h, w = rows[r + 1] - rows[r], cols[c + 1] - cols[c]
        small = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[
            0
        ]
        grid[:, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = small
    return grid


@dataclass(frozen=True)
class GridSpec:
    """One grid: ``n`` × ``n`` cells; ``images[i]`` (an index into the pool) sits in cell ``cells[i]`` and is
    of class ``classes[i]``."""

    grid_id: str
    n: int
    images: tuple[int, ...]
    cells: tuple[int, ...]
    classes: tuple[int, ...]


def sample_grids(
    labels: torch.Tensor, eligible: torch.Tensor, n: int, n_grids: int, seed: int
) -> list[GridSpec]:
    """Seeded GridPG grids of n × n cells from the eligible images, one image per class per grid.

    labels int64 [N], eligible bool [N]. Each grid draws min(n², #classes with an eligible image) distinct
    classes, one eligible image of each, in random distinct cells. Returns [] when fewer than two classes
    have an eligible image (a grid needs a competitor).
    """
    rng = np.random.default_rng([seed, n])
    pools: dict[int, np.ndarray] = {}
    for cls in sorted(set(labels[eligible].tolist())):
        pools[cls] = np.flatnonzero((labels == cls).numpy() & eligible.numpy())
    classes = np.array(sorted(pools))
    if len(classes) < 2:
        return []
    per_grid = min(n * n, len(classes))
    grids = []
    for g in range(n_grids):
        chosen = rng.choice(classes, size=per_grid, replace=False)
        picks = tuple(int(rng.choice(pools[int(c)])) for c in chosen)
        cells = tuple(int(c) for c in rng.choice(n * n, size=per_grid, replace=False))
        grids.append(GridSpec(f"grid{n}-{g:04d}", n, picks, cells, tuple(int(c) for c in chosen)))
    return grids


def smooth_maps(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """k × k average pooling with stride 1 (edges averaged over the valid pixels): [N, H, W] → [N, H, W].

    ``kernel`` odd; 1 returns the maps unchanged (as in the "How to Probe" GridPG code, k = 5).
    """
    if kernel == 1:
        return maps
    if kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be odd, got {kernel}")
    pooled = F.avg_pool2d(
        maps[:, None].float(), kernel, stride=1, padding=kernel // 2, count_include_pad=False
    )
    return pooled[:, 0]
