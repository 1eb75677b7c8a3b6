"""Vectorised float32 primitives of the procedural images (the chest phantoms and the stage-0 source task).

Coordinates are separable pixel-centre grids in [-1, 1] (x [1, S] across, y [S, 1] down), so profiles along
one axis cost 1-D work; noise is a seeded lattice bilinearly upsampled with gathers and multiply-adds only,
so every value is bit-identical on every machine.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (x [1, S] left → right, y [S, 1] top → bottom), float32."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return axis[None, :], axis[:, None]


@lru_cache(maxsize=32)
def _interp_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel: the lower lattice index (int64 [S]) and the weight of the upper one (float32 [S]) of a
    linear interpolation from a ``cells`` lattice spanning the image."""
    position = (np.arange(size, dtype=np.float64) + 0.5) / size * cells
    low = np.minimum(np.floor(position).astype(np.int64), cells - 1)
    return low, (position - low).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise float32 [S, S] (about unit std): a ``cells`` lattice of N(0, 1), bilinear upsampled.

    Gathers and multiply-adds only (no BLAS), so the values are bit-identical on every machine."""
    lattice = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    low, frac = _interp_weights(size, cells)
    rows = lattice[low] * (1.0 - frac)[:, None] + lattice[low + 1] * frac[:, None]  # [S, cells + 1]
    return (rows[:, low] * (1.0 - frac)[None, :] + rows[:, low + 1] * frac[None, :]).astype(np.float32)


def ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for value <= -width/2, 1 for value >= width/2, linear between (exact zeros outside)."""
    return np.clip(value * (1.0 / width) + 0.5, 0.0, 1.0)


def smoothstep(value: np.ndarray) -> np.ndarray:
    """3t² − 2t³ of t clipped to [0, 1]."""
    t = np.clip(value, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def periodic_bands(
    w: np.ndarray, first: float, spacing: float, growth: float, count: int, thickness: float
) -> np.ndarray:
    """Bands along the coordinate ``w``: band k centred at first + k·spacing + k²·growth (k = 0..count-1),
    Gaussian profile of std ``thickness``; returns float32 like ``w`` in [0, 1]."""
    shifted = np.maximum(w - first, -spacing)
    if growth > 0:
        k = (-spacing + np.sqrt(np.maximum(spacing * spacing + 4.0 * growth * shifted, 0.0))) / (2.0 * growth)
    else:
        k = shifted / spacing
    nearest = np.clip(np.rint(k), 0, count - 1)
    local = spacing + 2.0 * growth * nearest
    distance = (k - nearest) * local
    return np.exp(-0.5 * (distance / thickness) ** 2).astype(np.float32)
