"""Localization: a map vs a ground-truth mask or boxes (ARCHITECTURE §6). Batched: [N, H, W] → float64 [N].

Maps are prepared as everywhere (``AnalysisMaps``: resized bilinearly to the mask's size unless ``size`` is
given, negatives clipped); masks [N, H, W] (bool or {0, 1}) are resized with nearest neighbour when sizes
differ. A degenerate map gives NaN; so does an empty mask for the metrics that need one (and a full mask for
those that need a background).

- ``pointing_game``: 1.0 if the map's maximum (first in row-major order on ties) lies in the mask, else 0.0
  (no tolerance margin).
- ``energy_pointing_game``: Σ p inside the mask (share of the map's mass on the lesion), [0, 1].
- ``mask_iou@k``: IoU of the map's top-k set (``evidrift.metrics.common``) with the mask.
- ``pixel_auroc``: AUROC of the pixel values for mask vs background (ties count ½; = scikit-learn's
  ``roc_auc_score(mask.ravel(), map.ravel())``).
- ``cnr``: (μ_in − μ_out) / sqrt(σ²_in + σ²_out) on q (min-max map), population variances; NaN when the
  denominator is 0.
- ``gmm_iou`` / ``gmm_miou`` / ``gmm_box_iou``: chest-distillation's foreground (``GMMMaskSuggestor``):
  a 1-D two-component Gaussian mixture is fitted to q's pixel values by EM (initial means at the
  10th/90th percentiles, or at q's min and max where those coincide — a sparse map —, 100 iterations,
  variance floor 1e-6); the foreground is q > the midpoint of the
  two component means (not the posterior > ½ rule, which gives a larger foreground on blob maps), then
  the 3 × 3 orphan-pixel filter: every interior pixel becomes 1 where the 3 × 3 mean of the binary mask
  is ≥ ½ (at least 5 of 9), border pixels keep their value. ``gmm_iou`` = IoU(foreground, mask) (the
  reference's ``iou``), ``gmm_miou`` = mean of the foreground IoU and the background IoU (``miou``),
  ``gmm_box_iou`` = IoU of the foreground's bounding box with the mask (``bboxiou``; the box includes
  its last row and column, where the reference's ``prediction[y1:y2, x1:x2]`` drops them).
- ``box_iou@t``: the bounding box of {q ≥ t} vs the union of the ground-truth boxes, as pixel sets: IoU of
  the filled box with the union mask. Boxes: a list per image of (x0, y0, x1, y1) pixel corners (x1, y1
  exclusive) or a mask already rasterized by ``boxes_to_mask``.
- ``gridpg``: for a map of an n × n grid image, share of the positive mass in the target cell (cells by
  ``floor(i · n / H)``), [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evidrift.metrics.common import AnalysisMaps, nan_where

MapsLike = Tensor | AnalysisMaps


def _prepare(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None) -> tuple[AnalysisMaps, Tensor]:
    if mask.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(mask.shape)}")
    if not isinstance(maps, AnalysisMaps):
        maps = AnalysisMaps(maps, size if size is not None else (mask.shape[-2], mask.shape[-1]))
    if maps.n != mask.shape[0]:
        raise ValueError(f"{maps.n} maps for {mask.shape[0]} masks")
    m = mask.to(maps.device)
    if tuple(m.shape[-2:]) != maps.shape:
        m = F.interpolate(m[:, None].float(), size=maps.shape, mode="nearest")[:, 0]
    return maps, m > 0.5 if m.is_floating_point() else m.bool()


def pointing_game(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """1.0 if the argmax pixel is inside the mask else 0.0, float64 [N]; NaN: degenerate map, empty mask."""
    m, gt = _prepare(maps, mask, size)
    hit = gt.flatten(1).gather(1, m.flat.argmax(dim=1, keepdim=True))[:, 0]
    return nan_where(hit.double(), m.degenerate | ~gt.flatten(1).any(1))


def energy_pointing_game(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """Share of the map's mass inside the mask, float64 [N] in [0, 1]."""
    m, gt = _prepare(maps, mask, size)
    inside = (m.p * gt).sum(dim=(1, 2), dtype=torch.float64)
    return nan_where(inside, m.degenerate | ~gt.flatten(1).any(1))


def _iou(pred: Tensor, gt: Tensor) -> Tensor:
    inter = (pred & gt).flatten(1).sum(1, dtype=torch.float64)
    union = (pred | gt).flatten(1).sum(1, dtype=torch.float64)
    return inter / union.clamp_min(1.0)


