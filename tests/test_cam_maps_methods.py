"""Map helpers and the pure method functions (edge cases the engine tests do not reach)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evidrift  # noqa: F401
from evidrift.cam import is_degenerate, minmax_normalize, overlay, sum_to_one, upsample
from evidrift.cam.methods import eigencam, first_component_projection, gradcam_plusplus, xgradcam


def test_upsample_matches_interpolate_and_keeps_leading_dims():
    m = torch.rand(2, 3, 4, 5)
    out = upsample(m, (8, 10))
    assert out.shape == (2, 3, 8, 10)
    torch.testing.assert_close(
        out[1, 2], F.interpolate(m[1, 2][None, None], size=(8, 10), mode="bilinear")[0, 0]
    )
    assert upsample(m, 4).shape == (2, 3, 4, 4)


def test_minmax_and_sum_to_one():
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    torch.testing.assert_close(minmax_normalize(m)[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(minmax_normalize(m)[1], torch.zeros(2, 2))
    p = sum_to_one(torch.tensor([[[1.0, -1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]))
    torch.testing.assert_close(p[0], torch.tensor([[0.25, 0.0], [0.75, 0.0]]))
    assert torch.equal(p[1], torch.zeros(2, 2))


def test_is_degenerate():
    maps = torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]], [[float("nan"), 1.0]], [[-1.0, 0.0]]])
    assert is_degenerate(maps).tolist() == [False, True, True, True]


def test_overlay_rgb_float_and_uint8():
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    cam = torch.zeros(2, 2)
    cam[0, 0] = 1.0
    rgb = overlay(cam, image, alpha=0.0)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[..., 0], image)  # alpha 0: the gray image
    u8 = overlay(cam, image, as_uint8=True)
    assert u8.dtype == np.uint8 and u8.shape == (8, 8, 3)
    jet = overlay(cam, image, alpha=1.0)
    np.testing.assert_allclose(jet[0, 0], [0.5, 0.0, 0.0], atol=1e-6)  # jet(1.0) = dark red
    np.testing.assert_allclose(jet[-1, -1], [0.0, 0.0, 0.5], atol=1e-6)  # jet(0.0) = dark blue
    with pytest.raises(ValueError, match="2-D"):
        overlay(torch.zeros(1, 2, 2), image)


def test_gradcam_plusplus_zero_denominator_and_zero_gradient():
    # channel sum Σ A = −2 and G = 1: 2 + ΣA·G = 0 → α = 0 (pytorch-grad-cam would divide by its 1e-6)
    A = torch.tensor([[[[-1.0, -1.0]]]])
    G = torch.tensor([[[[1.0, 0.0]]]])
    assert torch.equal(gradcam_plusplus(A, G), torch.zeros(1, 1, 2))
    # general case vs the literal formula
    torch.manual_seed(0)
    A = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    G = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s = A.sum(dim=(2, 3), keepdim=True)
    alpha = G**2 / (2 * G**2 + s * G**3)
    w = (torch.relu(G) * alpha).sum(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(gradcam_plusplus(A, G), torch.relu((w * A).sum(dim=1)))


def test_xgradcam_zero_channel():
    A = torch.zeros(1, 2, 2, 2)
    A[0, 1] = 1.0
    G = torch.ones(1, 2, 2, 2)
    torch.testing.assert_close(xgradcam(A, G), torch.full((1, 2, 2), 4.0 / (4.0 + 1e-7)))


def test_eigen_projection_sign_and_rank_one():
    # a rank-one activation: A_k = c_k · u (u centred) → projection ∝ u, sign positive w.r.t. Σ_k A_k
    u = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    c = torch.tensor([1.0, 2.0, 0.5])
    A = (c[:, None, None] * u)[None]
    proj = first_component_projection(A, A.sum(dim=1))
    torch.testing.assert_close(proj[0] / proj[0].abs().max(), u / u.abs().max(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_component_projection(-A, A.sum(dim=1)), proj)
    wide = torch.randn(2, 40, 3, 3)  # K > h·w and K < h·w give the same projection
    tall = wide.reshape(2, 40, 9).transpose(1, 2).reshape(2, 9, 5, 8)
    assert first_component_projection(wide, wide.sum(dim=1)).shape == (2, 3, 3)
    assert first_component_projection(tall, tall.sum(dim=1)).shape == (2, 5, 8)
    assert (eigencam(A) >= 0).all()


def test_eigengradcam_is_oriented_by_the_gradient() -> None:
    """eigengradcam's sign follows Σ_k G_k A_k, so −G (the evidence against the class) gives a different map;
    oriented by Σ_k A_k it was sign-invariant in G and a signed sanity map of it was always 0."""
    from evidrift.cam.methods import eigengradcam, first_component_projection

    torch.manual_seed(0)
    A = torch.rand(2, 6, 5, 5)
    G = torch.randn(2, 6, 5, 5)
    pos, neg = eigengradcam(A, G), eigengradcam(A, -G)
    assert not torch.allclose(pos, neg)
    proj = first_component_projection(G * A, (G * A).sum(dim=1))
    torch.testing.assert_close(pos, torch.relu(proj))
    torch.testing.assert_close(neg, torch.relu(-proj))  # the other side of the same component
