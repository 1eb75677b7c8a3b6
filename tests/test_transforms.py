"""Transforms (resize with padding or centre crop, 3 channels, normalization, paired augmentation) and the
manifest Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from evidrift.data.dataset import ManifestDataset, item_seed
from evidrift.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    denormalize,
    resize_image,
    single_thread,
    square_affine_grid,
    to_model_input,
)


def test_pad_keeps_aspect_and_centres() -> None:
    image = torch.ones(1, 1, 4, 8)
    out = resize_image(image, 8, "pad")
    expected = torch.zeros(8, 8)
    expected[2:6, :] = 1.0
    torch.testing.assert_close(out[0, 0], expected)


def test_crop_keeps_aspect_and_cuts_the_centre() -> None:
    image = torch.arange(8, dtype=torch.float32).repeat(4, 1)[None, None]  # [1, 1, 4, 8], value = column
    out = resize_image(image, 4, "crop")
    torch.testing.assert_close(out[0, 0], torch.tensor([2.0, 3.0, 4.0, 5.0]).repeat(4, 1))


def test_mask_resizing_stays_binary() -> None:
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 2:7, 3:9] = 1
    out = resize_image(mask, 7, "pad", is_mask=True)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert 0.2 < out.mean().item() < 0.4


def test_preprocess_three_channels_and_normalization() -> None:
    image = np.full((6, 6), 0.5, dtype=np.float32)
    tensor, mask = Preprocess(6)(image)
    assert tensor.shape == (3, 6, 6) and tensor.dtype == torch.float32 and mask is None
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 3, 3], expected)
    torch.testing.assert_close(denormalize(tensor), torch.full((6, 6), 0.5))
    assert to_model_input(image, 6).shape == (1, 3, 6, 6)


def test_augmentation_is_seeded_and_moves_image_and_mask_together() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[20:40, 24:44] = 1.0
    mask = image > 0.5
    pre = Preprocess(
        64, augment=True, max_brightness=0.0, max_contrast=0.0, max_rotation=10.0, max_translate=0.08
    )
    outputs = []
    for seed in (1, 1, 2):
        tensor, warped = pre(image, mask, torch.Generator().manual_seed(seed))
        outputs.append((tensor, warped))
        gray = denormalize(tensor)
        assert set(warped.unique().tolist()) <= {0.0, 1.0}
        # the mask follows the image: bright pixels and mask pixels coincide (up to interpolated edges)
        agreement = ((gray > 0.5) == (warped > 0.5)).float().mean()
        assert agreement > 0.98
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    assert not torch.equal(outputs[0][1], outputs[2][1])
    _, plain_mask = Preprocess(64)(image, mask)
    assert not torch.equal(plain_mask, outputs[0][1])


def test_augmented_mask_is_exactly_the_warped_image_region() -> None:
    """Image and mask go through the same grid: for an image equal to its mask, the augmented mask is the
    augmented image thresholded at 0.5, pixel for pixel (rotation, scale and shift all on)."""
    rng = np.random.default_rng(3)
    mask = np.zeros((80, 60), dtype=bool)  # not square: padding is part of the path
    for _ in range(4):
        r, c = rng.integers(5, 55), rng.integers(5, 40)
        mask[r : r + 17, c : c + 11] = True
    image = mask.astype(np.float32)
    limits = {"max_rotation": 15.0, "max_scale": 0.1, "max_translate": 0.1}
    pre = Preprocess(48, augment=True, max_brightness=0.0, max_contrast=0.0, **limits)
    for seed in range(5):
        tensor, warped = pre(image, mask, torch.Generator().manual_seed(seed))
        gray = denormalize(tensor)
        clear = (gray - 0.5).abs() > 1e-4
        assert clear.float().mean() > 0.99
        torch.testing.assert_close(warped[clear], (gray >= 0.5).float()[clear])
        assert 0 < warped.sum() < warped.numel()


@pytest.mark.parametrize("size", [1, 7, 64])
def test_square_affine_grid_matches_torch(size: int) -> None:
    theta = torch.tensor([[[0.93, -0.21, 0.05], [0.18, 1.04, -0.07]]])
    expected = torch.nn.functional.affine_grid(theta, [1, 1, size, size], align_corners=False)
    torch.testing.assert_close(square_affine_grid(theta, size), expected, atol=1e-6, rtol=0)


def test_single_thread_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), single_thread():
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_mask_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mask shape \(4, 5\) differs from image shape \(5, 5\)"):
        Preprocess(8)(np.zeros((5, 5), dtype=np.float32), np.zeros((4, 5), dtype=bool))


def test_brightness_contrast_change_only_the_image() -> None:
    image = np.linspace(0.2, 0.8, 64, dtype=np.float32).reshape(8, 8)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 2:5] = True
    pre = Preprocess(8, augment=True, max_rotation=0.0, max_scale=0.0, max_translate=0.0, max_brightness=0.2)
    tensor, warped = pre(image, mask, torch.Generator().manual_seed(0))
    torch.testing.assert_close(warped, torch.from_numpy(mask).float())
    assert not torch.allclose(denormalize(tensor), torch.from_numpy(image), atol=1e-3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="resize must be 'pad' or 'crop', got 'stretch'"):
        Preprocess(8, resize="stretch")
    with pytest.raises(ValueError, match=r"expected a grayscale image \[H, W\]"):
        Preprocess(8)(np.zeros((2, 2, 3), dtype=np.float32))


def _frame(manifest_csv: Path) -> pd.DataFrame:
    raw = pd.read_csv(manifest_csv)
    root = manifest_csv.parent
    return pd.DataFrame(
        {
            "id": [Path(p).stem for p in raw["path"]],
            "path": [str(root / p) for p in raw["path"]],
            "label": raw["label"],
            "mask_path": [str(root / m) if isinstance(m, str) else None for m in raw["mask"]],
            "status": "ok",
        }
    )


def test_manifest_dataset_items(tiny_phantom_set: Path) -> None:
    from evidrift.data.phantom import CLASSES

    frame = _frame(tiny_phantom_set)
    frame.loc[0, "mask_path"] = None
    dataset = ManifestDataset(frame, CLASSES, size=32, with_mask=True)
    assert len(dataset) == 20
    item = dataset[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"] == CLASSES.index(frame.loc[1, "label"]) and item["id"] == frame.loc[1, "id"]
    assert item["index"] == 1 and item["has_mask"] and item["mask"].shape == (32, 32)
    assert item["mask"].sum() > 0  # bacterial pneumonia has a lesion
    first = dataset[0]
    assert not first["has_mask"] and first["mask"].sum() == 0


def test_manifest_dataset_augmentation_depends_on_seed_epoch_index(tiny_phantom_set: Path) -> None:
    from evidrift.data.phantom import CLASSES

    frame = _frame(tiny_phantom_set)
    a = ManifestDataset(frame, CLASSES, size=32, augment=True, seed=4)
    b = ManifestDataset(frame, CLASSES, size=32, augment=True, seed=4)
    torch.testing.assert_close(a[3]["image"], b[3]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[3]["image"], b[3]["image"])
    assert item_seed(4, 0, 3) == item_seed(4, 0, 3) != item_seed(4, 0, 2)


def test_manifest_dataset_augments_image_and_mask_alike(tiny_phantom_set: Path) -> None:
    """The lesion mask moves with the image: the augmented mask equals the plain mask warped by the same
    draws (same (seed, epoch, index) → same item), and differs between epochs."""
    from evidrift.data.phantom import CLASSES

    frame = _frame(tiny_phantom_set)
    dataset = ManifestDataset(frame, CLASSES, size=32, augment=True, with_mask=True, seed=2)
    index = 1  # bacterial pneumonia: a non-empty mask
    first, again = dataset[index], dataset[index]
    torch.testing.assert_close(first["mask"], again["mask"])
    torch.testing.assert_close(first["image"], again["image"])
    dataset.set_epoch(1)
    other = dataset[index]
    assert not torch.equal(first["mask"], other["mask"])
    assert first["mask"].sum() > 0 and set(first["mask"].unique().tolist()) <= {0.0, 1.0}
    # the same warp through Preprocess directly, with the item's generator
    from evidrift.data.readers import read_image, read_mask

    image, mask = read_image(frame.loc[index, "path"]), read_mask(frame.loc[index, "mask_path"])
    generator = torch.Generator().manual_seed(item_seed(2, 0, index))
    tensor, warped = dataset.preprocess(image, mask, generator)
    torch.testing.assert_close(warped, first["mask"])
    torch.testing.assert_close(tensor, first["image"])


def test_manifest_dataset_refuses_skipped_rows(tiny_phantom_set: Path) -> None:
    frame = _frame(tiny_phantom_set)
    frame.loc[2, "status"] = "skipped: truncated"
    with pytest.raises(ValueError, match="needs rows with status 'ok'"):
        ManifestDataset(frame, ["normal"], size=32)
