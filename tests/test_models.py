"""models.py: aliases, heads, weights loading, freezing, CAM layers, checkpoints (tiny timm models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import evidrift  # noqa: F401  (before timm)
from evidrift.classifier import checkpoint, models
from evidrift.classifier.config import HeadConfig
from evidrift.classifier.freezing import (
    freeze_backbone,
    freeze_batchnorm_stats,
    is_frozen,
    set_train_mode,
    unfreeze,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_resolve_arch_aliases_and_timm_names() -> None:
    assert models.resolve_arch("densenet201") == "densenet201"
    assert models.resolve_arch("resnet50v2") == "resnetv2_50"
    assert models.resolve_arch("inceptionv3") == "inception_v3"
    assert models.resolve_arch("test_resnet") == "test_resnet"
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet5o'.*resnet50"):
        models.resolve_arch("resnet5o")


def test_default_input_size() -> None:
    assert models.default_input_size("inceptionv3") == 299
    assert models.default_input_size("resnet50v2") == 224
    assert models.default_input_size("test_resnet") == 160


@pytest.mark.parametrize(
    ("head", "n_linear", "n_bn"),
    [
        (HeadConfig(type="linear"), 1, 0),
        (HeadConfig(type="mlp2", hidden=7), 2, 1),
        (HeadConfig(type="mlp3"), 3, 2),
    ],
)
def test_heads(head: HeadConfig, n_linear: int, n_bn: int) -> None:
    module = models.build_head(12, 5, head)
    assert sum(isinstance(m, nn.Linear) for m in module.modules()) == n_linear
    assert sum(isinstance(m, nn.BatchNorm1d) for m in module.modules()) == n_bn
    assert module(torch.randn(4, 12)).shape == (4, 5)
    assert module(torch.randn(4, 12, 1, 1)).shape == (4, 5)  # timm's use_conv heads pool to [B, F, 1, 1]
    if head.type == "mlp2":
        assert module[1].out_features == 7


def test_linear_head_without_bias() -> None:
    module = models.build_head(8, 3, HeadConfig(type="linear", bias=False))
    assert module[-1].bias is None
    assert module(torch.zeros(2, 8)).abs().max() == 0


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "resnetv2_18"])
def test_build_model_head_replaces_classifier(arch: str) -> None:
    model = models.build_model(arch, 4, HeadConfig(type="mlp2", hidden=8)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        logits = model(x)
        via_head = models.get_head(model)(models.pooled_features(model, x))
    assert logits.shape == (2, 4)
    torch.testing.assert_close(logits, via_head, rtol=0, atol=0)
    assert models.pooled_features(model, x).shape == (2, models.num_pooled_features(model))
    assert model.num_classes == 4
    # the head is our module at timm's classifier path
    assert isinstance(models.get_head(model), nn.Sequential)
    assert models.head_name(model) == model.pretrained_cfg["classifier"]


def test_freeze_keeps_backbone_norm_in_eval_even_after_train() -> None:
    model = models.build_model("test_resnet", 3, HeadConfig(type="mlp2", hidden=4))
    freezing = freeze_backbone(model)
    set_train_mode(model, True, freezing)
    head = models.head_name(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(head + ".") for n in trainable)
    norms = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert models.get_head(model)[2].training  # the head's BatchNorm1d trains
    stats = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, norms, strict=True))
    assert is_frozen(model)
    model.train()  # a plain train() trains every module: the freezing is explicit, not patched in
    assert all(m.training for m in norms)
    set_train_mode(model, True, unfreeze(model))
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in norms)
    assert not is_frozen(model)


def test_freeze_batchnorm_stats_keeps_backbone_norms_fixed_but_trainable() -> None:
    model = models.build_model("test_resnet", 3, HeadConfig(type="mlp2", hidden=4))
    freezing = freeze_batchnorm_stats(model)
    set_train_mode(model, True, freezing)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert norms and not any(m.training for m in norms)
    assert all(m.training for m in convs)
    assert models.get_head(model)[2].training  # the head's BatchNorm1d is not the backbone's
    assert all(p.requires_grad for p in model.parameters())  # BatchNorm's weight and bias still train
    stats = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, norms, strict=True))
    assert all(m.weight.grad is not None for m in norms)
    set_train_mode(model, True, unfreeze(model))
    assert all(m.training for m in norms)
    assert "train" not in vars(model)  # nothing patched onto the instance


def test_feature_standardization_by_hand() -> None:
    features = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0], [5.0, 5.0, 4.0]])
    mean, scale = models.feature_standardization(features)
    assert torch.allclose(mean, torch.tensor([3.0, 5.0, 2.0]))
    # population std; the constant feature keeps scale 1 (only shifted)
    assert torch.allclose(scale, torch.tensor([(8 / 3) ** 0.5, 1.0, (8 / 3) ** 0.5]))
    mean, _ = models.feature_standardization(features, center=False)
    assert torch.equal(mean, torch.zeros(3))
    with pytest.raises(ValueError, match="N, F"):
        models.feature_standardization(torch.zeros(0, 3))


def test_shared_feature_scale_by_hand() -> None:
    # stds 1 and 3 (population), one constant feature: one scale for all, sqrt((1 + 9) / 2)
    features = torch.tensor([[0.0, 0.0, 7.0], [2.0, 6.0, 7.0]])
    mean, scale = models.feature_standardization(features, shared=True)
    assert torch.allclose(mean, torch.tensor([1.0, 3.0, 7.0]))
    assert torch.allclose(scale, torch.full((3,), 5.0**0.5))
    _, scale = models.feature_standardization(torch.ones(4, 3), shared=True)
    assert torch.equal(scale, torch.ones(3))  # all constant: only shifted


@pytest.mark.parametrize(
    "head",
    [
        HeadConfig(type="linear"),
        HeadConfig(type="linear", dropout=0.3),
        HeadConfig(type="mlp2", hidden=6),
        HeadConfig(type="mlp3", hidden=5, bias=False),
    ],
    ids=["linear", "linear-dropout", "mlp2", "mlp3-nobias"],
)
def test_fold_standardization_keeps_the_function(head: HeadConfig) -> None:
    features = torch.rand(40, 7) * torch.linspace(0.01, 3.0, 7) + 2.0  # all > 0, very unequal scales
    plain = models.build_head(7, 4, head)
    assert models.can_center(plain)
    mean, scale = models.feature_standardization(features)
    wrapped = models.StandardizedHead(plain, mean, scale)
    wrapped.train()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(5):  # train it a little, so BatchNorm running statistics move too
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(features), torch.arange(40) % 4).backward()
        optimizer.step()
    wrapped.eval()
    expected = wrapped(features[:, :, None, None])  # [B, F, 1, 1] input is flattened like the plain head's
    folded = models.fold_standardization(wrapped).eval()
    assert type(folded) is nn.Sequential and not any(
        isinstance(m, models.StandardizedHead) for m in folded.modules()
    )
    torch.testing.assert_close(folded(features), expected, rtol=1e-4, atol=1e-4)
    assert set(folded.state_dict()) == set(models.build_head(7, 4, head).state_dict())


def test_bias_free_linear_head_is_only_scaled() -> None:
    plain = models.build_head(3, 2, HeadConfig(type="linear", bias=False))
    assert not models.can_center(plain)
    features = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 9.0]])
    with pytest.raises(ValueError, match="bias-free"):
        models.fold_standardization(models.StandardizedHead(plain, torch.ones(3), torch.ones(3)))
    mean, scale = models.feature_standardization(features, center=False)
    wrapped = models.StandardizedHead(
        models.build_head(3, 2, HeadConfig(type="linear", bias=False)), mean, scale
    )
    expected = wrapped(features)
    torch.testing.assert_close(models.fold_standardization(wrapped)(features), expected)


def test_standardized_head_rejects_bad_statistics() -> None:
    head = models.build_head(3, 2)
    with pytest.raises(ValueError, match="> 0"):
        models.StandardizedHead(head, torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[F\]"):
        models.StandardizedHead(head, torch.zeros(3), torch.ones(4))


def test_cam_layers_default_auto_and_errors() -> None:
    dense = models.build_model("densenet121", 2)
    assert models.default_cam_layers(dense, "densenet121") == ["features.norm5"]
    v2 = models.build_model("resnetv2_18", 2)
    assert models.default_cam_layers(v2, "resnetv2_18") == ["norm"]
    assert models.resolve_cam_layers(v2, "resnetv2_18", ["auto"]) == ["stages.3"]
    tiny = models.build_model("test_resnet", 2)
    assert models.resolve_cam_layers(tiny, "test_resnet", ["default", "layer3", "auto"]) == [
        "layer4",
        "layer3",
    ]
    with pytest.raises(ValueError, match=r"cam layer 'layer9'.*candidates: \[.*'layer4'"):
        models.resolve_cam_layers(tiny, "test_resnet", ["layer9"])


@pytest.mark.parametrize(
    ("arch", "spatial"),
    [
        ("densenet201", "features.denseblock4"),
        ("resnet50v2", "stages.3"),
        ("inceptionv3", "Mixed_7b"),
        ("resnet18", "layer4.1.bn2"),
    ],
)
def test_spatial_cam_layer_of_the_paper_architectures(arch: str, spatial: str) -> None:
    with torch.device("meta"):
        model = models.build_model(arch, 5)
    keys = models.cam_layer_keys(model, arch, ["default", "spatial", "default"])
    assert list(keys.values()) == ["default", "spatial"] and list(keys)[1] == spatial
    with pytest.raises(ValueError, match="no `spatial` CAM layer is known for vit"):
        with torch.device("meta"):
            models.cam_layer_keys(
                models.build_model("vit_tiny_patch16_224", 5), "vit_tiny_patch16_224", ["spatial"]
            )


def test_methods_coincide_at_the_gap_fed_layer_and_differ_at_the_spatial_one() -> None:
    """At ``default`` (feeds global average pooling + a linear head) G is constant over space per channel:
    gradcam ≡ xgradcam to float rounding. At ``spatial`` (before the last BatchNorm + residual + ReLU) the
    ReLU mask makes G vary over space, and the two maps differ."""
    from evidrift.cam import CAMEngine

    torch.manual_seed(0)
    model = models.build_model("resnet18", 3).eval()
    for module in model.modules():  # timm zero-inits each block's last BatchNorm; a trained net has not
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
    layers = models.resolve_cam_layers(model, "resnet18", ["default", "spatial"])
    x = torch.randn(4, 3, 96, 96)
    with CAMEngine(model, layers) as engine:
        out = engine(x, "prediction", methods=["gradcam", "xgradcam"])

    def minmax(m: torch.Tensor) -> torch.Tensor:
        flat = m.flatten(1)
        return (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True))

    at_default = (minmax(out.maps[(layers[0], "gradcam")]) - minmax(out.maps[(layers[0], "xgradcam")])).abs()
    at_spatial = (minmax(out.maps[(layers[1], "gradcam")]) - minmax(out.maps[(layers[1], "xgradcam")])).abs()
    assert at_default.max() < 1e-4 and at_spatial.max() > 0.05


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = models.build_model("test_resnet", 3, HeadConfig(type="mlp3", hidden=6, bias=False)).eval()
    meta = {
        "arch": "test_resnet",
        "head": HeadConfig(type="mlp3", hidden=6, bias=False).model_dump(),
        "stage": 1,
    }
    path = checkpoint.save_checkpoint(tmp_path / "stage1.safetensors", model, {**meta, "image_size": 32})
    loaded, read = checkpoint.load_checkpoint(path)
    assert read.timm_name == "test_resnet" and read.stage == 1 and read.num_classes == 3
    assert set(read.versions) == {"torch", "timm", "evidrift"}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_checkpoint_sidecar_must_match_weights(tmp_path: Path) -> None:
    model = models.build_model("test_resnet", 2)
    path = checkpoint.save_checkpoint(tmp_path / "a.safetensors", model, {"head": HeadConfig().model_dump()})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    checkpoint.save_checkpoint(
        path, models.build_model("test_resnet", 2), {"head": HeadConfig().model_dump()}
    )
    path.with_suffix(".json").write_text(json.dumps(sidecar))  # stale sidecar of other weights
    with pytest.raises(ValueError, match="SHA-256 differs"):
        checkpoint.load_checkpoint(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        checkpoint.load_checkpoint(path)


def test_local_weights_file_loads_backbone_and_ignores_classifier(tmp_path: Path) -> None:
    source = models.build_model("test_resnet", 7)  # another head size: its keys are dropped
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DDP-style prefix stripped
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        model = models.build_model("test_resnet", 3, weights=str(tmp_path / name))
        own = model.state_dict()
        head = models.head_name(model) + "."
        for key, value in source.state_dict().items():
            if not key.startswith(head):
                assert torch.equal(own[key], value), key


def test_local_weights_mismatch_is_reported(tmp_path: Path) -> None:
    other = models.build_model("test_efficientnet", 3)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(models.WeightsError, match=r"missing keys.*unexpected keys"):
        models.build_model("test_resnet", 3, weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(models.WeightsError, match="does not exist"):
        models.build_model("test_resnet", 3, weights=str(tmp_path / "absent.pth"))
    torch.save({"x": [1, 2]}, tmp_path / "junk.pth")
    with pytest.raises(models.WeightsError, match="does not hold a state dict"):
        models.build_model("test_resnet", 3, weights=str(tmp_path / "junk.pth"))


@pytest.mark.timeout(60)  # the hub client would retry for minutes if the network were tried
def test_imagenet_weights_fail_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-evidrift-test-cache")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: pytest.fail("probed the network"))
    with pytest.raises(
        models.WeightsError, match=r"HF_HUB_OFFLINE.*weights: /path/to/test_resnet\.safetensors"
    ):
        models.build_model("test_resnet", 2, weights="imagenet")


def test_imagenet_weights_fail_fast_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-evidrift-test-cache")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.WeightsError, match=r"not reachable.*not in the local cache"):
        models.build_model("test_resnet", 2, weights="imagenet")


def test_imagenet_weights_from_local_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = models.build_model("test_resnet", 2)
    timm_state = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("fc.")}
    timm_state["fc.weight"], timm_state["fc.bias"] = torch.zeros(1000, 96), torch.zeros(1000)
    save_file(timm_state, str(tmp_path / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_cached_hub_file", lambda name: str(tmp_path / "model.safetensors"))
    model = models.build_model("test_resnet", 3, weights="imagenet")
    assert torch.equal(model.state_dict()["layer4.0.conv1.weight"], timm_state["layer4.0.conv1.weight"])
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_check_input_size_names_the_side_and_the_keys() -> None:
    model = models.build_model("inceptionv3", 2)
    model.train()
    with pytest.raises(ValueError, match=r"cannot take 64 x 64 px inputs .*raise train\.stage0\.image_scale"):
        models.check_input_size(model, 64, "train.stage0.image_scale")
    assert model.training  # restored
    models.check_input_size(models.build_model("test_resnet", 2), 32, "x")


def test_standardized_head_learns_where_a_raw_linear_head_stays_at_chance() -> None:
    """Pooled features with a large common mean and a small discriminative spread (like a ReLU/BN backbone's):
    the same optimiser and budget leave a head on raw features at chance, not on standardized ones."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(200, 32, generator=generator)
    features = 1.0 + 0.5 * torch.rand(32, generator=generator) + 0.03 * z
    labels = (z[:, 0] + z[:, 1] > 0).long()

    def train_accuracy(head: nn.Module) -> float:
        optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
        for _ in range(10):
            for start in range(0, 200, 20):
                batch = slice(start, start + 20)
                loss = torch.nn.functional.cross_entropy(head(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return (head(features).argmax(1) == labels).float().mean().item()

    torch.manual_seed(0)
    raw = train_accuracy(models.build_head(32, 2))
    torch.manual_seed(0)
    mean, scale = models.feature_standardization(features)
    standardized = train_accuracy(models.StandardizedHead(models.build_head(32, 2), mean, scale))
    assert raw < 0.65 < 0.8 < standardized
