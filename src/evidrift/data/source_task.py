"""The stage-0 ``source`` task (ARCHITECTURE §9): synthetic images whose classes are lesion-like patterns, not
chest X-ray classes, so that stage 0 pretrains a backbone on a task other than the target, offline.

``render_source`` draws one image (a pattern added to a lesion-free phantom chest or to a smooth synthetic
background); ``generate_source_set`` writes a deterministic, balanced set with its manifest, like
``phantom.generate_phantom_set``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from evidrift.core.errors import UsageError
from evidrift.core.io import write_csv_atomic
from evidrift.data.phantom import (
    default_workers,
    phantom_params,
    prepare_class_folders,
    render_phantom,
    run_image_jobs,
    to_png_bytes,
)
from evidrift.data.procedural import grid, ramp, smooth_noise, smoothstep

#: Classes of the stage-0 source task (synthetic patterns, textures and shapes; not chest X-ray classes).
SOURCE_CLASSES: tuple[str, ...] = (
    "empty",
    "dense_patch",
    "haze_bilateral",
    "reticular",
    "patchy_lower",
    "nodules_upper",
    "nodules_lower",
    "rings",
    "bands",
    "large_shape",
)

#: Version of the source-set generator (2: lesion-like patterns on lesion-free chests or smooth backgrounds,
#: replacing the shapes and stripes of version 1, whose features barely transferred to the phantom classes).
SOURCE_VERSION = 2

#: Share of source images drawn on a lesion-free phantom chest (the rest on smooth synthetic backgrounds).
SOURCE_CHEST_BACKGROUND = 0.5


def _source_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A varied smooth grey background float32 [S, S]: level, large-scale undulation, a linear gradient, soft
    large bright/dark ellipses and bands (distractors, the same for every class), fine texture."""
    x, y = grid(size)
    level = rng.uniform(0.22, 0.6)
    background = level + rng.uniform(0.02, 0.06) * smooth_noise(rng, size, int(rng.integers(2, 5)))
    angle = rng.uniform(0.0, 2 * math.pi)
    background = background + rng.uniform(0.0, 0.06) * (x * math.cos(angle) + y * math.sin(angle))
    for _ in range(int(rng.integers(0, 4))):  # large ellipses, soft or sharp edged, either sign
        cx, cy = rng.uniform(-0.8, 0.8, size=2)
        rx, ry = rng.uniform(0.15, 0.6, size=2)
        distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        inside = ramp(1.0 - distance, rng.uniform(0.03, 0.8))
        background = background + rng.uniform(-0.08, 0.04) * inside
    if rng.random() < 0.5:  # a soft straight band (bone-like), any orientation
        theta = rng.uniform(0.0, math.pi)
        offset = rng.uniform(-0.6, 0.6)
        across = x * math.cos(theta) + y * math.sin(theta) - offset
        background = background + rng.uniform(0.03, 0.08) * np.exp(
            -0.5 * (across / rng.uniform(0.03, 0.1)) ** 2
        )
    background = background + rng.uniform(0.005, 0.02) * smooth_noise(rng, size, 24)
    return background.astype(np.float32)


