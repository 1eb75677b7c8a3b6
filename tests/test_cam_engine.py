"""CAMEngine: exact values on a hand-built network, side effects, targets, layers, layouts, memory."""

from __future__ import annotations

import gc

import psutil
import pytest
import timm
import torch
from torch import nn

import evidrift  # noqa: F401  (before timm)
from evidrift.cam import CAMEngine, fuse, resolve_method
from evidrift.cam.engine import channels_first, token_grid

# Hand-built net: conv 1×1 (1 → 2 channels, weights +1 / −1) → ReLU ("act", the target) → flatten → linear.
X = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])  # [1, 1, 2, 2]
W_CLASS0 = [1.0, -1.0, 2.0, 0.5, 0.5, 1.0, -2.0, 1.0]  # G_0 = [[1, -1], [2, .5]], G_1 = [[.5, 1], [-2, 1]]


def hand_net() -> nn.Sequential:
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 2, 1, bias=False))
    net.add_module("act", nn.ReLU())
    net.add_module("flatten", nn.Flatten())
    net.add_module("fc", nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        net.fc.weight.copy_(torch.tensor([W_CLASS0, [0.0] * 8]))
    return net.eval()


# A_0 = ReLU(x) = [[1, 0], [3, 0]], A_1 = ReLU(-x) = [[0, 2], [0, 0]]; Σ A_0 = 4, Σ A_1 = 2.
EXPECTED = {
    # w = mean G = (0.625, 0.125)
    "gradcam": [[0.625, 0.25], [1.875, 0.0]],
    # Σ_k ReLU(G_k) A_k = [[1, 0], [6, 0]] + [[0, 2], [0, 0]]
    "layercam": [[1.0, 2.0], [6.0, 0.0]],
    # α_0 = 1/(2 + 4 G_0) → w_0 = 1/6 + 2/10 + .5/4; α_1 = 1/(2 + 2 G_1) → w_1 = .5/3 + 1/4 + 1/4
    "gradcam++": [[1 / 6 + 0.2 + 0.125, 2 * (1 / 6 + 0.5)], [3 * (1 / 6 + 0.2 + 0.125), 0.0]],
    # w_0 = (1·1 + 2·3)/4, w_1 = (1·2)/2
    "xgradcam": [[1.75, 2.0], [5.25, 0.0]],
    "hirescam": [[1.0, 2.0], [6.0, 0.0]],
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_exact_values_on_hand_built_net(method):
    with CAMEngine(hand_net(), ["act"]) as engine:
        out = engine(X, 0, methods=[method])
    assert out.maps[method].dtype == torch.float32
    torch.testing.assert_close(out.maps[method], torch.tensor([EXPECTED[method]]), rtol=1e-6, atol=1e-6)
    assert not out.degenerate[method].item()


def test_all_methods_share_one_backward(monkeypatch):
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    methods = [
        "gradcam",
        "gradcam++",
        "layercam",
        "xgradcam",
        "hirescam",
        "gradcam_elementwise",
        "eigengradcam",
        "gradient",
        "input_x_gradient",
    ]
    with CAMEngine(hand_net(), ["conv", "act"]) as engine:
        out = engine(X, 0, methods=methods)
    assert len(calls) == 1
    assert set(out.maps) == {("conv", m) for m in methods[:7]} | {("act", m) for m in methods[:7]} | set(
        methods[7:]
    )
    # d score / dx = Σ_k w_conv_k · G_k · 1[A_k > 0] (ReLU'(0) = 0 at the zero pixel)
    torch.testing.assert_close(out.maps["gradient"], torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]))


def test_side_effects_grad_flags_hooks_and_no_grad_caller():
    net = hand_net()
    net.train()
    net.act.eval()
    net.fc.weight.grad = torch.full_like(net.fc.weight, 7.0)
    flags = [m.training for m in net.modules()]
    with torch.no_grad(), CAMEngine(net, ["act"]) as engine:
        out = engine(X, 0, methods=["gradcam", "gradient"])
        assert not torch.is_grad_enabled()
    with torch.inference_mode(), CAMEngine(net, ["act"]) as engine:
        out_inf = engine(X.clone(), torch.tensor([0]), methods=["gradcam", "gradient"])
    torch.testing.assert_close(out.maps["gradcam"], torch.tensor([EXPECTED["gradcam"]]))
    torch.testing.assert_close(out_inf.maps["gradcam"], out.maps["gradcam"])
    assert torch.equal(net.fc.weight.grad, torch.full_like(net.fc.weight, 7.0))
    assert net.conv.weight.grad is None
    assert [m.training for m in net.modules()] == flags
    assert all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())


