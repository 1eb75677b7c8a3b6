"""Drift metrics: evidrift (batched torch) vs a per-pair loop over scikit-image / scipy / numpy.

    .venv/bin/python benchmarks/metrics.py [--pairs 10000] [--loop-pairs 300] [--size 224] [--threads 2]

Maps: CAM-like 7×7 maps (random Gaussian blobs minus an offset, so ReLU leaves exact zeros), upsampled
bilinearly to ``--size`` by both sides (evidrift inside ``compare``, the loop with ``F.interpolate``
per pair),
every drift metric at every default k. evidrift runs on all ``--pairs``; the per-pair loop runs on the first
``--loop-pairs`` and is extrapolated (said in the output). Both sides' values are checked to agree.
Also prints the metrics' time as a share of the explain step for the same images (a timed ``CAMEngine`` run
on densenet201 when ``evidrift.cam`` is importable, else the documented forward throughput) and the effect of
a smaller analysis size on speed and values.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from scipy.spatial import distance
from skimage.metrics import structural_similarity

import evidrift  # noqa: F401  (first: torchvision compat)
from evidrift.metrics.drift import DEFAULT_TOPK, DEFAULT_ZONE_GRID, compare, default_metric_names, format_k

DENSENET_FWD_IMG_PER_S = 23.0  # DEVELOPERS: densenet201, 224 px, 2 threads, forward only


def cam_like_maps(n: int, seed: int, side: int = 7) -> torch.Tensor:
    """[n, side, side] float16 maps like a last-stage CAM: 1-3 Gaussian blobs minus 30 % of the max, ReLU."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    out = torch.zeros(n, side, side)
    for _ in range(3):
        c = torch.rand(n, 2, generator=g) * side
        s = 0.6 + torch.rand(n, generator=g) * 1.5
        w = torch.rand(n, generator=g)
        d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
        out += w[:, None, None] * torch.exp(-d2 / (2 * s[:, None, None] ** 2))
    out -= 0.3 * out.amax(dim=(1, 2), keepdim=True)
    return out.clamp_min(0).half()


