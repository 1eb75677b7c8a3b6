"""The phantom chest X-ray set and the stage-0 source set (ARCHITECTURE §9)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evidrift.core.errors import UsageError
from evidrift.data.phantom import (
    CLASSES,
    generate_phantom_set,
    mask_bbox,
    render_phantom,
    to_png_bytes,
    write_preview,
)
from evidrift.data.procedural import grid, ramp, smooth_noise, smoothstep
from evidrift.data.readers import read_image, read_mask
from evidrift.data.source_task import (
    SOURCE_CLASSES,
    SOURCE_VERSION,
    _source_pattern,
    generate_source_set,
    render_source,
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


@pytest.mark.parametrize("label", CLASSES)
def test_render_phantom_shapes_ranges_and_mask_exactness(label: str) -> None:
    image, mask = render_phantom(label, np.random.default_rng(7), 96)
    twin, twin_mask = render_phantom(label, np.random.default_rng(7), 96, with_lesion=False)
    assert image.shape == (96, 96) and image.dtype == np.float32
    assert mask.shape == (96, 96) and mask.dtype == bool
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(mask, twin_mask)
    # the lesion is exactly where the mask says: nonzero difference on the mask, zero elsewhere
    np.testing.assert_array_equal(image != twin, mask)
    assert (image[mask] > twin[mask]).all()
    if label == "normal":
        assert not mask.any()
    else:
        assert 0.003 < mask.mean() < 0.35


@pytest.mark.parametrize("label", CLASSES[1:])
def test_mask_is_exact_in_the_8bit_png_too(label: str) -> None:
    for seed in range(3):
        image, mask = render_phantom(label, np.random.default_rng(seed), 128)
        twin, _ = render_phantom(label, np.random.default_rng(seed), 128, with_lesion=False)
        a, b = np.rint(image * 255).astype(np.uint8), np.rint(twin * 255).astype(np.uint8)
        np.testing.assert_array_equal(a != b, mask)
        assert (to_png_bytes(image) != to_png_bytes(twin)) and mask.any()


def test_render_phantom_is_deterministic_and_seed_dependent() -> None:
    a, _ = render_phantom("covid19", np.random.default_rng(1), 64)
    b, _ = render_phantom("covid19", np.random.default_rng(1), 64)
    c, _ = render_phantom("covid19", np.random.default_rng(2), 64)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.005


def test_render_phantom_rejects_unknown_label() -> None:
    with pytest.raises(ValueError, match="unknown phantom label 'flu'"):
        render_phantom("flu", np.random.default_rng(0), 64)


def test_generate_phantom_set_writes_balanced_manifest(tiny_phantom_set: Path) -> None:
    frame = pd.read_csv(tiny_phantom_set)
    assert list(frame.columns[:8]) == ["path", "label", "patient_id", "mask", "x0", "y0", "x1", "y1"]
    assert frame["label"].value_counts().to_dict() == dict.fromkeys(CLASSES, 4)
    root = tiny_phantom_set.parent
    for record in frame.itertuples():
        image = read_image(root / record.path)
        mask = read_mask(root / record.mask)
        assert image.shape == mask.shape == (64, 64)
        box = mask_bbox(mask)
        if record.label == "normal":
            assert box is None and pd.isna(record.x0)
        else:
            assert box == (record.x0, record.y0, record.x1, record.y1)


def test_generate_phantom_set_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate_phantom_set(
        tmp_path / "a", n=10, size=48, seed=5, shortcut_marker=0.5, progress=False, workers=1
    )
    generate_phantom_set(
        tmp_path / "b", n=10, size=48, seed=5, shortcut_marker=0.5, progress=False, workers=2
    )
    generate_phantom_set(
        tmp_path / "c", n=10, size=48, seed=6, shortcut_marker=0.5, progress=False, workers=1
    )
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_shortcut_marker_changes_only_the_marker_box() -> None:
    plain, _ = render_phantom("tuberculosis", np.random.default_rng(3), 128)
    marked, _ = render_phantom("tuberculosis", np.random.default_rng(3), 128, shortcut=True)
    changed = np.argwhere(plain != marked)
    assert len(changed) > 20
    rows, cols = changed[:, 0], changed[:, 1]
    assert rows.max() - rows.min() < 24 and cols.max() - cols.min() < 24
    # tuberculosis's marker sits at the top centre
    assert rows.max() < 32 and 40 < cols.mean() < 90


def test_marker_positions_differ_by_class() -> None:
    centres = set()
    for label in CLASSES:
        plain, _ = render_phantom(label, np.random.default_rng(0), 96)
        marked, _ = render_phantom(label, np.random.default_rng(0), 96, shortcut=True)
        rows, cols = np.nonzero(plain != marked)
        centres.add((int(rows.mean()) // 16, int(cols.mean()) // 16))
    assert len(centres) == len(CLASSES)


def test_source_set_has_all_classes_and_is_deterministic(tmp_path: Path) -> None:
    assert len(SOURCE_CLASSES) >= 8
    manifest = generate_source_set(tmp_path / "s1", n=20, size=40, seed=1, progress=False, workers=1)
    generate_source_set(tmp_path / "s2", n=20, size=40, seed=1, progress=False, workers=1)
    frame = pd.read_csv(manifest)
    assert sorted(frame["label"].unique()) == sorted(SOURCE_CLASSES)
    assert _digest(tmp_path / "s1") == _digest(tmp_path / "s2")
    for label in SOURCE_CLASSES:
        image = render_source(label, np.random.default_rng(0), 40)
        assert image.shape == (40, 40) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    with pytest.raises(ValueError, match="unknown source label 'ring'"):
        render_source("ring", np.random.default_rng(0), 40)
    assert json.loads((tmp_path / "s1" / "params.json").read_text())["version"] == SOURCE_VERSION


def _pattern_stats(label: str, seeds: range, size: int = 64) -> list[tuple[float, float, float, float]]:
    """Per seed: (mean value, share of the pattern's mass in the upper half, share in the left half, peak
    value) of a source class's pattern."""
    stats = []
    for seed in seeds:
        pattern = _source_pattern(label, np.random.default_rng(seed), size).astype(np.float64)
        mass = pattern.sum()
        half = size // 2
        upper = pattern[:half].sum() / mass if mass else 0.0
        left = pattern[:, :half].sum() / mass if mass else 0.0
        stats.append((mass / pattern.size, upper, left, pattern.max()))
    return stats


