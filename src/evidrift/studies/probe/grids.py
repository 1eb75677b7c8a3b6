"""The GridPG inputs of the probing study: n × n grids that concatenate full-size test images of different
classes into one n·S-pixel input (as the reference's ``create_point_grid_dataset.py``), their cells, and the
smoothing applied to the signed maps before they are clipped and scored (``metrics.localization.gridpg``)."""

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
    """One n × n grid input at full resolution, as the reference builds it (images concatenated, not resized):
    image i [C, S, S] goes to cell ``cells[i]``, so the grid is [C, n·S, n·S] and every cell is exactly one
    image. images [m, C, S, S] float32 (m ≤ n², already normalized); cells without an image hold ``fill``.
    Cells are row-major (``cell_masks``); ``cells`` must be distinct."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square [m, C, S, S], got shape {tuple(images.shape)}")
    if (
        len(set(cells)) != len(cells)
        or len(cells) != images.shape[0]
        or not all(0 <= c < n * n for c in cells)
    ):
        raise ValueError(f"cells {list(cells)} must be {images.shape[0]} distinct indices in [0, {n * n})")
    _, channels, side, _ = images.shape
    grid = torch.full((channels, n * side, n * side), float(fill), dtype=images.dtype)
    for image, cell in zip(images, cells, strict=True):
        r, c = divmod(cell, n)
        grid[:, r * side : (r + 1) * side, c * side : (c + 1) * side] = image
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
    """k × k average pooling with stride 1 and zero padding k // 2, the padded zeros counted (the reference's
    ``F.avg_pool2d(map, 5, padding=2, stride=1)``): [N, H, W] → [N, H, W]. Applied to *signed* maps before
    their negative values are clipped. ``kernel`` odd; 1 returns the maps unchanged."""
    if kernel == 1:
        return maps
    if kernel % 2 == 0:
        raise ValueError(f"smoothing kernel must be odd, got {kernel}")
    return F.avg_pool2d(maps[:, None].float(), kernel, stride=1, padding=kernel // 2)[:, 0]


def reference_postprocess(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """The reference's order for GridPG and entropy: smooth the signed maps [N, H, W] (``smooth_maps``), then
    clip negative values to 0. float32 [N, H, W] ≥ 0."""
    return smooth_maps(maps.float(), kernel).clamp_min(0.0)