def _soft_blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Separable Gaussian float32 [S, S] centred at (cx, cy) with stds (rx, ry), peak 1."""
    return (np.exp(-0.5 * ((y - cy) / ry) ** 2) * np.exp(-0.5 * ((x - cx) / rx) ** 2)).astype(np.float32)


def _small_discs(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, count: int, ys: tuple[float, float], ring: bool
) -> np.ndarray:
    """``count`` small discs (or rings: bright rim, faint centre) of radius 0.05-0.1 with centres at
    |x| in [0.15, 0.75] (random side) and y in ``ys``; union (max) float32 [S, S] in [0, 1]."""
    field = np.zeros((y.shape[0], x.shape[1]), dtype=np.float32)
    for _ in range(count):
        cx = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.15, 0.75)
        cy = rng.uniform(*ys)
        radius = rng.uniform(0.05, 0.1)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
        if ring:
            shape = np.maximum(0.25 * ramp(1.2 - r, 0.3), np.exp(-0.5 * ((r - 1.0) / 0.2) ** 2) * (r < 1.6))
        else:
            shape = ramp(1.0 - r, 0.4)
        field = np.maximum(field, shape.astype(np.float32))
    return field


def _source_pattern(label: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The class-defining pattern of a source image, float32 [S, S] in about [0, 1] (0 = no change)."""
    x, y = grid(size)
    zeros = np.zeros((size, size), dtype=np.float32)
    if label == "empty":
        return zeros
    if label == "dense_patch":  # one dense, sharp-edged patch on one side
        side = float(rng.choice([-1.0, 1.0]))
        cx, cy = side * rng.uniform(0.3, 0.55), rng.uniform(-0.45, 0.45)
        field = zeros.copy()
        for _ in range(3):
            field += _soft_blob(
                x, y, cx + rng.normal(0, 0.07), cy + rng.normal(0, 0.07), *rng.uniform(0.1, 0.2, size=2)
            )
        shape = smoothstep((field * (1.0 + 0.3 * smooth_noise(rng, size, 12)) - 0.45) / 0.35)
        if rng.random() < 0.5:  # a straight sharp border on top, like a fissure
            shape = shape * ramp(y - (cy - rng.uniform(0.05, 0.15)), 0.02)
        return shape
    if label == "haze_bilateral":  # faint, diffuse haze on both sides near the middle
        field = zeros.copy()
        cy = rng.uniform(-0.3, 0.3)
        for side in (-1.0, 1.0):
            field += _soft_blob(
                x,
                y,
                side * rng.uniform(0.15, 0.4),
                cy + rng.normal(0, 0.08),
                *rng.uniform(0.12, 0.25, size=2),
            )
        return np.clip(field * (0.8 + 0.2 * smooth_noise(rng, size, 16)), 0.0, 1.0) * 0.6
    if label == "reticular":  # net-like texture in one or two soft regions
        net = 0.5 + 0.5 * np.cos(smooth_noise(rng, size, int(rng.integers(32, 56))) * 2.5)
        region = zeros.copy()
        for side in [-1.0, 1.0] if rng.random() < 0.5 else [float(rng.choice([-1.0, 1.0]))]:
            region += _soft_blob(
                x, y, side * rng.uniform(0.2, 0.5), rng.uniform(-0.4, 0.4), *rng.uniform(0.15, 0.3, size=2)
            )
        return np.clip(region, 0.0, 1.0) * net
    if label == "patchy_lower":  # blotchy patches along both outer edges of the lower half
        patches = smoothstep((smooth_noise(rng, size, 10) + 0.6) / 1.2)
        field = zeros.copy()
        for side in (-1.0, 1.0):
            for _ in range(2):
                field += _soft_blob(
                    x,
                    y,
                    side * rng.uniform(0.45, 0.75),
                    rng.uniform(0.15, 0.6),
                    *rng.uniform(0.08, 0.16, size=2),
                )
        return smoothstep((field * (0.5 + 0.7 * patches) - 0.25) / 0.5)
    if label == "nodules_upper":
        return _small_discs(rng, x, y, int(rng.integers(3, 8)), (-0.75, -0.15), ring=False)
    if label == "nodules_lower":
        return _small_discs(rng, x, y, int(rng.integers(3, 8)), (0.15, 0.75), ring=False)
    if label == "rings":
        return _small_discs(rng, x, y, int(rng.integers(2, 6)), (-0.75, 0.75), ring=True)
    if label == "bands":  # parallel (slightly curved) bands over part of the image
        theta = rng.uniform(0.0, math.pi)
        along = x * math.cos(theta) + y * math.sin(theta)
        across = -x * math.sin(theta) + y * math.cos(theta)
        bend = rng.uniform(-0.4, 0.4)
        period = rng.uniform(0.1, 0.22)
        waves = 0.5 + 0.5 * np.cos(
            2 * math.pi * (along + bend * across**2) / period + rng.uniform(0, 2 * math.pi)
        )
        region = _soft_blob(x, y, *rng.uniform(-0.4, 0.4, size=2), *rng.uniform(0.3, 0.6, size=2))
        return (waves**2 * np.minimum(region * 1.5, 1.0)).astype(np.float32)
    if label == "large_shape":  # a disc, square or triangle with sharp edges
        cx, cy = rng.uniform(-0.4, 0.4, size=2)
        radius = rng.uniform(0.2, 0.45)
        angle = rng.uniform(0.0, 2 * math.pi)
        u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
        v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
        edge = max(3.0 / size, 0.01)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            return ramp(radius - np.sqrt(u * u + v * v), edge)
        if kind == 1:
            return ramp(0.8 * radius - np.maximum(np.abs(u), np.abs(v)), edge)
        shape = np.ones((size, size), dtype=np.float32)
        for k in range(3):
            phi = 2 * math.pi * k / 3
            shape = shape * ramp(0.5 * radius - (u * math.cos(phi) + v * math.sin(phi)), edge)
        return shape
    raise UsageError(f"unknown source label {label!r}; choose one of {list(SOURCE_CLASSES)}")