def test_source_patterns_have_the_placement_and_scale_their_class_says() -> None:
    seeds = range(6)
    assert all(mass == 0 for mass, *_ in _pattern_stats("empty", seeds))
    for label in SOURCE_CLASSES[1:]:
        assert all(mass > 0 and peak <= 1.0 + 1e-6 for mass, _, _, peak in _pattern_stats(label, seeds)), (
            label
        )
    assert all(upper > 0.9 for _, upper, _, _ in _pattern_stats("nodules_upper", seeds))
    assert all(upper < 0.1 for _, upper, _, _ in _pattern_stats("nodules_lower", seeds))
    assert all(upper < 0.25 for _, upper, _, _ in _pattern_stats("patchy_lower", seeds))
    assert all(left > 0.9 or left < 0.1 for _, _, left, _ in _pattern_stats("dense_patch", seeds))  # one side
    assert all(0.2 < left < 0.8 for _, _, left, _ in _pattern_stats("haze_bilateral", seeds))  # both sides
    assert all(0.2 < left < 0.8 for _, _, left, _ in _pattern_stats("patchy_lower", seeds))
    # scale: a nodule or ring covers < 1% of the image (some may touch), a dense patch > 3%
    from scipy import ndimage

    def component_areas(label: str, seed: int) -> np.ndarray:
        parts, _ = ndimage.label(_source_pattern(label, np.random.default_rng(seed), 64) >= 0.5)
        return np.bincount(parts.ravel())[1:] / parts.size

    for seed in seeds:
        assert 0 < component_areas("nodules_upper", seed).min() < 0.01
        assert 0 < component_areas("rings", seed).min() < 0.01
        assert component_areas("dense_patch", seed).max() > 0.03