def test_hooks_removed_and_flags_restored_after_exception():
    net = hand_net().train()
    with pytest.raises(ValueError, match="in \\[0, 2\\)"), CAMEngine(net, ["act"]) as engine:
        assert net.act._forward_hooks
        engine(X, 5)
    assert not any(m._forward_hooks for m in net.modules())
    assert all(m.training for m in net.modules())


def test_batchnorm_stats_untouched_and_eval_mode_used():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with CAMEngine(net, ["2"]) as engine:
        out = engine(x, "prediction")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(out.logits, net.eval()(x))


def test_inplace_relu_after_target_layer():
    """A conv followed by an in-place ReLU: the maps use the conv's output, not its rectified version."""
    torch.manual_seed(0)

    def make(inplace: bool) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(6, 5, 3),
            nn.ReLU(inplace=inplace),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 3),
        ).eval()

    x = torch.randn(2, 3, 10, 10)
    methods = ["gradcam", "hirescam", "layercam", "gradcam++"]
    with CAMEngine(make(True), ["0", "2"]) as engine:
        got = engine(x, [0, 2], methods=methods)
    with CAMEngine(make(False), ["0", "2"]) as engine:
        want = engine(x, [0, 2], methods=methods)
    assert (got.maps[("0", "hirescam")] > 0).any()
    for key in want.maps:
        torch.testing.assert_close(got.maps[key], want.maps[key])


@pytest.mark.parametrize(
    ("arch", "kwargs", "layer"),
    [
        ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 2, 2)}, "features.norm5"),
        ("resnetv2_50", {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}, "norm"),
    ],
)
def test_timm_inplace_batchnormact_layers(arch, kwargs, layer):
    """timm's BatchNormAct2d (in-place ReLU inside) at the default layers = the same net without in-place."""
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with CAMEngine(net, [layer]) as engine:
        got = engine(x, "prediction", methods=["gradcam", "layercam", "hirescam"])
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    with CAMEngine(net, [layer]) as engine:
        want = engine(x, "prediction", methods=["gradcam", "layercam", "hirescam"])
    torch.testing.assert_close(got.logits, want.logits)
    for key in want.maps:
        torch.testing.assert_close(got.maps[key], want.maps[key])


def test_wrong_layer_name_lists_candidates():
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match="layer4"):
        CAMEngine(net, ["layer_4"])
    with pytest.raises(ValueError, match="at least one"):
        CAMEngine(net, [])


def test_targets_forms_and_multilabel_equals_separate_calls():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    methods = ["gradcam", "gradcam++", "layercam", "eigengradcam", "gradient", "ms-gradcam"]
    with CAMEngine(net, ["layer3", "layer4"]) as engine:
        multi = engine(x, [[0, 2], [1, 3], [2, 2]], methods=methods)
        first = engine(x, torch.tensor([0, 1, 2]), methods=methods)
        second = engine(x, "label", labels=[2, 3, 2], methods=methods)
        pred = engine(x, "prediction", methods=["gradcam"])
        with pytest.raises(ValueError, match="labels"):
            engine(x, "label")
        with pytest.raises(ValueError, match="same number"):
            engine(x, [[0, 1], [1], [2, 3]])
        with pytest.raises(ValueError, match="batch of 3"):
            engine(x, [0, 1])
    assert multi.targets.shape == (3, 2)
    assert torch.equal(pred.targets, pred.logits.argmax(dim=1))
    for key, value in multi.maps.items():
        assert value.shape[:2] == (3, 2)
        torch.testing.assert_close(value[:, 0], first.maps[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(value[:, 1], second.maps[key], rtol=1e-4, atol=1e-6)
        assert multi.degenerate[key].shape == (3, 2)
    assert first.maps[("layer3", "gradcam")].shape == (3, 4, 4)
    assert first.maps[("layer4", "gradcam")].shape == (3, 2, 2)
    assert first.maps["gradient"].shape == (3, 64, 64)
    assert first.maps["ms-gradcam"].shape == (3, 4, 4)
    torch.testing.assert_close(
        first.maps["ms-gradcam"], fuse([first.maps[("layer3", "gradcam")], first.maps[("layer4", "gradcam")]])
    )


def test_softmax_score_gradient_is_scaled_chain_rule():
    net = hand_net()
    with CAMEngine(net, ["act"]) as engine:
        logit = engine(X, 0, methods=["hirescam"], score="logit")
        soft = engine(X, 0, methods=["hirescam"], score="softmax")
    p = torch.softmax(logit.logits, dim=1)[0, 0]
    # d p_0 / dA = p_0 (1 − p_0) d z_0 / dA since class 1's logit is 0 everywhere
    torch.testing.assert_close(soft.maps["hirescam"], logit.maps["hirescam"] * p * (1 - p))


def test_degenerate_flags():
    net = hand_net()
    with CAMEngine(net, ["act"]) as engine:
        out = engine(torch.zeros(1, 1, 2, 2), 0, methods=["gradcam", "layercam"])
    assert out.degenerate["gradcam"].tolist() == [True]
    assert out.degenerate["layercam"].tolist() == [True]


def test_vit_tokens_reshaped_to_patch_grid():
    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=64, reg_tokens=2).eval()
    assert net.num_prefix_tokens == 3
    x = torch.randn(2, 3, 64, 64)
    with CAMEngine(net, ["blocks.5", "blocks.5.norm1"]) as engine:
        out = engine(x, "prediction", methods=["gradcam", "layercam", "eigencam"])
    assert out.maps[("blocks.5", "gradcam")].shape == (2, 4, 4)
    assert torch.isfinite(out.maps[("blocks.5.norm1", "layercam")]).all()
    assert token_grid(1 + 16, (64, 64), None, (16, 16)) == (1, 4, 4)
    assert token_grid(49, (112, 112), 0, None) == (0, 7, 7)
    with pytest.raises(ValueError, match="patch grid"):
        token_grid(20, (64, 64), 1, (16, 16))


def test_channels_last_feature_maps_are_permuted():
    t = torch.randn(2, 7, 7, 96)  # NHWC at stride 32 of a 224 input
    assert channels_first(t, (224, 224), "auto").shape == (2, 96, 7, 7)
    assert channels_first(t.permute(0, 3, 1, 2), (224, 224), "auto").shape == (2, 96, 7, 7)
    assert channels_first(torch.randn(2, 56, 56, 96), (224, 224), "auto").shape == (2, 96, 56, 56)
    assert channels_first(torch.randn(2, 96, 56, 56), (224, 224), "auto").shape == (2, 96, 56, 56)
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=3,
        img_size=64,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_size=2,
    ).eval()
    with CAMEngine(swin, ["layers.2", "norm"]) as engine:
        out = engine(torch.randn(2, 3, 64, 64), "prediction", methods=["gradcam", "hirescam"])
    assert out.maps[("layers.2", "gradcam")].shape == (2, 4, 4)
    assert out.maps[("norm", "hirescam")].shape == (2, 2, 2)
    # the same maps as an explicit NHWC reading
    with CAMEngine(swin, ["layers.2"], layout="NHWC") as engine:
        explicit = engine(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), "prediction")
    assert explicit.maps["gradcam"].shape == (2, 4, 4)


