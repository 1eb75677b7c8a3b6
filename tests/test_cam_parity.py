"""Parity of evidrift's CAM methods with pytorch-grad-cam (ARCHITECTURE §8): max |Δ| of min-max maps ≤ 1e-4.

pytorch-grad-cam computes its activations and gradients with its own forward and ``.backward()``; its raw
layer-resolution map comes from its ``get_cam_image`` on them, then ReLU (as its ``compute_cam_per_layer``),
then an exact min-max normalization (no epsilon) — the same normalization is applied to evidrift's map. The
classifier weights are scaled up so that the logits have a trained scale (ARCHITECTURE §8's note on epsilons).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from pytorch_grad_cam import (
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import evidrift  # noqa: F401  (before timm)
from evidrift.cam import CAMEngine

REFERENCE = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "gradcam_elementwise": GradCAMElementWise,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
}


def tiny_model(arch: str) -> tuple[torch.nn.Module, str]:
    """Small members of the paper's families (same module types: BatchNormAct2d with in-place ReLU)."""
    torch.manual_seed(0)
    if arch == "densenet":
        model = timm.create_model(
            "densenet121", pretrained=False, num_classes=4, growth_rate=8, block_config=(1, 1, 2, 2)
        )
        layer = "features.norm5"
    else:
        model = timm.create_model(
            "resnetv2_50", pretrained=False, num_classes=4, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)
        )
        layer = "norm"
    with torch.no_grad():
        model.get_classifier().weight.mul_(1000.0)  # trained-scale logits
    return model.eval(), layer


def exact_minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    assert (span > 0).all(), "a parity map is constant: the comparison would be vacuous"
    return (maps - lo) / span


def reference_raw(model, layer_module, cls, x, targets) -> tuple[np.ndarray, np.ndarray]:
    """(pytorch-grad-cam's raw layer-resolution map before ReLU, its activations)."""
    cam = cls(model, [layer_module])
    wrapped = [ClassifierOutputTarget(t) for t in targets]
    cam(x, wrapped)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients
    raw = cam.get_cam_image(x, layer_module, wrapped, acts, grads[0].numpy() if grads else None, False)
    cam.activations_and_grads.release()
    return np.asarray(raw, dtype=np.float64), acts


@pytest.fixture(scope="module", params=["densenet", "resnetv2"])
def setup(request):
    model, layer = tiny_model(request.param)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with CAMEngine(model, [layer]) as engine:
        out = engine(x, "prediction", methods=list(REFERENCE))
    # the predicted class has a positive logit, so every method's map has positive mass (a real comparison)
    return model, layer, x, out


@pytest.mark.parametrize("method", list(REFERENCE))
def test_parity_with_pytorch_grad_cam(setup, method):
    model, layer, x, out = setup
    module = dict(model.named_modules())[layer]
    raw, acts = reference_raw(model, module, REFERENCE[method], x, out.targets.tolist())
    if method.startswith("eigen"):
        # pytorch-grad-cam keeps LAPACK's arbitrary sign; ARCHITECTURE §5 fixes it: positive correlation
        # with Σ_k A_k (eigencam) or Σ_k G_k A_k (eigengradcam)
        if method == "eigengradcam":
            cam = REFERENCE[method](model, [module])
            cam(x, [ClassifierOutputTarget(t) for t in out.targets.tolist()])
            grads = cam.activations_and_grads.gradients[0].numpy()
            cam.activations_and_grads.release()
            ref_sum = (grads * acts).sum(axis=1)
        else:
            ref_sum = acts.sum(axis=1)
        corr = (raw - raw.mean(axis=(1, 2), keepdims=True)) * (
            ref_sum - ref_sum.mean(axis=(1, 2), keepdims=True)
        )
        raw = raw * np.where(corr.sum(axis=(1, 2)) < 0, -1.0, 1.0)[:, None, None]
    expected = exact_minmax(np.maximum(raw, 0))
    mine = out.maps[method].numpy()
    assert mine.shape == expected.shape == (3, 4, 4)
    assert np.abs(exact_minmax(mine.astype(np.float64)) - expected).max() <= 1e-4


def test_scorecam_parity():
    model, layer = tiny_model("densenet")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    module = dict(model.named_modules())[layer]
    with CAMEngine(model, [layer], chunk_size=7) as engine:
        out = engine(x, "prediction", methods=["scorecam"])
    mine = out.maps["scorecam"].numpy()
    cam = ScoreCAM(model, [module])
    cam.batch_size = 16
    wrapped = [ClassifierOutputTarget(t) for t in out.targets.tolist()]
    cam(x, wrapped)
    acts = cam.activations_and_grads.activations[0].numpy()
    raw = cam.get_cam_image(x, module, wrapped, acts, None, False)
    cam.activations_and_grads.release()
    expected = exact_minmax(np.maximum(np.asarray(raw, dtype=np.float64), 0))
    assert np.abs(exact_minmax(mine.astype(np.float64)) - expected).max() <= 1e-4


def test_vit_tokens_parity_with_reshape_transform():
    """Token activations: evidrift's automatic grid reshape = pytorch-grad-cam with the usual transform."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=64).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(1000.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    layer = "blocks.5.norm1"
    with CAMEngine(model, [layer]) as engine:
        out = engine(x, "prediction", methods=["gradcam", "layercam"])

    def reshape_transform(t: torch.Tensor) -> torch.Tensor:
        grid = t[:, model.num_prefix_tokens :, :].reshape(t.shape[0], 4, 4, t.shape[2])
        return grid.permute(0, 3, 1, 2)

    module = dict(model.named_modules())[layer]
    for method, cls in (("gradcam", GradCAM), ("layercam", LayerCAM)):
        cam = cls(model, [module], reshape_transform=reshape_transform)
        wrapped = [ClassifierOutputTarget(t) for t in out.targets.tolist()]
        cam(x, wrapped)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, module, wrapped, acts, grads, False)
        cam.activations_and_grads.release()
        expected = exact_minmax(np.maximum(np.asarray(raw, dtype=np.float64), 0))
        assert out.maps[method].shape == (2, 4, 4)
        assert np.abs(exact_minmax(out.maps[method].numpy().astype(np.float64)) - expected).max() <= 1e-4