def test_write_preview_writes_a_png(tiny_phantom_set: Path, tmp_path: Path) -> None:
    out = write_preview(tiny_phantom_set, tmp_path / "preview.png", per_class=2)
    sheet = read_image(out)
    assert sheet.shape[0] > 200 and sheet.shape[1] > 100


def _mask_stats(label: str, seeds: range, size: int = 96) -> list[tuple[float, float, bool, bool]]:
    """Per image: (mask centroid row / S, mean |column − centre| / S, lesion left of centre, right of it)."""
    stats = []
    for seed in seeds:
        _, mask = render_phantom(label, np.random.default_rng(seed), size)
        rows, cols = np.nonzero(mask)
        stats.append(
            (
                rows.mean() / size,
                np.abs(cols + 0.5 - size / 2).mean() / size,
                bool((cols < size / 2).any()),
                bool((cols >= size / 2).any()),
            )
        )
    return stats


def test_lesions_sit_where_the_classes_say() -> None:
    seeds = range(8)
    bacterial = _mask_stats("bacterial_pneumonia", seeds)
    assert all(left != right for _, _, left, right in bacterial)  # one lung
    assert all(row > 0.5 for row, *_ in bacterial)  # middle/lower zone
    tuberculosis = _mask_stats("tuberculosis", seeds)
    assert all(row < 0.42 for row, *_ in tuberculosis)  # upper zone
    viral = _mask_stats("viral_pneumonia", seeds)
    covid = _mask_stats("covid19", seeds)
    assert all(left and right for _, _, left, right in viral + covid)  # bilateral
    assert np.mean([row for row, *_ in covid]) > np.mean([row for row, *_ in viral])  # covid: lower zones
    assert np.mean([spread for _, spread, *_ in covid]) > np.mean([spread for _, spread, *_ in viral]) + 0.05


def test_procedural_primitives_by_hand() -> None:
    x, y = grid(4)
    np.testing.assert_array_equal(x, [[-0.75, -0.25, 0.25, 0.75]])
    np.testing.assert_array_equal(y[:, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(ramp(np.array([-1.0, -0.25, 0.0, 0.1, 1.0]), 0.5), [0.0, 0.0, 0.5, 0.7, 1.0])
    np.testing.assert_allclose(smoothstep(np.array([-1.0, 0.5, 2.0])), [0.0, 0.5, 1.0])
    noise = smooth_noise(np.random.default_rng(3), 64, 8)
    assert noise.dtype == np.float32 and noise.shape == (64, 64)
    np.testing.assert_array_equal(noise, smooth_noise(np.random.default_rng(3), 64, 8))  # deterministic
    assert 0.4 < float(noise.std()) < 1.2
    assert float(np.abs(np.diff(noise, axis=1)).max()) < 1.0  # band-limited: no pixel-to-pixel jumps


def test_lesion_free_twin_equals_the_generated_image_outside_its_mask(tiny_phantom_set: Path) -> None:
    from PIL import Image

    from evidrift.data.phantom import lesion_free_twin, to_png_bytes

    frame = pd.read_csv(tiny_phantom_set)
    root = tiny_phantom_set.parent
    lesion_rows = [row for row in frame.itertuples() if row.label != "normal"]
    assert lesion_rows
    for row in lesion_rows:
        index = int(str(row.patient_id).rsplit("-", 1)[1])
        twin = lesion_free_twin(str(row.label), index, n=20, size=64, seed=0)
        quantized = np.asarray(Image.open(io.BytesIO(to_png_bytes(twin))))
        image = np.asarray(Image.open(root / str(row.path)))
        mask = np.asarray(Image.open(root / str(row.mask))) > 0
        assert mask.any()
        np.testing.assert_array_equal(quantized[~mask], image[~mask])
        assert (quantized[mask] != image[mask]).mean() > 0.5  # the lesion changes its pixels
    with pytest.raises(UsageError, match="not in a set of 20"):
        lesion_free_twin("covid19", 20, n=20, size=64, seed=0)