# --- the per-pair reference loop ----------------------------------------------------------------------------
def loop_pair(
    a: np.ndarray, b: np.ndarray, topk: tuple[float, ...], grid: tuple[int, int]
) -> dict[str, float]:
    """Every drift metric of one pair with scikit-image / scipy / numpy (float64), evidrift's definitions."""
    a = np.clip(a.astype(np.float64), 0, None)
    b = np.clip(b.astype(np.float64), 0, None)
    h, w = a.shape
    n = h * w
    diag = math.hypot(h, w)
    fa, fb = a.ravel(), b.ravel()
    pa, pb = a / a.sum(), b / b.sum()
    qa = (a - a.min()) / (a.max() - a.min())
    qb = (b - b.min()) / (b.max() - b.min())
    out: dict[str, float] = {}
    kth = sorted({n - max(1, math.ceil(k * n - 1e-9)) for k in topk})
    part_a, part_b = np.partition(fa, kth), np.partition(fb, kth)
    for k in topk:
        kk = max(1, math.ceil(k * n - 1e-9))
        ta, tb = part_a[n - kk], part_b[n - kk]
        sa = (fa >= ta) & (fa > 0)
        sb = (fb >= tb) & (fb > 0)
        inter = np.count_nonzero(sa & sb)
        out[f"topk_iou@{format_k(k)}"] = inter / np.count_nonzero(sa | sb)
        out[f"dice@{format_k(k)}"] = 2 * inter / (np.count_nonzero(sa) + np.count_nonzero(sb))
    ys, xs = (np.arange(h) + 0.5) / diag, (np.arange(w) + 0.5) / diag
    ca = np.array([(pa.sum(0) * xs).sum(), (pa.sum(1) * ys).sum()])
    cb = np.array([(pb.sum(0) * xs).sum(), (pb.sum(1) * ys).sum()])
    out["centroid_shift"] = float(np.linalg.norm(ca - cb))
    ia, ib = np.unravel_index(np.argmax(a), a.shape), np.unravel_index(np.argmax(b), b.shape)
    out["peak_shift"] = math.hypot(ia[0] - ib[0], ia[1] - ib[1]) / diag
    rows, cols = grid
    rz, cz = np.arange(h) * rows // h, np.arange(w) * cols // w
    za = np.array([pa[rz == r][:, cz == c].sum() for r in range(rows) for c in range(cols)])
    zb = np.array([pb[rz == r][:, cz == c].sum() for r in range(rows) for c in range(cols)])
    out["zone_agreement"] = float(np.argmax(za) == np.argmax(zb))
    out["zone_tv"] = 0.5 * float(np.abs(za - zb).sum())
    out["pearson"] = float(stats.pearsonr(fa, fb)[0])
    out["spearman"] = float(stats.spearmanr(fa, fb)[0])
    out["cosine"] = 1.0 - float(distance.cosine(fa, fb))
    out["ssim"] = float(
        structural_similarity(
            qa, qb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
    )
    out["js"] = float(distance.jensenshannon(fa, fb, base=2) ** 2)
    ha, hb = stats.entropy(fa) / math.log(n), stats.entropy(fb) / math.log(n)
    out["entropy_change"] = hb - ha
    sa_, sb_ = np.sort(fa), np.sort(fb)
    wts = 2 * np.arange(1, n + 1) - n - 1
    out["gini_change"] = (wts @ sb_) / (n * sb_.sum()) - (wts @ sa_) / (n * sa_.sum())
    for k in topk:
        kk = max(1, math.ceil(k * n - 1e-9))
        out[f"topk_mass_change@{format_k(k)}"] = (
            sb_[n - kk :].sum() / sb_.sum() - sa_[n - kk :].sum() / sa_.sum()
        )
    return out


def run_loop(a: torch.Tensor, b: torch.Tensor, size: int) -> tuple[float, list[dict[str, float]]]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the loop is single-threaded; keep F.interpolate from spawning threads
    start = time.perf_counter()
    rows = []
    for i in range(a.shape[0]):
        ua = F.interpolate(
            a[i : i + 1, None].float(), size=(size, size), mode="bilinear", align_corners=False
        )[0, 0]
        ub = F.interpolate(
            b[i : i + 1, None].float(), size=(size, size), mode="bilinear", align_corners=False
        )[0, 0]
        rows.append(loop_pair(ua.numpy(), ub.numpy(), DEFAULT_TOPK, DEFAULT_ZONE_GRID))
    elapsed = time.perf_counter() - start
    torch.set_num_threads(previous)
    return elapsed, rows


def explain_seconds_per_image(threads: int) -> tuple[float, str]:
    """Seconds the explain step spends per image (both stages: 2 × one forward + one backward, 4 methods)."""
    try:
        import timm

        from evidrift.cam import CAMEngine
    except ImportError as exc:  # the documented figure instead
        return 2.0 / DENSENET_FWD_IMG_PER_S, f"documented densenet201 forward throughput ({exc})"
    model = timm.create_model("densenet201", pretrained=False, num_classes=5).eval()
    x = torch.randn(8, 3, 224, 224)
    methods = ["gradcam++", "layercam", "gradcam", "xgradcam"]
    with CAMEngine(model, ["features.norm5"]) as engine:
        engine(x[:2], targets="prediction", methods=methods)  # warm-up
        start = time.perf_counter()
        engine(x, targets="prediction", methods=methods)
        per_image = (time.perf_counter() - start) / x.shape[0]
    return 2.0 * per_image, f"timed CAMEngine on densenet201, 224 px, batch 8, {threads} threads, 4 methods"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--loop-pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--small-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = default_metric_names()
    a, b = cam_like_maps(args.pairs, 0), cam_like_maps(args.pairs, 1)
    print(
        f"{args.pairs} pairs of 7×7 float16 CAM-like maps analysed at {args.size}×{args.size}, "
        f"{len(names)} drift metrics, torch threads {torch.get_num_threads()}"
    )

    compare(a[:64], b[:64], metrics=names, size=args.size, chunk_size=args.chunk_size)  # warm-up
    # interleave: blocks of evidrift and of the loop alternate, so that both see the same machine load
    m = min(args.loop_pairs, args.pairs)
    blocks = 10
    t_evidrift = t_loop = 0.0
    parts, rows = [], []
    for block in range(blocks):
        lo, hi = block * args.pairs // blocks, (block + 1) * args.pairs // blocks
        start = time.perf_counter()
        parts.append(compare(a[lo:hi], b[lo:hi], metrics=names, size=args.size, chunk_size=args.chunk_size))
        t_evidrift += time.perf_counter() - start
        llo, lhi = block * m // blocks, (block + 1) * m // blocks
        elapsed, block_rows = run_loop(a[llo:lhi], b[llo:lhi], args.size)
        t_loop += elapsed
        rows.extend(block_rows)
    table = pd.concat(parts, ignore_index=True)
    per_pair_evidrift = t_evidrift / args.pairs
    per_pair_loop = t_loop / m
    worst = max(
        abs(r[name] - table[name].iloc[i])
        for i, r in enumerate(rows)
        for name in names
        if np.isfinite(r[name])
    )
    print(
        f"evidrift   : {t_evidrift:8.2f} s for {args.pairs} pairs = "
        f"{1e3 * per_pair_evidrift:6.3f} ms/pair (measured)"
    )
    print(
        f"per-pair loop: {t_loop:6.2f} s for {m} pairs (interleaved with evidrift in {blocks} blocks) = "
        f"{1e3 * per_pair_loop:6.3f} ms/pair; "
        f"{args.pairs} pairs extrapolated: {per_pair_loop * args.pairs:8.1f} s"
    )
    print(
        f"speed-up   : {per_pair_loop / per_pair_evidrift:5.1f}x   "
        f"(max |difference| of values over {m} pairs: "
        f"{worst:.2e})"
    )

    t_small = time.perf_counter()
    small = compare(a, b, metrics=names, size=args.small_size, chunk_size=args.chunk_size)
    per_pair_small = (time.perf_counter() - t_small) / args.pairs
    print(
        f"analysis at {args.small_size}×{args.small_size}: {1e3 * per_pair_small:6.3f} ms/pair "
        "(not interleaved with the loop: compare timings with care on a loaded machine); "
        "mean |value(small) − value(full)| per metric:"
    )
    diffs = {
        name: float(np.nanmean(np.abs(small[name].to_numpy() - table[name].to_numpy()))) for name in names
    }
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in diffs.items()))

    explain, source = explain_seconds_per_image(torch.get_num_threads())
    methods = 4
    for label, per_pair in (
        (f"{args.size} px", per_pair_evidrift),
        (f"{args.small_size} px", per_pair_small),
    ):
        share = methods * per_pair / explain
        print(
            f"drift metrics at {label}: {methods} methods × {1e3 * per_pair:.2f} ms = "
            f"{1e3 * methods * per_pair:.1f} ms per image = {100 * share:.1f}% of the explain step "
            f"({1e3 * explain:.0f} ms per image for both stages; {source})"
        )


if __name__ == "__main__":
    main()
