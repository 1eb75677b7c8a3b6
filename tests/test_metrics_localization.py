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


def test_gmm_foreground_matches_sklearn_on_bimodal_maps() -> None:
    rng = np.random.default_rng(1)
    x = np.where(
        rng.random((2, 24, 24)) < 0.25, rng.normal(0.8, 0.05, (2, 24, 24)), rng.normal(0.2, 0.05, (2, 24, 24))
    )
    x = x.astype(np.float32)
    fg = localization.gmm_foreground(torch.from_numpy(x)).numpy()
    for i in range(2):
        q = (x[i] - x[i].min()) / (x[i].max() - x[i].min())
        gm = GaussianMixture(2, random_state=0).fit(q.reshape(-1, 1))
        ref = gm.predict(q.reshape(-1, 1)) == np.argmax(gm.means_[:, 0])
        assert (fg[i].ravel() == ref).mean() > 0.995
    mask = torch.from_numpy(x > 0.5)
    assert localization.gmm_iou(torch.from_numpy(x), mask).min().item() > 0.95
    assert localization.gmm_miou(torch.from_numpy(x), mask).min().item() > 0.95


def test_gridpg_share_in_target_cell() -> None:
    x = torch.zeros(2, 6, 6)
    x[:, 0:3, 3:6] = 1.0  # top-right cell of a 2×2 grid
    x[1, 4, 0] = 9.0
    got = localization.gridpg(x, torch.tensor([1, 1]), n=2)
    assert got.tolist() == pytest.approx([1.0, 9 / 18])
    with pytest.raises(ValueError, match="target_cell"):
        localization.gridpg(x, torch.tensor([4, 0]), n=2)


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