def mask_iou(
    maps: MapsLike, mask: Tensor, k: float = 0.1, size: int | tuple[int, int] | None = None
) -> Tensor:
    """IoU of the map's top-k set with the mask, float64 [N] in [0, 1]."""
    m, gt = _prepare(maps, mask, size)
    return nan_where(_iou(m.topk_mask(k), gt.flatten(1)), m.degenerate | ~gt.flatten(1).any(1))


def pixel_auroc(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """AUROC of pixel values, mask vs background (Mann–Whitney with tie-averaged ranks), float64 [N]."""
    m, gt = _prepare(maps, mask, size)
    pos = gt.flatten(1)
    n_pos = pos.sum(1, dtype=torch.float64)
    n_neg = pos.shape[1] - n_pos
    rank_sum = (m.ranks * pos).sum(1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1.0)
    return nan_where(auc, m.degenerate | (n_pos == 0) | (n_neg == 0))


def cnr(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """Contrast-to-noise ratio (μ_in − μ_out) / sqrt(σ²_in + σ²_out) of q, float64 [N]."""
    m, gt = _prepare(maps, mask, size)
    q = m.q.flatten(1).double()
    pos = gt.flatten(1).double()
    neg = 1.0 - pos
    n_in, n_out = pos.sum(1), neg.sum(1)
    mu_in = (q * pos).sum(1) / n_in.clamp_min(1)
    mu_out = (q * neg).sum(1) / n_out.clamp_min(1)
    var_in = (((q - mu_in[:, None]) ** 2) * pos).sum(1) / n_in.clamp_min(1)
    var_out = (((q - mu_out[:, None]) ** 2) * neg).sum(1) / n_out.clamp_min(1)
    den = torch.sqrt(var_in + var_out)
    bad = m.degenerate | m.constant | (n_in == 0) | (n_out == 0) | (den == 0)
    return nan_where((mu_in - mu_out) / torch.where(den > 0, den, torch.ones_like(den)), bad)


def gmm_threshold(maps: MapsLike, iterations: int = 100, size: int | tuple[int, int] | None = None) -> Tensor:
    """The midpoint of the two means of a 2-component 1-D Gaussian mixture fitted to q by EM (module doc),
    float64 [N] in [0, 1]."""
    m = maps if isinstance(maps, AnalysisMaps) else AnalysisMaps(maps, size)
    x = m.q.flatten(1).double()
    mu = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=torch.float64, device=x.device), dim=1).T.clone()
    # a sparse map (≥ 90 % zeros after the ReLU) has p10 = p90: two identical starts stay identical through
    # EM; start those at the extremes instead (q's min 0 and max 1), as k-means would separate them
    tied = (mu[:, 1] - mu[:, 0]) <= 1e-6
    mu[tied, 0], mu[tied, 1] = x[tied].amin(dim=1), x[tied].amax(dim=1)
    spread = x.var(dim=1, keepdim=True).clamp_min(1e-6)
    var = spread.expand(-1, 2).clone()
    weight = torch.full_like(mu, 0.5)
    floor = 1e-6
    for _ in range(iterations):
        log_pdf = -0.5 * ((x[:, :, None] - mu[:, None, :]) ** 2) / var[:, None, :] - 0.5 * torch.log(
            var[:, None, :]
        )
        log_post = torch.log(weight[:, None, :]) + log_pdf
        resp = torch.softmax(log_post, dim=2)  # [N, P, 2]
        nk = resp.sum(1).clamp_min(1e-12)
        weight = nk / x.shape[1]
        mu = (resp * x[:, :, None]).sum(1) / nk
        var = ((resp * (x[:, :, None] - mu[:, None, :]) ** 2).sum(1) / nk).clamp_min(floor)
    return mu.mean(dim=1)


def filter_orphan_pixels(mask: Tensor) -> Tensor:
    """chest-distillation's orphan filter: interior pixels of a binary ``mask`` [N, H, W] become True where
    their 3 × 3 neighbourhood mean is ≥ ½ (5 of 9 pixels), else False; border pixels are kept.
    bool [N, H, W]."""
    out = mask.clone().bool()
    if mask.shape[-2] < 3 or mask.shape[-1] < 3:
        return out
    mean = F.avg_pool2d(mask.float()[:, None], kernel_size=3, stride=1)[:, 0]  # [N, H-2, W-2]
    out[:, 1:-1, 1:-1] = mean >= 0.5
    return out


def gmm_foreground(
    maps: MapsLike, iterations: int = 100, size: int | tuple[int, int] | None = None
) -> Tensor:
    """chest-distillation's GMM foreground (module doc): q > the GMM midpoint, orphan-filtered.
    bool [N, H, W]."""
    m = maps if isinstance(maps, AnalysisMaps) else AnalysisMaps(maps, size)
    threshold = gmm_threshold(m, iterations)
    return filter_orphan_pixels(m.q.double() > threshold[:, None, None])


