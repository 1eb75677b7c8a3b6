"""Localization and complexity metrics: exact small cases, scikit-learn parity, degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

import evidrift  # noqa: F401
from evidrift.metrics import complexity, localization
from evidrift.metrics.common import AnalysisMaps


def _mask(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, r0:r1, c0:c1] = True
    return m


def test_pointing_and_energy() -> None:
    x = torch.zeros(2, 8, 8)
    x[0, 2, 2] = 3.0
    x[0, 6, 6] = 1.0
    x[1, 6, 6] = 1.0
    mask = _mask(8, 8, 0, 4, 0, 4).expand(2, -1, -1)
    assert localization.pointing_game(x, mask).tolist() == [1.0, 0.0]
    assert localization.energy_pointing_game(x, mask).tolist() == pytest.approx([0.75, 0.0])
    assert localization.mask_iou(x, mask, k=1 / 64).tolist() == pytest.approx([1 / 16, 0.0])


@pytest.mark.parametrize("ties", [False, True])
def test_pixel_auroc_matches_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 17)).astype(np.float32)
    if ties:
        x = np.round(x * 4) / 4
    mask = rng.random((3, 20, 17)) < 0.3
    got = localization.pixel_auroc(torch.from_numpy(x), torch.from_numpy(mask))
    for i in range(3):
        assert got[i].item() == pytest.approx(roc_auc_score(mask[i].ravel(), x[i].ravel()), abs=1e-5)


def test_cnr_and_box_iou_exact() -> None:
    x = torch.zeros(1, 10, 10)
    x[0, 2:5, 3:7] = 1.0
    mask = _mask(10, 10, 2, 5, 3, 7)
    assert localization.box_iou(x, mask, t=0.5).item() == pytest.approx(1.0)
    boxes = localization.boxes_to_mask([[(3, 2, 5, 5), (5, 2, 7, 5)]], (10, 10))
    assert torch.equal(boxes, mask)
    shifted = _mask(10, 10, 2, 5, 5, 9)  # overlaps 3×2 of 3×4 and 3×4
    assert localization.box_iou(x, shifted).item() == pytest.approx(6 / 18)
    # perfect separation with no variance → denominator 0 → NaN, flagged rather than inf
    assert math.isnan(localization.cnr(x, mask).item())
    y = x.clone()
    y[0, 0, 0] = 0.5
    assert localization.cnr(y, mask).item() == pytest.approx(
        (1 - 0.5 / 88) / math.sqrt(0.25 * (1 / 88) * (87 / 88))
    )


def _reference_gmm_foreground(q: np.ndarray) -> np.ndarray:
    """chest-distillation's GMMMaskSuggestor on one map: scikit-learn's 2-component GMM, threshold at the mean
    of its means, then the orphan filter (3 × 3 mean on the interior pixels, ≥ 0.5 → 1), as its code does."""
    gm = GaussianMixture(n_components=2, random_state=0).fit(q.reshape(-1, 1))
    binary = (q > np.mean(gm.means_)).astype(np.float32)
    img = torch.from_numpy(binary)[None, None]
    img[..., 1:-1, 1:-1] = torch.nn.functional.conv2d(img, torch.full((1, 1, 3, 3), 1 / 9))
    return (img[0, 0] >= 0.5).numpy()


def test_gmm_foreground_matches_chest_distillation_on_bimodal_maps() -> None:
    rng = np.random.default_rng(1)
    x = np.where(
        rng.random((2, 24, 24)) < 0.25, rng.normal(0.8, 0.05, (2, 24, 24)), rng.normal(0.2, 0.05, (2, 24, 24))
    )
    x[:, 6:14, 8:18] += 0.6  # a blob, so the orphan filter has something to keep
    x = x.astype(np.float32)
    fg = localization.gmm_foreground(torch.from_numpy(x)).numpy()
    for i in range(2):
        q = (x[i] - x[i].min()) / (x[i].max() - x[i].min())
        assert (fg[i] == _reference_gmm_foreground(q)).mean() > 0.995
    blob = np.zeros((2, 24, 24), dtype=bool)
    blob[:, 6:14, 8:18] = True
    assert localization.gmm_iou(torch.from_numpy(x), torch.from_numpy(blob)).min().item() > 0.5


def test_gmm_threshold_on_a_sparse_map_matches_scikit_learn() -> None:
    """A cone of radius 8 on 64 × 64 (95 % zeros): p10 = p90 = 0, so EM needs other starting means; the
    midpoint then matches scikit-learn's GaussianMixture (k-means start), not the map's mean."""
    yy, xx = np.mgrid[0:64, 0:64]
    cone = np.clip(1 - np.hypot(yy - 32, xx - 32) / 8, 0, None).astype(np.float32)
    mine = localization.gmm_threshold(torch.from_numpy(cone)[None]).item()
    gm = GaussianMixture(n_components=2, random_state=0).fit(cone.reshape(-1, 1))
    assert mine == pytest.approx(float(np.mean(gm.means_)), abs=0.02)
    assert mine > 2 * cone.mean()


def test_gmm_threshold_is_the_midpoint_and_orphans_are_filtered() -> None:
    # a smooth blob: posterior > ½ would take the wide shoulder; the midpoint rule takes the core only
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 4.0**2))[None]
    threshold = localization.gmm_threshold(blob).item()
    fg = localization.gmm_foreground(blob)
    core = blob > threshold
    assert 0 < threshold < 1 and torch.equal(fg, localization.filter_orphan_pixels(core))
    # the orphan filter: a lone interior pixel goes, a 3 × 3 square stays, the border is kept
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2, 5] = True
    mask[0, 4:7, 1:4] = True
    mask[0, 0, 0] = True
    out = localization.filter_orphan_pixels(mask)
    assert not out[0, 2, 5] and out[0, 5, 2] and out[0, 0, 0]
    assert out[0, 4:7, 1:4].sum() == 5  # centre + 4 edge-centres have ≥ 5 of 9 set; corners have 4
    # gmm_box_iou: the bounding box of the foreground vs the mask
    gt = torch.zeros(1, 32, 32, dtype=torch.bool)
    rows, cols = torch.nonzero(fg[0], as_tuple=True)
    gt[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert localization.gmm_box_iou(blob, gt).item() == pytest.approx(1.0)
    assert localization.gmm_iou(blob, gt).item() == pytest.approx(fg.sum().item() / gt.sum().item())


def test_gridpg_share_in_target_cell() -> None:
    x = torch.zeros(2, 6, 6)
    x[:, 0:3, 3:6] = 1.0  # top-right cell of a 2×2 grid
    x[1, 4, 0] = 9.0
    got = localization.gridpg(x, torch.tensor([1, 1]), n=2)
    assert got.tolist() == pytest.approx([1.0, 9 / 18])
    with pytest.raises(ValueError, match="target_cell"):
        localization.gridpg(x, torch.tensor([4, 0]), n=2)


def test_gridpg_stays_in_unit_interval_when_all_mass_is_in_the_target_cell() -> None:
    torch.manual_seed(0)
    x = torch.zeros(200, 64, 64)
    x[:, :32, 32:] = torch.rand(200, 32, 32) * 1e-3  # float32 normalization overshoots 1 for ~half of them
    got = localization.gridpg(x, torch.ones(200, dtype=torch.long), n=2)
    assert bool(((got >= 0) & (got <= 1)).all()) and got.min().item() == pytest.approx(1.0, abs=1e-6)


def test_degenerate_maps_and_empty_masks_give_nan() -> None:
    x = torch.rand(3, 8, 8)
    x[1] = 0.0
    mask = _mask(8, 8, 0, 4, 0, 4).repeat(3, 1, 1)
    mask[2] = False
    for fn in (
        localization.pointing_game,
        localization.energy_pointing_game,
        localization.pixel_auroc,
        localization.cnr,
        localization.gmm_iou,
        localization.gmm_box_iou,
        localization.box_iou,
        localization.mask_iou,
    ):
        out = fn(x, mask)
        assert not math.isnan(out[0].item()) and math.isnan(out[1].item()) and math.isnan(out[2].item()), fn
    for fn in (complexity.entropy, complexity.gini, complexity.sparseness):
        assert math.isnan(fn(x)[1].item())


def test_complexity_extremes_and_scale_invariance() -> None:
    uniform = torch.ones(1, 8, 8)
    point = torch.zeros(1, 8, 8)
    point[0, 3, 3] = 2.0
    assert complexity.entropy(uniform).item() == pytest.approx(1.0)
    assert complexity.entropy(point).item() == pytest.approx(0.0)
    assert complexity.gini(uniform).item() == pytest.approx(0.0)
    assert complexity.gini(point).item() == pytest.approx(1 - 1 / 64)
    assert complexity.sparseness(uniform).item() == pytest.approx(0.0, abs=1e-9)
    assert complexity.sparseness(point).item() == pytest.approx(1.0)
    x = torch.rand(4, 12, 12)
    for fn in (complexity.entropy, complexity.gini, complexity.sparseness):
        np.testing.assert_allclose(fn(x).numpy(), fn(x * 37.0).numpy(), atol=1e-6)
        np.testing.assert_allclose(fn(AnalysisMaps(x)).numpy(), fn(x).numpy())