def render_source(label: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of the source task: the pattern of class ``label`` (``SOURCE_CLASSES``) added, brighter, to
    a background, then exposure (gain, gamma) and noise. Returns float32 [S, S] in [0, 1].

    The patterns are the kinds of structure the chest phantoms' lesions are made of, at their scales (a dense
    patch, diffuse bilateral haze, reticular texture, lower peripheral patches, small nodules up or down,
    rings, bands, large shapes), placed anywhere in the image whatever the anatomy. The background is, with
    probability ``SOURCE_CHEST_BACKGROUND``, a lesion-free phantom chest (``render_phantom("normal")``: the
    backbone learns to find patterns against ribs, heart and lung fields, but no target label or lesion is
    used), else a varied smooth background with distractors (undulation, gradient, ellipses, a band, the
    same for every class). Measured with ``test_resnet`` at 96 px, 600 source images, 15 stage-0 epochs:
    stage-1 test accuracy 0.46 and stage 2 0.64 on 500 phantoms, against 0.30 and 0.55 with the shapes and
    stripes of source version 1."""
    if label not in SOURCE_CLASSES:
        raise UsageError(f"unknown source label {label!r}; choose one of {list(SOURCE_CLASSES)}")
    if size < 32:
        raise UsageError(f"source image size must be >= 32 pixels, got {size}")
    if rng.random() < SOURCE_CHEST_BACKGROUND:
        background = render_phantom("normal", rng, size)[0]
    else:
        background = _source_background(rng, size)
    pattern = _source_pattern(label, rng, size)
    amplitude = rng.uniform(0.15, 0.5)
    image = np.clip(background + amplitude * pattern, 1e-3, 1.0) ** rng.uniform(0.85, 1.15)
    image = image * rng.uniform(0.9, 1.1) + rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(
        0.008, 0.03
    )
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _source_job(job: tuple[int, str, np.random.SeedSequence, int, bool, str]) -> dict[str, object]:
    index, label, seed, size, _, root = job
    image = render_source(label, np.random.default_rng(seed), size)
    rel = f"images/{label}/{label}_{index:05d}.png"
    Path(root, rel).write_bytes(to_png_bytes(image))
    return {"path": rel, "label": label}


def source_params(n: int, size: int, seed: int) -> dict:
    """The parameters that fully determine a generated source set (compared before reusing one)."""
    return phantom_params(n, size, seed, kind="source", version=SOURCE_VERSION)


def generate_source_set(
    out_dir: str | os.PathLike[str],
    n: int,
    size: int,
    seed: int,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the stage-0 source set: ``n`` images balanced over ``SOURCE_CLASSES`` as
    ``images/{label}/{label}_{i:05d}.png`` plus ``manifest.csv`` (path, label) and ``params.json``.
    Deterministic by seed like ``generate_phantom_set``. Returns the manifest path."""
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    root = Path(out_dir)
    prepare_class_folders(root, SOURCE_CLASSES, ("images",))
    seeds = np.random.SeedSequence([seed, 0x50C]).spawn(n)
    jobs = [(i, SOURCE_CLASSES[i % len(SOURCE_CLASSES)], seeds[i], size, False, str(root)) for i in range(n)]
    workers = default_workers(n) if workers is None else max(1, workers)
    rows = run_image_jobs(_source_job, jobs, workers, progress, "source set")
    import pandas as pd

    from evidrift.core.io import write_json_atomic

    manifest = write_csv_atomic(root / "manifest.csv", pd.DataFrame(rows))
    write_json_atomic(root / "params.json", source_params(n, size, seed))
    return manifest
