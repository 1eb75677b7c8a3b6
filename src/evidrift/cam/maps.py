"""Map helpers in one place: resize, normalization, degenerate check, overlay on an image.

Maps are float tensors [..., h, w] (any leading dims: [B, h, w], [B, T, h, w], [h, w]); every function
works per map over the last two dims and returns float32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of maps [..., h, w] to ``size`` (side or (H, W)).

    Returns [..., H, W] float32."""
    target = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    if (h, w) == target:
        return maps.float()
    flat = maps.float().reshape(-1, 1, h, w)
    out = F.interpolate(flat, size=target, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *target)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """(m − min) / (max − min) per map, in [0, 1]; a constant map becomes all zeros; non-finite stays."""
    m = maps.float()
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(
        span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(m)
    )


def sum_to_one(maps: torch.Tensor) -> torch.Tensor:
    """m / Σm per map after clipping negatives to 0 (a probability map); an all-zero map stays all zeros."""
    m = maps.float().clamp_min(0)
    total = m.sum(dim=(-2, -1), keepdim=True)
    return torch.where(
        total > 0, m / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(m)
    )


def is_degenerate(maps: torch.Tensor) -> torch.Tensor:
    """bool [...] per map: True when the map has a non-finite value or no positive value (all ≤ 0)."""
    m = maps.float()
    nonfinite = ~torch.isfinite(m).all(dim=-1).all(dim=-1)
    no_mass = ~(torch.nan_to_num(m, nan=0.0) > 0).any(dim=-1).any(dim=-1)
    return nonfinite | no_mass


def overlay(
    cam: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    alpha: float = 0.45,
    cmap: str = "jet",
    as_uint8: bool = False,
) -> np.ndarray:
    """A heat-map overlay of ``cam`` [h, w] (any scale, ≥ 0) on a grayscale ``image`` [H, W] in [0, 1].

    The map is resized bilinearly to [H, W], min-max normalized and coloured with the matplotlib ``cmap``;
    result = (1 − alpha)·gray + alpha·colour, RGB [H, W, 3] float32 in [0, 1] (uint8 0–255 with ``as_uint8``).
    Raises ValueError for shapes other than 2-D or an alpha outside [0, 1].
    """
    import matplotlib

    cam_t = (
        torch.as_tensor(np.asarray(cam) if not isinstance(cam, torch.Tensor) else cam).detach().float().cpu()
    )
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if cam_t.ndim != 2 or img.ndim != 2:
        raise ValueError(
            f"overlay needs a 2-D map and a 2-D grayscale image, got {tuple(cam_t.shape)} and {img.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    heat = minmax_normalize(upsample(torch.nan_to_num(cam_t, nan=0.0).clamp_min(0), img.shape)).numpy()
    colour = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    gray = np.repeat(np.clip(img, 0.0, 1.0)[..., None], 3, axis=-1)
    out = (1.0 - alpha) * gray + alpha * colour
    return np.round(out * 255).astype(np.uint8) if as_uint8 else out.astype(np.float32)
