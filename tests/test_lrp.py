"""LRP through zennit (``evidrift.cam.lrp``, method ``lrp``): the rules by hand, parity with zennit's own
attribution, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import evidrift  # noqa: F401  (before timm / torchvision)
from evidrift.cam import CAMEngine
from evidrift.cam.lrp import lrp_relevance
from evidrift.cam.methods import resolve_method


def test_epsilon_plus_flat_rules_by_hand() -> None:
    # Flat on the first linear layer (relevance shared equally by its inputs), ε on the last linear layer
    # (R_j = a_j w_kj z_k / (z_k + ε)), ReLU passes relevance.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = torch.randn(1, 1, 2, 2)
    with torch.no_grad():
        a = torch.relu(net[1](x.flatten(1)))[0]
        z = net[3](a[None])[0]
        k = 1
        hidden = a * net[3].weight[k] * z[k] / (z[k] + 1e-6 * torch.sign(z[k]))
    expected = torch.full((1, 1, 2, 2), float(hidden.sum()) / 4)
    relevance = lrp_relevance(net, x, torch.tensor([k]))
    assert torch.allclose(relevance, expected, atol=1e-5)


def _plain_cnn(inplace: bool) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_lrp_method_matches_zennits_own_attribution() -> None:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    x = torch.randn(3, 3, 12, 12)
    targets = torch.tensor([0, 3, 1])
    reference_net = _plain_cnn(inplace=False)
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    with Gradient(model=reference_net, composite=composite) as attributor:
        # the reference's output relevance: the target logit (``output * eye[target]``)
        _, relevance = attributor(x.clone().requires_grad_(True), lambda out: out * torch.eye(4)[targets])
    expected = torch.relu(relevance.sum(dim=1))
    net = _plain_cnn(inplace=True)  # the in-place ReLUs of timm models must work too
    assert resolve_method("LRP") == "lrp" and resolve_method("epsilon_plus_flat") == "lrp"
    with CAMEngine(net, ["3"]) as engine:
        out = engine(x, targets, methods=["lrp", "gradcam"])
    assert out.maps["lrp"].shape == (3, 12, 12)
    scale = expected.abs().max()
    assert torch.allclose(out.maps["lrp"] / scale, expected / scale, atol=1e-6)  # the same zennit code path
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))  # restored
    assert torch.equal(net[1].running_var, _plain_cnn(inplace=True)[1].running_var)  # BN merge undone
    with pytest.raises(ValueError, match="lrp explains the target logit"):
        lrp_relevance(net, x, targets, score="softmax")


def test_lrp_through_a_timm_resnet_restores_its_blocks() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    relevance = lrp_relevance(model, x, torch.tensor([0, 2]))
    assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    for block in model.modules():
        assert "forward" not in vars(block) and not hasattr(block, "canonizer_sum")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.grad is not None for p in model.parameters())
