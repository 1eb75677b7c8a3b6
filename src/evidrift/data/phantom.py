"""Procedural chest X-ray phantoms with exact lesion masks (ARCHITECTURE §9), and the writing of generated
sets.

A phantom is a PA (posteroanterior) chest radiograph seen from the viewer: the patient's right is on the
image's left, so the heart bulges to the image's right. Anatomy: soft-tissue thorax with shoulders and neck,
two lung fields (dark; deepest lucency mid-field) with diaphragm domes (the right one higher) and vascular
markings fanning out from the hila, the cardiomediastinal silhouette (aortic knob, left ventricle reaching
towards the left costophrenic angle), trachea, spine, posterior and anterior ribs (curved bright bands),
clavicles, a gastric air bubble under the left dome. Each image jitters patient position, scale and build,
lung size, apex and dome heights, heart size, rib spacing, exposure (gain, offset, gamma) and noise level.

Classes and their lesions (intensity added to the lung fields; the mask is exactly where it was added):

- ``normal``: no lesion, empty mask.
- ``bacterial_pneumonia``: dense lobar consolidation in one lung, middle/lower zone, sharp upper border.
- ``viral_pneumonia``: bilateral perihilar interstitial (reticular) haze.
- ``covid19``: bilateral peripheral lower-zone patchy ground-glass opacity (overlaps viral pneumonia).
- ``tuberculosis``: upper-zone nodules and cavities (bright rim, fainter centre), one or both lungs.

Everything is vectorised numpy on float32 grids (coordinates are separable: u [1, S] across, v [S, 1] down,
so profiles along one axis cost 1-D work; primitives in ``procedural``); one image is a pure function of its
``numpy.random.Generator``, so a set is deterministic by seed (per-image seeds from ``SeedSequence.spawn``)
and PNG files are written with fixed settings, making the same seed produce byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from evidrift.core.errors import UsageError
from evidrift.core.io import write_csv_atomic
from evidrift.data.procedural import grid, periodic_bands, ramp, smooth_noise, smoothstep

CLASSES: tuple[str, ...] = ("normal", "bacterial_pneumonia", "viral_pneumonia", "covid19", "tuberculosis")

#: Version of the generator; part of the parameters that decide whether a generated set can be reused.
#: 2: larger bacterial consolidations (mean 4.1% of a 128-px image, min 1.6%; version 1: 2.4%, min 0.7%,
#: the class the demo's models confused most with ``normal``) and denser COVID-19 opacities (0.12-0.18,
#: was 0.10-0.15); the other classes and every lesion-free image are unchanged.
PHANTOM_VERSION = 2

#: Where the class-correlated marker sits (a shortcut): (row, column) anchors in units of the image side.
_MARKER_ANCHORS: dict[str, tuple[float, float]] = {
    "normal": (0.04, 0.04),
    "bacterial_pneumonia": (0.04, 0.80),
    "viral_pneumonia": (0.86, 0.04),
    "covid19": (0.86, 0.80),
    "tuberculosis": (0.04, 0.42),
}

# 5 x 7 bitmap glyphs for the burnt-in marker text (no font files needed, identical everywhere).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
}

#: zlib level of every PNG written (fixed: same seed → same bytes); 1 is 2x faster than 6, files +15%.
PNG_COMPRESS_LEVEL = 1

#: Least intensity a lesion pixel adds (before the detector response, whose slope is >= 0.75 in the lungs).
LESION_FLOOR = 2.0 / 255.0


# --- the chest ----------------------------------------------------------------------------------------------
class _Anatomy:
    """Per-image anatomy: local coordinates, lung fields and the lesion-free attenuation image."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        x, y = grid(size)
        self.size = size
        # patient position, scale and build (local coordinates: u [1, S] across, v [S, 1] down; keeping them
        # separable makes every profile along one axis a 1-D computation)
        cx, cy = rng.normal(0.0, 0.03), rng.normal(0.02, 0.03)
        scale = rng.uniform(1.0, 1.12)
        aspect = rng.uniform(0.95, 1.05)
        u = ((x - cx) / (scale * aspect)).astype(np.float32)
        v = ((y - cy) / scale).astype(np.float32)
        a = np.abs(u)
        self.u, self.v, self.a = u, v, a
        edge = max(3.0 / size, 0.008)  # soft edges ~1.5 px

        # body: half-width profile along v (neck, shoulders, chest wall), thicker in the middle
        width_v = np.interp(
            v, [-1.3, -0.98, -0.86, -0.74, -0.3, 0.5, 1.3], [0.24, 0.26, 0.7, 0.96, 0.97, 0.93, 0.9]
        ).astype(np.float32) * np.float32(rng.uniform(0.96, 1.04))
        inside = ramp(width_v - a, 0.04)
        thickness = np.sqrt(np.clip(1.0 - (a / width_v) ** 2, 0.0, 1.0))
        body = inside * (0.42 + 0.26 * thickness)

        # lungs: apex v_apex, costophrenic angles v_base, medial edge, lateral edge, diaphragm domes
        v_apex = rng.uniform(-0.80, -0.72)
        v_base = rng.uniform(0.46, 0.56)
        lung_width = rng.uniform(0.66, 0.74)
        # the patient's right hemidiaphragm (image left) sits higher
        right_dome_lift = rng.uniform(0.02, 0.07)
        t = np.clip((v - v_apex) / (v_base - v_apex), 0.0, 1.0)
        medial = 0.07 + 0.04 * t
        lateral = 0.075 + lung_width * np.sqrt(t * (2.0 - t)) * (1.0 + 0.04 * t)
        lift = np.where(u < 0, np.float32(right_dome_lift), np.float32(0.0))
        dome = v_base - 0.26 * np.exp(-(((a - 0.36) / 0.26) ** 2)) - lift
        lungs = (
            ramp(a - medial, edge * 2)
            * ramp(lateral - a, edge * 3)
            * ramp(dome - v, edge * 2)
            * ramp(v - v_apex, edge * 4)
        ).astype(np.float32)
        # lucency is deepest in the middle of each field; periphery and bases overlap more soft tissue
        core = ramp(lateral - a - 0.06, 0.16) * ramp(dome - v - 0.04, 0.2) * ramp(a - medial - 0.02, 0.1)

        # heart (the patient's left = the image's right), aortic knob, trachea
        # cardiomediastinal silhouette: left border (aortic knob, pulmonary trunk, left ventricle to the apex)
        # and right border (superior vena cava, right atrium), as half-widths along v
        heart_size = rng.uniform(0.9, 1.12)
        heart_drop = rng.normal(0.0, 0.02)
        levels = (
            np.array([-0.5, -0.36, -0.3, -0.2, -0.08, 0.08, 0.24, 0.38, 0.5], dtype=np.float32) + heart_drop
        )
        left = np.array([0.09, 0.17, 0.175, 0.15, 0.2, 0.33, 0.41, 0.43, 0.4], dtype=np.float32)
        right = np.array([0.08, 0.09, 0.09, 0.1, 0.12, 0.16, 0.19, 0.19, 0.17], dtype=np.float32)
        left[3:] *= heart_size
        right[4:] *= 0.5 + 0.5 * heart_size
        left_v = np.interp(v, levels, left).astype(np.float32)
        right_v = np.interp(v, levels, right).astype(np.float32)
        cardiac = ramp(left_v - u, 0.03) * ramp(u + right_v, 0.03) * ramp(v - levels[0], 0.1)
        lungs = lungs * (1.0 - cardiac)
        self.lungs = lungs
        trachea = ramp(0.032 - np.abs(u + 0.01 * (v + 0.4)), 0.02) * ramp(-0.34 - v, 0.08)

        # lung markings: vessels fanning out from the hila, fading to the periphery
        du_h, dv_h = a - 0.16, v + 0.02
        radius = np.sqrt(du_h * du_h + dv_h * dv_h)
        theta = np.arctan2(dv_h, du_h)  # mirrored: the same formula serves both hila
        coarse = np.clip(rng.standard_normal((2, 91)), 0.0, None)
        coarse[:, -1] = coarse[:, 0]
        fine_axis = np.linspace(0.0, 90.0, 721)[:-1]
        tables = np.stack([np.interp(fine_axis, np.arange(91), row) for row in coarse]).astype(np.float32)
        index = np.minimum(((theta + math.pi) * (720 / (2 * math.pi))).astype(np.intp), 719)
        index += (u > 0) * 720
        markings = tables.ravel()[index] * np.exp(-radius / 0.3)
        hilum = np.exp(-(((a - 0.17) / 0.07) ** 2 + ((v + 0.02) / 0.14) ** 2))
        lung_density = (
            0.05 * markings + 0.06 * hilum + 0.012 * smooth_noise(rng, size, 24) + 0.04 * smoothstep(t - 0.5)
        )

        # bones: spine, posterior ribs, anterior ribs, clavicles (ribs hidden below the domes)
        spine = ramp(0.065 - a, 0.02) * (0.05 + 0.02 * np.cos(2 * math.pi * v / 0.11))
        rib_first = rng.uniform(-0.80, -0.74)
        rib_space = rng.uniform(0.095, 0.105)
        chest = ramp(lateral + 0.1 - a, 0.06) * ramp(dome + 0.06 - v, 0.08)
        posterior_w = v - (-0.22 * a + 0.56 * a * a)
        posterior = periodic_bands(posterior_w, rib_first, rib_space, 0.004, 10, 0.016)
        posterior = posterior * ramp(a - 0.06, 0.04) * chest
        anterior_w = v - (0.5 * (0.85 - a) - 0.22 * (0.85 - a) ** 2)
        anterior = periodic_bands(anterior_w, rib_first + 0.04, rib_space * 1.15, 0.002, 7, 0.015)
        anterior = anterior * ramp(a - 0.3, 0.1) * chest
        clavicle_v = -0.7 - 0.30 * a + 0.30 * a * a + rng.normal(0.0, 0.015)
        clavicle = np.exp(-0.5 * ((v - clavicle_v) / 0.024) ** 2) * ramp(a - 0.07, 0.04) * ramp(0.7 - a, 0.08)
        bones = 0.075 * posterior + 0.03 * anterior + 0.12 * clavicle + spine
        # gastric air bubble under the left hemidiaphragm (the image's right)
        bubble_v = v_base - 0.26 * math.exp(-(((0.4 - 0.36) / 0.26) ** 2)) + 0.1
        bubble = float(rng.random() < 0.7) * np.exp(
            -(((u - 0.4) / 0.09) ** 2 + ((v - bubble_v) / 0.045) ** 2)
        )

        air = rng.uniform(0.34, 0.42)
        self.base = (
            body
            - lungs * (air * (0.72 + 0.28 * core) - lung_density)
            - 0.1 * bubble * (1.0 - lungs)
            - 0.16 * trachea * inside
            + 0.04 * cardiac * ramp(dome - v, 0.05)
            + bones * inside
        ).astype(np.float32)
        # exposure / detector response (strictly increasing, so lesion pixels stay distinguishable)
        self.gamma = float(rng.uniform(0.9, 1.12))
        self.gain = float(rng.uniform(0.9, 1.15))
        self.offset = float(rng.uniform(0.01, 0.05))
        self.noise_std = float(rng.uniform(0.008, 0.016))


