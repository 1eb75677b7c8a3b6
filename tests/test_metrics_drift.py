"""Drift metrics: parity with scipy / scikit-image, exact small cases, properties (ARCHITECTURE §6, § 8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance
from skimage.metrics import structural_similarity

import evidrift  # noqa: F401  (before anything that may import torchvision)
from evidrift.metrics.common import AnalysisMaps, sort_and_rank
from evidrift.metrics.drift import (
    DRIFT_METRICS,
    compare,
    default_metric_names,
    metric_direction,
    resolve_metric,
)

ALL = default_metric_names()


def _structured(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Smooth blobs, ReLU'd (many exact zeros), some quantized to create ties."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w))
    for i in range(n):
        for _ in range(3):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 8)
            out[i] += rng.uniform(0.2, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out[i] -= 0.3 * out[i].max()
    out[1::2] = np.round(out[1::2] * 8) / 8  # heavy ties
    return out.astype(np.float32)


def _reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    x = np.clip(a, 0, None).astype(np.float64)
    y = np.clip(b, 0, None).astype(np.float64)
    qa = (x - x.min()) / (x.max() - x.min())
    qb = (y - y.min()) / (y.max() - y.min())
    return {
        "ssim": structural_similarity(
            qa, qb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        ),
        "spearman": stats.spearmanr(x.ravel(), y.ravel())[0],
        "pearson": stats.pearsonr(x.ravel(), y.ravel())[0],
        "js": distance.jensenshannon(x.ravel(), y.ravel(), base=2) ** 2,
        "cosine": 1 - distance.cosine(x.ravel(), y.ravel()),
    }


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_parity_with_reference_libraries(kind: str) -> None:
    rng = np.random.default_rng(1)
    if kind == "random":
        a = rng.random((5, 40, 33)).astype(np.float32) - 0.3
        b = rng.random((5, 40, 33)).astype(np.float32) - 0.3
    else:
        a = _structured(rng, 5, 40, 33)
        b = _structured(rng, 5, 40, 33)
    table = compare(
        torch.from_numpy(a), torch.from_numpy(b), metrics=["ssim", "spearman", "pearson", "js", "cosine"]
    )
    for i in range(5):
        ref = _reference(a[i], b[i])
        for name, value in ref.items():
            assert table[name][i] == pytest.approx(value, abs=1e-5), (kind, i, name)


def test_ranks_match_scipy_rankdata_on_both_backends() -> None:
    rng = np.random.default_rng(2)
    x = np.round(rng.random((4, 300)) * 5).astype(np.float32) / 5
    x[0] = 0.0
    for backend in ("numpy", "torch"):
        s, r = sort_and_rank(torch.from_numpy(x), backend=backend)
        np.testing.assert_array_equal(s.numpy(), np.sort(x, axis=1))
        np.testing.assert_array_equal(r.numpy(), stats.rankdata(x, axis=1))


def test_exact_small_case() -> None:
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1.0  # top-left
    b[0, 3, 3] = 1.0  # bottom-right
    t = compare(
        a,
        b,
        metrics=["topk_iou@0.1", "centroid_shift", "peak_shift", "js", "zone_tv", "zone_agreement"],
        zone_grid=(2, 2),
    )
    assert t["topk_iou@0.1"][0] == 0.0
    # centres (0.5, 0.5) and (3.5, 3.5) px; diagonal sqrt(32): distance 3·sqrt(2)/sqrt(32) = 0.75
    assert t["centroid_shift"][0] == pytest.approx(0.75)
    assert t["peak_shift"][0] == pytest.approx(0.75)
    assert t["js"][0] == pytest.approx(1.0)
    assert t["zone_tv"][0] == pytest.approx(1.0)
    assert t["zone_agreement"][0] == 0.0
    # ties at the threshold are included, zeros never: top-10% (2 px) of a map with 3 equal maxima
    c = torch.zeros(1, 4, 4)
    c[0, 0, :3] = 2.0
    d = torch.zeros(1, 4, 4)
    d[0, 0, 2:] = 5.0
    t = compare(c, d, metrics=["topk_iou@0.1", "dice@0.1", "topk_mass_change@0.1"])
    assert t["topk_iou@0.1"][0] == pytest.approx(1 / 4)  # {0,1,2} vs {2,3}
    assert t["dice@0.1"][0] == pytest.approx(2 / 5)
    assert t["topk_mass_change@0.1"][0] == pytest.approx(1.0 - 2 / 3)


def test_registry_names_aliases_and_directions() -> None:
    assert "topk_iou@0.05" in ALL and "topk_mass_change@0.3" in ALL and "ssim" in ALL
    assert resolve_metric("topk_iou@0.10")[0] == "topk_iou@0.1"
    assert resolve_metric("spearmanr")[0] == "spearman"
    assert metric_direction("centroid_shift") == "lower" and metric_direction("dice@0.2") == "higher"
    assert metric_direction("gini_change") == "zero"
    with pytest.raises(ValueError, match="unknown drift metric 'nope'"):
        resolve_metric("nope")
    with pytest.raises(ValueError, match="needs a fraction"):
        resolve_metric("topk_iou")
    with pytest.raises(ValueError, match="must be in"):
        resolve_metric("dice@1.5")
    assert len(DRIFT_METRICS) == 14


def test_degenerate_maps_give_nan_and_reason_without_raising() -> None:
    rng = torch.Generator().manual_seed(0)
    a = torch.rand(5, 16, 16, generator=rng)
    b = torch.rand(5, 16, 16, generator=rng)
    a[1] = 0.0
    b[2, 3, 3] = float("nan")
    a[3] = -1.0  # all negative → all zero after clipping
    b[4] = 0.5  # constant
    t = compare(a, b, chunk_size=2)
    assert list(t["degenerate"]) == [False, True, True, True, True]
    assert t["degenerate_reason"][1] == "a: all zero"
    assert t["degenerate_reason"][2] == "b: non-finite"
    assert t["degenerate_reason"][3] == "a: all zero"
    assert t["degenerate_reason"][4] == "b: constant"
    metrics = [c for c in t.columns if c not in ("degenerate", "degenerate_reason")]
    assert t.loc[0, metrics].notna().all()
    assert t.loc[[1, 2, 3], metrics].isna().all().all()
    assert math.isnan(t["spearman"][4]) and math.isnan(t["ssim"][4]) and math.isnan(t["pearson"][4])
    assert not math.isnan(t["topk_iou@0.1"][4]) and not math.isnan(t["js"][4])


def test_resizes_to_common_size() -> None:
    a = torch.rand(2, 7, 7)
    big = torch.nn.functional.interpolate(a[:, None], size=(28, 28), mode="bilinear", align_corners=False)[
        :, 0
    ]
    t = compare(a, big, metrics=["pearson", "ssim", "topk_iou@0.2"])
    assert (
        np.allclose(t["pearson"], 1.0) and np.allclose(t["ssim"], 1.0) and np.allclose(t["topk_iou@0.2"], 1.0)
    )
    assert AnalysisMaps(a, 14).shape == (14, 14)


# --- properties ---------------------------------------------------------------------------------------------
def _maps(seed: int, n: int, h: int, w: int, zeros: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, h, w, generator=g)
    return torch.where(torch.rand(n, h, w, generator=g) < zeros, torch.zeros(()), x)


shapes = st.tuples(
    st.integers(0, 10_000),
    st.integers(1, 4),
    st.integers(11, 24),
    st.integers(11, 24),
    st.sampled_from([0.0, 0.3, 0.8]),
)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_identity(params: tuple[int, int, int, int, float]) -> None:
    a = _maps(*params)
    t = compare(a, a.clone())
    for name in ALL:
        direction = metric_direction(name)
        expected = {"higher": 1.0, "lower": 0.0, "zero": 0.0}[direction]
        if name in ("cosine",):
            expected = 1.0
        assert np.allclose(t[name], expected, atol=1e-6), name


@settings(max_examples=20, deadline=None)
@given(shapes, st.floats(0.01, 100.0))
def test_symmetry_bounds_and_scale_invariance(params: tuple[int, int, int, int, float], scale: float) -> None:
    a = _maps(*params)
    b = _maps(params[0] + 1, *params[1:])
    ab = compare(a, b)
    ba = compare(b, a)
    scaled = compare(a * scale, b)
    for name in ALL:
        lo, hi = resolve_metric(name)[1].bounds
        assert ((ab[name] >= lo - 1e-9) & (ab[name] <= hi + 1e-9)).all(), name
        if metric_direction(name) == "zero":
            assert np.allclose(ab[name], -ba[name], atol=1e-9), name
        else:
            assert np.allclose(ab[name], ba[name], atol=1e-6), name
        assert np.allclose(ab[name], scaled[name], atol=1e-5), name


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 26), st.integers(4, 26), st.integers(-10, 10), st.integers(-10, 10))
def test_blob_moved_by_d_gives_centroid_shift_d(cy: int, cx: int, dy: int, dx: int) -> None:
    h, w = 56, 54
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blob = lambda y, x: torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0).where(  # noqa: E731
        ((yy - y) ** 2 + (xx - x) ** 2) <= 9, torch.zeros(())
    )
    a = blob(cy + 13, cx + 13)[None]
    b = blob(cy + 13 + dy, cx + 13 + dx)[None]
    t = compare(a, b, metrics=["centroid_shift", "peak_shift"])
    d = math.hypot(dy, dx) / math.hypot(h, w)
    assert t["centroid_shift"][0] == pytest.approx(d, abs=1e-6)
    assert t["peak_shift"][0] == pytest.approx(d, abs=1e-9)


def test_chunked_parallel_run_equals_one_chunk_and_keeps_thread_count() -> None:
    a, b = _maps(5, 7, 20, 18, 0.3), _maps(6, 7, 20, 18, 0.3)
    threads = torch.get_num_threads()
    one = compare(a, b, chunk_size=100)
    torch.set_num_threads(2)
    try:
        many = compare(a, b, chunk_size=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert one.drop(columns=["degenerate_reason"]).equals(many.drop(columns=["degenerate_reason"]))
