"""Batched primitives shared by the drift, localization and complexity metrics (ARCHITECTURE §6).

Everything works on batches of maps ``[N, H, W]`` on the maps' own device. ``AnalysisMaps`` holds one batch
prepared for analysis (resized, negatives clipped, degenerate maps flagged and zeroed) and computes derived
tensors (sum-to-one ``p``, min-max ``q``, sorted values, tie-averaged ranks, entropy, centroid, ...) once, on
first use, so that many metrics share them.

Conventions:
- Coordinates: pixel centres ``((col + 0.5) / D, (row + 0.5) / D)`` with ``D = sqrt(H² + W²)``, so the
  image diagonal has length 1 and distances are in units of the diagonal.
- Top-k sets (``@k``): ``K = ceil(k · H · W)`` pixels; the threshold ``t`` is the K-th largest value (the
  ``1 − k`` quantile read as an order statistic) and the set is ``{m ≥ t} ∩ {m > 0}``: ties at the threshold
  are all included (no arbitrary tie-break by position) and zero-valued pixels are never "evidence". So a set
  can be larger than K (ties) or smaller (fewer than K positive pixels).
- Degenerate maps: non-finite anywhere (before resizing) or all zero (after clipping). They are replaced by
  zeros for computation and every metric that uses them returns NaN; ``constant`` maps (positive and flat)
  break only the metrics that need spread (min-max, correlations).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Gaussian window of SSIM (Wang et al. 2004 / scikit-image): sigma 1.5, truncated at 3.5 sigma → 11 taps.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5


def as_size(size: int | tuple[int, int] | None, h: int, w: int) -> tuple[int, int]:
    """``size`` as (H, W): an int means a square, None keeps (h, w)."""
    if size is None:
        return h, w
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialiasing) of float maps [N, h, w] → [N, H, W]."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def topk_count(n: int, k: float) -> int:
    """Pixels in a top-k set of n pixels: ``ceil(k · n)`` (at least 1), robust to float noise in k · n."""
    return max(1, min(n, math.ceil(k * n - 1e-9)))


def gaussian_kernel1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> Tensor:
    """The normalized 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (radius ``int(truncate·sigma+0.5)``),
    float64 [2r + 1]."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_filter_valid(x: Tensor, kernel: Tensor) -> Tensor:
    """Separable 'valid' correlation of images [B, H, W] with a 1-D kernel [T] along both axes.

    Returns [B, H − T + 1, W − T + 1]: only outputs whose window lies fully inside the image (the region
    scikit-image's SSIM averages over, so the border mode never matters). Implemented as T shifted
    multiply-adds per axis, which on CPU beats grouped/1-D convolutions and banded GEMMs by 2-40×.
    """
    taps = [float(v) for v in kernel]
    t = len(taps)
    h, w = x.shape[-2:]
    wo, ho = w - t + 1, h - t + 1
    y = x[..., :, 0:wo] * taps[0]
    for j in range(1, t):
        y.add_(x[..., :, j : j + wo], alpha=taps[j])
    z = y[..., 0:ho, :] * taps[0]
    for j in range(1, t):
        z.add_(y[..., j : j + ho, :], alpha=taps[j])
    return z


# --- sorting and ranks --------------------------------------------------------------------------------------
def _radix_argsort_rows(x: np.ndarray) -> np.ndarray:
    """Stable argsort of each row of a non-negative float32 array [R, n] (no NaN, no −0.0).

    The bit patterns of non-negative IEEE floats order like unsigned integers, so two stable 16-bit radix
    passes (numpy's ``argsort(kind='stable')`` is a radix sort for 16-bit types) give the exact order, about
    3× faster than a comparison sort.
    """
    bits = x.view(np.uint32)
    low = (bits & 0xFFFF).astype(np.uint16)
    high = (bits >> 16).astype(np.uint16)
    first = np.argsort(low, axis=1, kind="stable")
    second = np.argsort(np.take_along_axis(high, first, axis=1), axis=1, kind="stable")
    return np.take_along_axis(first, second, axis=1)