def _zone_box(anatomy: _Anatomy, side: float) -> np.ndarray:
    """1 inside the lung of ``side`` (-1 image left = patient right, +1 image right), else 0 (soft edge)."""
    return anatomy.lungs * (anatomy.u * side > 0)


def _blob(anatomy: _Anatomy, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """Gaussian blob float32 [S, S] in local coordinates (separable: an outer product of two 1-D profiles)."""
    across = np.exp(-0.5 * ((anatomy.u - cu) / ru) ** 2)
    down = np.exp(-0.5 * ((anatomy.v - cv) / rv) ** 2)
    return (down * across).astype(np.float32)


def _lesion(label: str, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Lesion intensity float32 [S, S] >= 0 for ``label`` (zero for ``normal``); draws from ``rng``."""
    size = anatomy.size
    lesion = np.zeros((size, size), dtype=np.float32)
    if label == "normal":
        return lesion
    texture = smooth_noise(rng, size, 16)
    fine = smooth_noise(rng, size, 48)
    if label == "bacterial_pneumonia":
        side = float(rng.choice([-1.0, 1.0]))
        cv = rng.uniform(0.05, 0.32)
        cu = side * rng.uniform(0.36, 0.55)
        field = np.zeros_like(lesion)
        for _ in range(3):
            field += _blob(
                anatomy,
                cu + rng.normal(0, 0.06),
                cv + rng.normal(0, 0.06),
                rng.uniform(0.13, 0.2),
                rng.uniform(0.12, 0.19),
            )
        fissure = cv - rng.uniform(0.12, 0.22)
        shape = smoothstep((field * (1.0 + 0.3 * texture) - 0.4) / 0.35) * ramp(anatomy.v - fissure, 0.02)
        lesion = rng.uniform(0.2, 0.3) * shape * (0.85 + 0.15 * np.tanh(fine)) * _zone_box(anatomy, side)
    elif label == "viral_pneumonia":
        field = np.zeros_like(lesion)
        for side in (-1.0, 1.0):
            cu = side * rng.uniform(0.2, 0.38)
            field += _blob(
                anatomy, cu, rng.uniform(-0.05, 0.18), rng.uniform(0.14, 0.2), rng.uniform(0.18, 0.28)
            )
        reticular = 0.5 + 0.5 * np.cos(fine * 2.5)
        shape = smoothstep((field * (1.0 + 0.3 * texture) - 0.3) / 0.5) * (0.4 + 0.6 * reticular)
        lesion = rng.uniform(0.1, 0.15) * shape * anatomy.lungs
    elif label == "covid19":
        field = np.zeros_like(lesion)
        for side in (-1.0, 1.0):
            for _ in range(2):
                cu = side * rng.uniform(0.4, 0.66)
                cv = rng.uniform(0.05, 0.35)
                field += _blob(anatomy, cu, cv, rng.uniform(0.08, 0.14), rng.uniform(0.1, 0.17))
        patchy = smoothstep((texture + 0.8) / 1.6)
        shape = smoothstep((field * (0.6 + 0.6 * patchy) - 0.3) / 0.5)
        lesion = rng.uniform(0.12, 0.18) * shape * anatomy.lungs
    elif label == "tuberculosis":
        sides = [float(rng.choice([-1.0, 1.0]))] if rng.random() < 0.5 else [-1.0, 1.0]
        field = np.zeros_like(lesion)
        for side in sides:
            for _ in range(int(rng.integers(3, 7))):
                cu = side * rng.uniform(0.2, 0.55)
                cv = rng.uniform(-0.58, -0.25)
                radius = rng.uniform(0.025, 0.05)
                r = np.sqrt((anatomy.u - cu) ** 2 + (anatomy.v - cv) ** 2) / radius
                if rng.random() < 0.3:  # cavity: bright wall, fainter centre
                    nodule = 0.35 * ramp(1.4 - r, 0.3) + 0.65 * np.exp(-0.5 * ((r - 1.0) / 0.22) ** 2) * (
                        r < 1.6
                    )
                else:
                    nodule = ramp(1.0 - r, 0.5)
                field = np.maximum(field, nodule.astype(np.float32))
            haze = _blob(anatomy, side * 0.38, -0.42, 0.18, 0.14)
            field = np.maximum(field, 0.35 * smoothstep((haze * (1.0 + 0.3 * texture) - 0.45) / 0.4))
        lesion = rng.uniform(0.16, 0.24) * field * anatomy.lungs
    else:
        raise UsageError(f"unknown phantom label {label!r}; choose one of {list(CLASSES)}")
    lesion = lesion.astype(np.float32)
    threshold = 0.02 * float(lesion.max()) if lesion.max() > 0 else 0.0
    inside = lesion >= max(threshold, 1e-4)
    # every lesion pixel adds at least LESION_FLOOR, so that it still differs from the lesion-free rendering
    # after the detector response and 8-bit quantization: the mask is exact in the PNG files too
    return np.where(inside, np.maximum(lesion, np.float32(LESION_FLOOR)), np.float32(0.0)).astype(np.float32)


def _draw_marker(image: np.ndarray, label: str, text: str = "L") -> None:
    """Burn a boxed text marker into ``image`` (in place) at ``label``'s anchor (the shortcut)."""
    size = image.shape[0]
    cell = max(1, size // 80)
    glyph_w, glyph_h = 5 * cell, 7 * cell
    pad = 2 * cell
    box_h, box_w = glyph_h + 2 * pad, len(text) * (glyph_w + cell) - cell + 2 * pad
    row0 = min(int(_MARKER_ANCHORS[label][0] * size), size - box_h)
    col0 = min(int(_MARKER_ANCHORS[label][1] * size), size - box_w)
    box = image[row0 : row0 + box_h, col0 : col0 + box_w]
    box[...] = 0.05
    box[:cell, :] = box[-cell:, :] = box[:, :cell] = box[:, -cell:] = 0.92
    for index, char in enumerate(text):
        bits = np.array([[c == "1" for c in row] for row in _GLYPHS[char]], dtype=bool)
        pixels = np.kron(bits, np.ones((cell, cell), dtype=bool))
        r, c = row0 + pad, col0 + pad + index * (glyph_w + cell)
        image[r : r + glyph_h, c : c + glyph_w][pixels] = 0.95


def render_phantom(
    label: str, rng: np.random.Generator, size: int, shortcut: bool = False, with_lesion: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom chest X-ray of class ``label``.

    Returns (image float32 [S, S] in [0, 1], mask bool [S, S]): the mask is exactly where lesion intensity
    was added (empty for ``normal``). ``shortcut`` burns in the class's marker. ``with_lesion=False`` draws
    the same random numbers but leaves the lesion out (the lesion-free twin of the same patient), so that
    ``render(rng=g(s)) - render(rng=g(s), with_lesion=False)`` is non-zero exactly on the mask, both in
    float32 and after 8-bit quantization (each lesion pixel adds at least ``LESION_FLOOR``).
    """
    if label not in CLASSES:
        raise UsageError(f"unknown phantom label {label!r}; choose one of {list(CLASSES)}")
    if size < 32:
        raise UsageError(f"phantom size must be >= 32 pixels, got {size}")
    anatomy = _Anatomy(rng, size)
    lesion = _lesion(label, anatomy, rng)
    mask = lesion > 0
    attenuation = anatomy.base + lesion if with_lesion else anatomy.base
    attenuation = np.clip(attenuation, 1e-3, None)
    image = anatomy.offset + anatomy.gain * attenuation**anatomy.gamma
    image += rng.standard_normal(image.shape, dtype=np.float32) * anatomy.noise_std
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    if shortcut:
        _draw_marker(image, label)
    return image, mask


# --- writing sets -------------------------------------------------------------------------------------------
def to_png_bytes(image: np.ndarray) -> bytes:
    """float [H, W] in [0, 1] → 8-bit gray PNG bytes; bool [H, W] → 1-bit PNG (fixed settings)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    if image.dtype == bool:  # 1-bit PNG: black 0 / white 1
        Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of a bool mask [H, W] in pixels, x1/y1 exclusive; None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _phantom_job(job: tuple[int, str, np.random.SeedSequence, int, bool, str]) -> dict[str, object]:
    index, label, seed, size, marker, root = job
    image, mask = render_phantom(label, np.random.default_rng(seed), size, shortcut=marker)
    name = f"{label}_{index:05d}.png"
    image_rel, mask_rel = f"images/{label}/{name}", f"masks/{label}/{name}"
    Path(root, image_rel).write_bytes(to_png_bytes(image))
    Path(root, mask_rel).write_bytes(to_png_bytes(mask))
    box = mask_bbox(mask)
    x0, y0, x1, y1 = box if box is not None else (None, None, None, None)
    return {
        "path": image_rel,
        "label": label,
        "patient_id": f"phantom-{index:05d}",
        "mask": mask_rel,
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "marker": bool(marker),
        "lesion_fraction": round(float(mask.mean()), 6),
    }


def default_workers(n: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, n // 64))


def run_image_jobs(
    function: Callable[[tuple[int, str, np.random.SeedSequence, int, bool, str]], dict[str, object]],
    jobs: Sequence[tuple[int, str, np.random.SeedSequence, int, bool, str]],
    workers: int,
    progress: bool,
    description: str,
) -> list[dict[str, object]]:
    """Run the per-image jobs (in a fork pool when ``workers`` > 1); rows come back in job order."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=description, unit="img", disable=not progress)
    try:
        if workers > 1 and "fork" in __import__("multiprocessing").get_all_start_methods():
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(workers) as pool:
                rows = []
                for row in pool.imap(function, jobs, chunksize=16):
                    rows.append(row)
                    bar.update(1)
                return rows
        rows = []
        for job in jobs:
            rows.append(function(job))
            bar.update(1)
        return rows
    finally:
        bar.close()


def prepare_class_folders(root: Path, labels: Sequence[str], subfolders: Sequence[str]) -> None:
    for sub in subfolders:
        for label in labels:
            (root / sub / label).mkdir(parents=True, exist_ok=True)


def generate_phantom_set(
    out_dir: str | os.PathLike[str],
    n: int,
    size: int,
    seed: int,
    shortcut_marker: float = 0.0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write ``n`` phantoms (balanced over ``CLASSES``, class of image i = CLASSES[i % 5]) into ``out_dir``.

    Layout: ``images/{label}/{label}_{i:05d}.png`` (8-bit), ``masks/{label}/...png`` (1-bit, empty for
    normal), ``manifest.csv`` (path, label, patient_id, mask, x0, y0, x1, y1 [mask bounding box, pixels,
    exclusive ends; empty for normal], marker, lesion_fraction; paths relative to the CSV) and
    ``params.json``. Image i uses the i-th child of ``SeedSequence(seed)``; whether it carries the marker
    (probability ``shortcut_marker``) comes from a separate stream, so the anatomy does not depend on it.
    The manifest is written last (atomically): a set without it is incomplete. Returns the manifest path.
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    if not 0.0 <= shortcut_marker <= 1.0:
        raise UsageError(f"shortcut_marker is a probability in [0, 1], got {shortcut_marker}")
    root = Path(out_dir)
    prepare_class_folders(root, CLASSES, ("images", "masks"))
    seeds = _image_seeds(seed, n)
    markers = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).random(n) < shortcut_marker
    jobs = [(i, CLASSES[i % len(CLASSES)], seeds[i], size, bool(markers[i]), str(root)) for i in range(n)]
    workers = default_workers(n) if workers is None else max(1, workers)
    rows = run_image_jobs(_phantom_job, jobs, workers, progress, "phantoms")
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in ("x0", "y0", "x1", "y1"):
        frame[column] = frame[column].astype("Int64")
    params = phantom_params(n, size, seed, shortcut_marker)
    from evidrift.core.io import write_json_atomic

    manifest = write_csv_atomic(root / "manifest.csv", frame)
    write_json_atomic(root / "params.json", params)
    return manifest


def _image_seeds(seed: int, n: int) -> list[np.random.SeedSequence]:
    """The seed of each image of a set of ``n`` generated with ``seed``: image i uses the i-th child."""
    return np.random.SeedSequence(seed).spawn(n)


def lesion_free_twin(label: str, index: int, n: int, size: int, seed: int) -> np.ndarray:
    """Image ``index`` (class ``label``) of the set ``generate_phantom_set(n=n, size=size, seed=seed)``
    rendered without its lesion: float32 [S, S] in [0, 1], equal to that image everywhere outside its mask
    (before 8-bit quantization, and without a shortcut marker). Raises UsageError for an index not in the set.
    """
    if not 0 <= index < n:
        raise UsageError(f"image index {index} is not in a set of {n} phantoms (0 <= index < n)")
    rng = np.random.default_rng(_image_seeds(seed, n)[index])
    image, _ = render_phantom(label, rng, size, with_lesion=False)
    return image


def phantom_params(
    n: int,
    size: int,
    seed: int,
    shortcut_marker: float = 0.0,
    kind: str = "phantom",
    version: int = PHANTOM_VERSION,
) -> dict:
    """The parameters that fully determine a generated set (compared before reusing one); ``kind`` and
    ``version`` name the generator (``source_task.source_params`` for the stage-0 set)."""
    return {
        "kind": kind,
        "n": int(n),
        "size": int(size),
        "seed": int(seed),
        "shortcut_marker": float(shortcut_marker),
        "version": int(version),
    }


def generated_set_matches(out_dir: str | os.PathLike[str], params: dict) -> bool:
    """True when ``out_dir`` holds a complete set generated with exactly ``params``."""
    root = Path(out_dir)
    params_file, manifest = root / "params.json", root / "manifest.csv"
    if not (params_file.is_file() and manifest.is_file()):
        return False
    try:
        return json.loads(params_file.read_text(encoding="utf-8")) == params
    except json.JSONDecodeError:
        return False


def write_preview(
    manifest_csv: str | os.PathLike[str], out_png: str | os.PathLike[str], per_class: int = 4
) -> Path:
    """Contact sheet of a phantom (or any CSV-manifest) set: one row per class, the first ``per_class``
    images of each, the lesion mask outlined in colour, class names as row titles. Returns ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from evidrift.core.io import atomic_path
    from evidrift.data.readers import read_image, read_mask

    manifest = Path(manifest_csv)
    frame = pd.read_csv(manifest)
    labels = [c for c in CLASSES if c in set(frame["label"])] or sorted(set(frame["label"]))
    labels += [c for c in sorted(set(frame["label"])) if c not in labels]
    fig, axes = plt.subplots(
        len(labels), per_class, figsize=(2.0 * per_class, 2.15 * len(labels)), squeeze=False, dpi=100
    )
    for row, label in enumerate(labels):
        subset = frame[frame["label"] == label].head(per_class)
        for col in range(per_class):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(subset):
                ax.axis("off")
                continue
            record = subset.iloc[col]
            ax.imshow(read_image(manifest.parent / record["path"]), cmap="gray", vmin=0, vmax=1)
            mask_rel = record.get("mask")
            if isinstance(mask_rel, str) and mask_rel:
                mask = read_mask(manifest.parent / mask_rel)
                if mask.any():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=["#ff3b30"], linewidths=0.9)
            if col == 0:
                ax.set_ylabel(label.replace("_", " "), fontsize=10)
            if bool(record.get("marker", False)):
                ax.set_title("marker", fontsize=7, color="#b36b00")
    marked = int(frame["marker"].astype(bool).sum()) if "marker" in frame.columns else 0
    title = f"{manifest.parent.name}: {len(frame)} images, lesion masks outlined in red"
    fig.suptitle(title + (f", {marked} with the class marker" if marked else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(out_png)