def gmm_iou(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """IoU of the GMM foreground with the mask, float64 [N] in [0, 1]."""
    m, gt = _prepare(maps, mask, size)
    fg = gmm_foreground(m)
    return nan_where(_iou(fg.flatten(1), gt.flatten(1)), m.degenerate | m.constant | ~gt.flatten(1).any(1))


def gmm_miou(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """Mean of foreground and background IoU of the GMM segmentation vs the mask, float64 [N] in [0, 1]."""
    m, gt = _prepare(maps, mask, size)
    fg, g = gmm_foreground(m).flatten(1), gt.flatten(1)
    value = 0.5 * (_iou(fg, g) + _iou(~fg, ~g))
    return nan_where(value, m.degenerate | m.constant | ~g.any(1) | g.all(1))


def gmm_box_iou(maps: MapsLike, mask: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """IoU of the GMM foreground's bounding box (inclusive) with the mask, float64 [N] in [0, 1]; NaN when
    the foreground is empty."""
    m, gt = _prepare(maps, mask, size)
    fg = gmm_foreground(m)
    box = bounding_box_mask(fg)
    bad = m.degenerate | m.constant | ~gt.flatten(1).any(1) | ~fg.flatten(1).any(1)
    return nan_where(_iou(box.flatten(1), gt.flatten(1)), bad)


def boxes_to_mask(boxes: Sequence[Sequence[Sequence[float]]], size: tuple[int, int]) -> Tensor:
    """Union of (x0, y0, x1, y1) boxes per image (pixel corners, x1/y1 exclusive) → bool [N, H, W]."""
    h, w = size
    out = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, per_image in enumerate(boxes):
        for x0, y0, x1, y1 in per_image:
            out[i, max(0, int(y0)) : min(h, int(y1)), max(0, int(x0)) : min(w, int(x1))] = True
    return out


def box_iou(
    maps: MapsLike, mask: Tensor, t: float = 0.5, size: int | tuple[int, int] | None = None
) -> Tensor:
    """IoU of the bounding box of {q ≥ t} with the union of ground-truth boxes (``mask``), float64 [N]."""
    m, gt = _prepare(maps, mask, size)
    box = bounding_box_mask(m.q >= t)
    return nan_where(_iou(box.flatten(1), gt.flatten(1)), m.degenerate | m.constant | ~gt.flatten(1).any(1))


def bounding_box_mask(hot: Tensor) -> Tensor:
    """The filled bounding box (first to last row and column, inclusive) of each True set in ``hot``
    [N, H, W] bool → bool [N, H, W]; all False where ``hot`` is empty."""
    rows = hot.any(dim=2)
    cols = hot.any(dim=1)
    h, w = hot.shape[-2:]
    ar_h = torch.arange(h, device=hot.device)
    ar_w = torch.arange(w, device=hot.device)
    big = torch.iinfo(torch.int64).max
    r0 = torch.where(rows, ar_h, big).amin(1)
    r1 = torch.where(rows, ar_h, -1).amax(1)
    c0 = torch.where(cols, ar_w, big).amin(1)
    c1 = torch.where(cols, ar_w, -1).amax(1)
    in_rows = (ar_h[None] >= r0[:, None]) & (ar_h[None] <= r1[:, None])
    in_cols = (ar_w[None] >= c0[:, None]) & (ar_w[None] <= c1[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def gridpg(maps: MapsLike, target_cell: Tensor, n: int, size: int | tuple[int, int] | None = None) -> Tensor:
    """Grid pointing game: share of the positive mass in cell ``target_cell`` (row-major, [N] int) of an
    ``n × n`` grid, float64 [N] in [0, 1]."""
    m = maps if isinstance(maps, AnalysisMaps) else AnalysisMaps(maps, size)
    cells = m.zones((n, n))
    target = target_cell.to(m.device).long()
    if ((target < 0) | (target >= n * n)).any():
        raise ValueError(f"target_cell values must be in 0..{n * n - 1} for a {n}×{n} grid")
    share = cells.gather(1, target[:, None])[:, 0].clamp(0.0, 1.0)  # float32 zone sums reach 1 + 1e-7
    return nan_where(share, m.degenerate)


LOCALIZATION_METRICS = {
    "pointing_game": pointing_game,
    "energy_pointing_game": energy_pointing_game,
    "mask_iou": mask_iou,
    "pixel_auroc": pixel_auroc,
    "cnr": cnr,
    "gmm_iou": gmm_iou,
    "gmm_miou": gmm_miou,
    "gmm_box_iou": gmm_box_iou,
    "box_iou": box_iou,
}
