"""Image [H, W] in [0, 1] → model input [3, S, S] (ARCHITECTURE §2): resize, augmentation, 3 channels,
normalize.

Resizing keeps the aspect ratio: ``pad`` scales the longer side to S and pads the shorter one symmetrically
with 0 (black, like the air around a radiograph); ``crop`` scales the shorter side to S and cuts the centre.
Training augmentation (``augment=True``) is a small random affine map (rotation ±``max_rotation`` degrees,
scale ×[1 − s, 1 + s], translation ±``max_translate`` of the side) applied to the already-resized image and
its mask in *one* ``grid_sample`` call (the mask is the second channel, sampled bilinearly and thresholded at
0.5, so it moves exactly with the image), then brightness (±``max_brightness``) and contrast (×[1 − c, 1 + c]
about the image mean) on the image only, as one multiply-add. All random numbers come from the given
``torch.Generator``, so an augmentation is reproducible by seed (``ManifestDataset`` seeds one per
(seed, epoch, index)). The work runs on one intra-op thread (see ``single_thread``): ~1-3 ms per image at
96-256 px instead of tens of ms on a loaded 2-core machine (``benchmarks/transforms.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evidrift.core.errors import UsageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[H, W] array or tensor → float32 tensor [1, 1, H, W]."""
    tensor = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    if tensor.ndim != 2:
        raise ValueError(f"expected a grayscale image [H, W], got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32)[None, None]


def resize_image(image: torch.Tensor, size: int, mode: str = "pad", is_mask: bool = False) -> torch.Tensor:
    """[1, 1, H, W] float32 → [1, 1, S, S]. ``mode`` ``pad`` (aspect kept, zero padding, centred) or ``crop``
    (aspect kept, centre crop). Images: bilinear with antialiasing; masks: area-weighted, ≥ 0.5 → {0, 1}."""
    if mode not in ("pad", "crop"):
        raise UsageError(f"resize mode must be 'pad' or 'crop', got {mode!r}")
    height, width = image.shape[-2:]
    if mode == "pad":
        scale = size / max(height, width)
        new_h, new_w = min(size, max(1, round(height * scale))), min(size, max(1, round(width * scale)))
    else:
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = image
    if (new_h, new_w) != (height, width):
        resized = F.interpolate(
            image, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
        if is_mask:
            resized = (resized >= 0.5).to(torch.float32)
    if mode == "pad":
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return F.pad(resized, (left, size - new_w - left, top, size - new_h - top), value=0.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top : top + size, left : left + size]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``, restored after (a no-op when already 1).

    One image is far too small to gain from intra-op threads, and on a loaded machine every parallel region
    of a small kernel waits for busy cores: measured on 2 shared cores, ``Preprocess`` took 30-60 ms per image
    with 2 threads and 0.5-2.5 ms with 1 (``benchmarks/transforms.py``). The setting is the calling thread's
    OpenMP one; DataLoader workers already run with 1 thread."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def affine_theta(
    draws: torch.Tensor, max_rotation: float = 5.0, max_scale: float = 0.05, max_translate: float = 0.04
) -> torch.Tensor:
    """The [1, 2, 3] float32 matrix of ``F.affine_grid`` for 4 draws in [-1, 1] (rotation, scale, x and y
    translation): rotation ±``max_rotation`` degrees, scale ×[1 − s, 1 + s], shift ±``max_translate`` of the
    side (the grid maps output to input coordinates, so the content is scaled by ``scale``)."""
    angle = math.radians(float(draws[0]) * max_rotation)
    scale = 1.0 + float(draws[1]) * max_scale
    tx, ty = float(draws[2]) * max_translate * 2.0, float(draws[3]) * max_translate * 2.0
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=torch.float32)


def random_affine_grid(
    size: int,
    generator: torch.Generator | None,
    max_rotation: float = 5.0,
    max_scale: float = 0.05,
    max_translate: float = 0.04,
) -> torch.Tensor:
    """A sampling grid [1, S, S, 2] for ``F.grid_sample`` of a random small affine map (see module doc)."""
    draws = torch.rand(4, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return square_affine_grid(affine_theta(draws, max_rotation, max_scale, max_translate), size)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] of a side of ``size`` (``align_corners=False``), float32 [S]."""
    return (torch.arange(size, dtype=torch.float32) * 2.0 + 1.0) / size - 1.0


def square_affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [1, 1, S, S], align_corners=False)`` for theta [1, 2, 3], built from two
    broadcast multiply-adds over cached pixel centres instead of a batched matmul over every pixel (same
    values up to float rounding, a few times faster at 256 px). Returns float32 [1, S, S, 2]."""
    axis = _pixel_centres(size)
    (a, b, c), (d, e, f) = theta[0].tolist()
    across, down = axis[None, :], axis[:, None]
    gx = (across * a + c) + down * b
    gy = (across * d + f) + down * e
    return torch.stack([gx, gy], dim=-1)[None]