def _average_ranks_sorted_np(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged, in sorted order, for sorted rows [R, n] → float64 [R, n]."""
    r, n = s.shape
    out = np.empty((r, n), dtype=np.float64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    for i in range(r):
        np.not_equal(s[i, 1:], s[i, :-1], out=new[1:])
        starts = np.flatnonzero(new)
        if starts.size == n:
            out[i] = np.arange(1.0, n + 1.0)
            continue
        sizes = np.diff(starts, append=n)
        out[i] = np.repeat(starts + (sizes + 1) * 0.5, sizes)
    return out


def _sort_and_rank_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    perm = _radix_argsort_rows(x)
    s = np.take_along_axis(x, perm, axis=1)
    avg = _average_ranks_sorted_np(s)
    ranks = np.empty_like(avg)
    np.put_along_axis(ranks, perm, avg, axis=1)
    return s, ranks


def _sort_and_rank_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    s, perm = torch.sort(x, dim=1, stable=True)
    r, n = s.shape
    pos = torch.arange(n, device=x.device).expand(r, n)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    first = torch.cummax(torch.where(new, pos, 0), dim=1).values
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    last = torch.cummin(torch.where(end, pos, n).flip(1), dim=1).values.flip(1)
    avg = (first + last).double() * 0.5 + 1.0
    ranks = torch.empty_like(avg).scatter_(1, perm, avg)
    return s, ranks


def sort_and_rank(x: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Sorted rows and tie-averaged ranks of non-negative finite float32 rows [R, n].

    Returns (sorted values float32 [R, n] ascending, ranks float64 [R, n] in the rows' original positions,
    1-based, ties get the average of their positions — scipy's ``rankdata(method='average')``).
    ``backend``: ``auto`` (numpy radix sort on CPU, split over the torch intra-op threads; torch.sort
    elsewhere), ``numpy`` or ``torch``.
    """
    if backend == "torch" or (backend == "auto" and (x.device.type != "cpu" or x.dtype != torch.float32)):
        return _sort_and_rank_torch(x)
    if x.dtype != torch.float32:
        raise ValueError(f"the numpy radix sort needs float32 rows, got {x.dtype}")
    xn = x.detach().contiguous().numpy()
    workers = max(1, min(torch.get_num_threads(), xn.shape[0]))
    if workers == 1:
        s, r = _sort_and_rank_np(xn)
    else:
        parts = np.array_split(np.arange(xn.shape[0]), workers)
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda idx: _sort_and_rank_np(xn[idx[0] : idx[-1] + 1]), parts))
        s = np.concatenate([p[0] for p in results])
        r = np.concatenate([p[1] for p in results])
    return torch.from_numpy(s), torch.from_numpy(r)