def test_method_names_and_aliases():
    assert resolve_method("GradCAMpp") == "gradcam++"
    assert resolve_method("ms-gradcampp") == "ms-gradcam++"
    with pytest.raises(ValueError, match="gradcam"):
        resolve_method("gradcm")
    with pytest.raises(ValueError, match="fusion"):
        resolve_method("ms-gradient")


def test_call_without_context_manager_leaves_no_hooks():
    net = hand_net()
    out = CAMEngine(net, ["act"])(X, 0)
    torch.testing.assert_close(out.maps["gradcam"], torch.tensor([EXPECTED["gradcam"]]))
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.slow  # 1,050 engine calls
def test_memory_flat_over_1000_calls():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(4, 3, 16, 16)
    methods = ["gradcam", "gradcam++", "layercam", "eigengradcam", "gradient"]
    process = psutil.Process()
    with CAMEngine(net, ["1", "3"]) as engine:
        for _ in range(50):
            engine(x, "prediction", methods=methods)
        gc.collect()
        rss, objects = process.memory_info().rss, len(gc.get_objects())
        for _ in range(1000):
            engine(x, "prediction", methods=methods)
        gc.collect()
        object_growth = len(gc.get_objects()) - objects
        rss_growth = process.memory_info().rss - rss
    assert object_growth < 50, f"{object_growth} more live Python objects after 1,000 calls"
    assert rss_growth < 32 * 1024 * 1024, f"RSS grew by {rss_growth / 2**20:.1f} MiB over 1,000 calls"


def test_no_graph_below_the_target_layer():
    """Only the part above the target layers is recorded (the backward stops there; ARCHITECTURE §8 speed)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    seen: dict[str, bool] = {}
    net[0].register_forward_hook(lambda m, i, o: seen.__setitem__("below", o.requires_grad))
    net[4].register_forward_hook(lambda m, i, o: seen.__setitem__("above", o.requires_grad))
    with CAMEngine(net, ["2"]) as engine:
        engine(torch.randn(2, 3, 9, 9), "prediction", methods=["gradcam", "gradcam++"])
    assert seen == {"below": False, "above": True}
    with CAMEngine(net, ["2"]) as engine:  # input-space methods need the whole graph
        engine(torch.randn(2, 3, 9, 9), "prediction", methods=["gradcam", "gradient"])
    assert seen == {"below": True, "above": True}