class Preprocess:
    """Callable image (+ mask) → (normalized tensor float32 [3, S, S], mask float32 [S, S] in {0, 1} or None).

    ``size``: output side; ``resize``: ``pad`` or ``crop``; ``mean``/``std``: per-channel normalization
    (ImageNet's by default); ``augment``: random affine + brightness/contrast (training only); ``seed``: used
    when a call gives no generator (then successive calls draw successive augmentations).

    Cost: image and mask travel as the two channels of one tensor [1, 2, H, W]: one resize, one
    ``grid_sample`` (bilinear; the mask channel is thresholded at 0.5 afterwards, so it stays the exact
    warped region of the resized mask), brightness/contrast folded into one multiply-add, and the
    normalization to 3 channels as one broadcast multiply-add; all of it on one intra-op thread.
    """

    def __init__(
        self,
        size: int,
        resize: str = "pad",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        seed: int = 0,
        max_rotation: float = 5.0,
        max_scale: float = 0.05,
        max_translate: float = 0.04,
        max_brightness: float = 0.08,
        max_contrast: float = 0.1,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if resize not in ("pad", "crop"):
            raise UsageError(f"resize must be 'pad' or 'crop', got {resize!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {list(mean)} and {list(std)}")
        self.size = size
        self.resize = resize
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        # (x − mean) / std = x · scale + shift, one fused op
        self._scale = 1.0 / self.std
        self._shift = -self.mean / self.std
        self.augment = augment
        self.max_rotation, self.max_scale, self.max_translate = max_rotation, max_scale, max_translate
        self.max_brightness, self.max_contrast = max_brightness, max_contrast
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        rng: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with single_thread():
            planes = _as_tensor(image)
            if mask is not None:
                binary = _as_tensor(torch.as_tensor(np.asarray(mask)))
                if binary.shape != planes.shape:
                    raise ValueError(
                        f"mask shape {tuple(binary.shape[-2:])} differs from image shape "
                        f"{tuple(planes.shape[-2:])}; pass the mask of this image"
                    )
                planes = torch.cat([planes, binary], dim=1)  # [1, 2, H, W]
            planes = resize_image(planes, self.size, self.resize)
            if self.augment:
                generator = rng if rng is not None else self._generator
                grid = random_affine_grid(
                    self.size, generator, self.max_rotation, self.max_scale, self.max_translate
                )
                planes = F.grid_sample(
                    planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False
                )
            pixels = planes[0, 0]
            if self.augment:
                draws = torch.rand(2, generator=generator, dtype=torch.float64) * 2.0 - 1.0
                brightness = float(draws[0]) * self.max_brightness
                contrast = 1.0 + float(draws[1]) * self.max_contrast
                # (x − m)·c + m + b = x·c + (m·(1 − c) + b), clamped to [0, 1]
                offset = float(pixels.mean()) * (1.0 - contrast) + brightness
                pixels = torch.clamp(pixels * contrast + offset, 0.0, 1.0)
            tensor = torch.addcmul(self._shift, pixels, self._scale)  # [3, S, S]
            target = (planes[0, 1] >= 0.5).to(torch.float32) if mask is not None else None
        return tensor, target


def to_model_input(
    image: np.ndarray | torch.Tensor,
    size: int,
    resize: str = "pad",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """One image [H, W] in [0, 1] → a batch [1, 3, S, S] ready for the model (no augmentation)."""
    tensor, _ = Preprocess(size, resize, mean, std)(image)
    return tensor[None]


def denormalize(
    tensor: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of the normalization: [..., 3, S, S] → grayscale [..., S, S] in [0, 1] (channel mean)."""
    m = torch.tensor(list(mean), dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * s + m).mean(dim=-3).clamp(0.0, 1.0)