# --- a prepared batch ---------------------------------------------------------------------------------------
class AnalysisMaps:
    """A batch of maps prepared for analysis: float32 [N, H, W] on the input's device, ≥ 0.

    ``maps`` [N, h, w] (any float dtype, any sign) is resized bilinearly to ``size`` (None: keep), then
    negatives are clipped to 0. Flags (bool [N]): ``nonfinite`` (a NaN/inf anywhere in the input),
    ``zero`` (all zero after clipping), ``constant`` (positive but flat), ``degenerate`` = nonfinite | zero.
    Degenerate maps are replaced by zeros so that batched arithmetic never sees NaN.
    Derived tensors are computed on first access and cached.
    """

    def __init__(self, maps: Tensor, size: int | tuple[int, int] | None = None) -> None:
        if maps.ndim != 3:
            raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
        x = maps.detach()
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16, torch.float64):
            x = x.float()
        self.nonfinite: Tensor = ~torch.isfinite(x).flatten(1).all(dim=1)
        if self.nonfinite.any():
            x = torch.where(self.nonfinite[:, None, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
        x = resize(x, as_size(size, *x.shape[-2:]))
        # where() also turns -0.0 into +0.0, which the radix sort relies on
        self.m: Tensor = torch.where(x > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)).contiguous()
        flat = self.m.flatten(1)
        self.max: Tensor = flat.amax(dim=1)
        self.min: Tensor = flat.amin(dim=1)
        self.zero: Tensor = (self.max <= 0) & ~self.nonfinite
        self.degenerate: Tensor = self.nonfinite | self.zero
        self.constant: Tensor = (self.max == self.min) & ~self.degenerate
        self.cache: dict[object, object] = {}

    @property
    def n(self) -> int:
        return self.m.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.m.shape[1]), int(self.m.shape[2])

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.m.device

    @cached_property
    def flat(self) -> Tensor:
        """[N, H·W] float32 view of ``m``."""
        return self.m.flatten(1)

    @cached_property
    def total(self) -> Tensor:
        """Σ m per map, float64 [N] (1 for degenerate maps, to keep divisions finite)."""
        total = self.flat.sum(dim=1, dtype=torch.float64)
        return torch.where(self.degenerate, torch.ones_like(total), total)

    @cached_property
    def sum_squares(self) -> Tensor:
        """Σ m² per map, float64 [N] (float32 squares, float64 sum)."""
        return (self.flat * self.flat).sum(dim=1, dtype=torch.float64)

    @cached_property
    def rank_sum_squares(self) -> Tensor:
        """Σ rank² per map, float64 [N]."""
        return (self.ranks * self.ranks).sum(dim=1)

    @cached_property
    def p(self) -> Tensor:
        """Sum-to-one maps, float32 [N, H, W] (zeros for degenerate maps)."""
        return self.m / self.total.float()[:, None, None]

    @cached_property
    def q(self) -> Tensor:
        """Min-max normalized maps in [0, 1], float32 [N, H, W] (zeros for degenerate and constant maps)."""
        span = (self.max - self.min).where(self.max > self.min, torch.ones_like(self.max))
        q = (self.m - self.min[:, None, None]) / span[:, None, None]
        return q.clamp_(0.0, 1.0)

    @cached_property
    def sorted_and_ranks(self) -> tuple[Tensor, Tensor]:
        s, r = sort_and_rank(self.flat)
        return s.to(self.device), r.to(self.device)

    @property
    def sorted(self) -> Tensor:
        """Values of each map ascending, float32 [N, H·W]."""
        return self.sorted_and_ranks[0]

    @property
    def ranks(self) -> Tensor:
        """Tie-averaged 1-based ranks in pixel order, float64 [N, H·W]."""
        return self.sorted_and_ranks[1]

    def topk_threshold(self, k: float) -> Tensor:
        """Threshold of the top-k set, float32 [N]: the K-th largest value, raised to the smallest positive
        float when it is 0 so that ``m ≥ t`` never selects zero pixels."""
        kk = topk_count(self.pixels, k)
        if "sorted_and_ranks" in self.__dict__:
            t = self.sorted[:, self.pixels - kk]
        else:
            t = torch.kthvalue(self.flat, self.pixels - kk + 1, dim=1).values
        tiny = torch.tensor(
            torch.finfo(torch.float32).tiny * 2**-23, device=self.device
        )  # smallest subnormal
        return torch.maximum(t, tiny)

    def topk_mask(self, k: float) -> Tensor:
        """The top-k set (module docstring), bool [N, H·W]."""
        return self.flat >= self.topk_threshold(k)[:, None]

    def topk_mass(self, k: float) -> Tensor:
        """Share of the map's mass in its K largest pixels, float64 [N] in (0, 1] (ties do not matter)."""
        kk = topk_count(self.pixels, k)
        top = self.sorted[:, self.pixels - kk :].sum(dim=1, dtype=torch.float64)
        return top / self.total

    @cached_property
    def entropy_bits(self) -> Tensor:
        """Shannon entropy of p in bits, float64 [N] (0 log 0 = 0)."""
        return -plogp_sum(self.p.flatten(1)) / math.log(2.0)

    @cached_property
    def centroid(self) -> Tensor:
        """Centre of mass of p as (x, y) in diagonal units, float64 [N, 2]."""
        h, w = self.shape
        diag = math.hypot(h, w)
        ys = (torch.arange(h, device=self.device, dtype=torch.float64) + 0.5) / diag
        xs = (torch.arange(w, device=self.device, dtype=torch.float64) + 0.5) / diag
        row_mass = self.p.sum(dim=2, dtype=torch.float64)
        col_mass = self.p.sum(dim=1, dtype=torch.float64)
        return torch.stack([(col_mass * xs).sum(1), (row_mass * ys).sum(1)], dim=1)

    @cached_property
    def peak(self) -> Tensor:
        """Location of the maximum (first in row-major order on ties) as (x, y) in diagonal units,
        float64 [N, 2]."""
        h, w = self.shape
        idx = self.flat.argmax(dim=1)
        diag = math.hypot(h, w)
        return torch.stack([(idx % w).double() + 0.5, (idx // w).double() + 0.5], dim=1) / diag

    def zones(self, grid: tuple[int, int]) -> Tensor:
        """Mass of p per zone of a ``rows × cols`` grid over the whole image, float64 [N, rows·cols] in
        row-major zone order (row 0 = top; col 0 = image left = patient's right on a PA chest film).
        Pixel row i belongs to zone row ``floor(i · rows / H)`` (likewise columns)."""
        rows, cols = grid
        h, w = self.shape
        row_zone = torch.arange(h, device=self.device) * rows // h
        col_zone = torch.arange(w, device=self.device) * cols // w
        r1 = F.one_hot(row_zone, rows).to(torch.float64)
        c1 = F.one_hot(col_zone, cols).to(self.p.dtype)
        per_row = (self.p @ c1).double()  # [N, H, cols]
        z = torch.einsum("hr,nhc->nrc", r1, per_row)
        return z.reshape(self.n, rows * cols)


def share_sort(*batches: AnalysisMaps) -> None:
    """Sort and rank several prepared batches of one size in one call (both CPU threads busy) and cache the
    results on each, so that later metrics reuse them."""
    todo = [m for m in batches if "sorted_and_ranks" not in m.__dict__]
    if not todo:
        return
    s, r = sort_and_rank(torch.cat([m.flat for m in todo]))
    sizes = [m.n for m in todo]
    for m, s_part, r_part in zip(todo, s.split(sizes), r.split(sizes), strict=True):
        m.__dict__["sorted_and_ranks"] = (s_part.to(m.device), r_part.to(m.device))


def plogp_sum(p: Tensor) -> Tensor:
    """Σ p·ln p over the last dim of non-negative p [N, P] (0·ln 0 = 0), float64 [N]."""
    tiny = torch.finfo(p.dtype).tiny
    return (p * torch.log(p.clamp_min(tiny))).sum(dim=-1, dtype=torch.float64)


def nan_where(values: Tensor, invalid: Tensor) -> Tensor:
    """``values`` as float64 with NaN where ``invalid`` (bool, same length)."""
    values = values.double()
    return torch.where(invalid, torch.full_like(values, float("nan")), values)
