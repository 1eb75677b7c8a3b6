"""The "How to Probe" heads and the probed network (ARCHITECTURE §10).

The reference (Gairola et al., github.com/sidgairo18/how-to-probe, mmpretrain configs
``probing/single_label_classification/resnet50_*-postavgpool*``) builds every head with ``neck=None`` and
``with_avg_pool=True``: the head runs at **every position** of the backbone's last feature map and the
average pooling comes after its last layer.

- ``linear`` / ``linear_nobias``: one 1 × 1 convolution K → C (bias on/off), then pooling — the same
  function as pooling then a linear layer, so its CAM gradient is constant over space.
- ``mlp2`` / ``mlp3`` (``MultiLayerLinearClsHead``, ``num_layers`` 2 / 3, ``hid_channels`` 2048,
  ``with_bias=True``): 1 × 1 conv K → H, BN, then per further layer ReLU → 1 × 1 conv (→ BN except after the
  last), pooling after the last layer. The ReLU at every position makes d logit / d A vary over space.
- ``bcos1`` / ``bcos2`` / ``bcos3`` (``BcosLinearClsHead``): B-cos 1 × 1 layers (``studies.probe.bcos``),
  uncentered BN between them, no ReLU, pooling, logit bias −log(C − 1).

Every head starts with the same fixed per-channel standardization (``ChannelScale``: divide by the
channel's standard deviation over the training positions; no centering, so bias-free and B-cos heads stay
bias-free), so that all variants see the same input and only the head differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from evidrift.cam.lrp import register_pass_module
from evidrift.classifier.models import timm_api
from evidrift.core.errors import UsageError
from evidrift.studies.probe import bcos

#: Head names → (kind, number of layers, bias).
PROBE_HEADS: dict[str, tuple[str, int, bool]] = {
    "linear": ("standard", 1, True),
    "linear_nobias": ("standard", 1, False),
    "mlp2": ("standard", 2, True),
    "mlp3": ("standard", 3, True),
    "bcos1": ("bcos", 1, False),
    "bcos2": ("bcos", 2, False),
    "bcos3": ("bcos", 3, False),
}


@register_pass_module
class ChannelScale(nn.Module):
    """x [N, K, h, w] → x / scale[k] per channel (a fixed buffer; ones = identity). LRP passes relevance
    through it unchanged (a fixed rescaling redistributes nothing)."""

    scale: torch.Tensor  # a buffer [K]

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        if scale.ndim != 1 or not bool((scale > 0).all()):
            raise ValueError("channel scales must be a positive vector [K]")
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale[None, :, None, None]


def channel_scale(activations: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel population standard deviation of activations [N, K, h, w] over (N, h, w), float32 [K]; a
    channel whose std is ≤ ``eps`` (constant, e.g. a dead ReLU) gets scale 1."""
    if activations.ndim != 4 or activations.shape[0] == 0:
        raise ValueError(f"activations must be [N, K, h, w] with N ≥ 1, got {tuple(activations.shape)}")
    std = activations.detach().double().transpose(0, 1).flatten(1).std(dim=1, unbiased=False)
    return torch.where(std > eps, std, torch.ones_like(std)).float()


class PositionwiseHead(nn.Module):
    """A probe head: A [N, K, h, w] → logits [N, C] = mean_hw body(standardize(A)) + logit_bias."""

    def __init__(self, standardize: ChannelScale, body: nn.Sequential, logit_bias: float = 0.0) -> None:
        super().__init__()
        self.standardize = standardize
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit_bias = float(logit_bias)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        if activations.ndim != 4:
            raise ValueError(
                f"a position-wise probe head takes feature maps [N, K, h, w], got {tuple(activations.shape)}"
            )
        return self.pool(self.body(self.standardize(activations))).flatten(1) + self.logit_bias


def build_probe_head(
    head: str,
    in_channels: int,
    num_classes: int,
    hidden: int = 2048,
    scale: torch.Tensor | None = None,
) -> PositionwiseHead:
    """The reference head ``head`` (a key of ``PROBE_HEADS``) for K = ``in_channels`` feature channels;
    ``scale`` [K] the per-channel standardization (None = none). Initialization: PyTorch's defaults."""
    if head not in PROBE_HEADS:
        raise UsageError(f"probe head {head!r} is not one of {list(PROBE_HEADS)}")
    kind, num_layers, bias = PROBE_HEADS[head]
    standardize = ChannelScale(scale if scale is not None else torch.ones(in_channels))
    if kind == "bcos":
        body = nn.Sequential(*bcos.bcos_layers(in_channels, num_classes, hidden, num_layers))
        return PositionwiseHead(standardize, body, -math.log(num_classes - 1) if num_classes > 2 else 0.0)
    layers: list[nn.Module] = []
    width = in_channels
    for index in range(num_layers):
        last = index == num_layers - 1
        if index > 0:
            layers.append(nn.ReLU())
        out = num_classes if last else hidden
        layers.append(nn.Conv2d(width, out, kernel_size=1, bias=bias))
        if not last:
            layers.append(nn.BatchNorm2d(out))
        width = out
    return PositionwiseHead(standardize, nn.Sequential(*layers))


class ProbeNet(nn.Module):
    """The probed network: x [N, 3, H, W] → logits [N, C] = head(features(backbone.forward_features(x))).

    ``backbone`` is a timm model (frozen, eval) or None: then the input *is* the backbone's output A
    [N, K, h, w] (cached activations). ``features`` (an identity) names the backbone output for CAM hooks in
    both cases; the backbone's own layers keep their timm names under ``backbone.``.
    """

    def __init__(self, backbone: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = timm_api(self.backbone).forward_features(x)
        return self.head(self.features(x))
