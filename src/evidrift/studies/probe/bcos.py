"""B-cos layers for classifier heads (Böhle et al., "B-cos Networks", CVPR 2022 / TPAMI 2024), as the
"How to Probe" reference builds its B-cos heads (``BcosLinearClsHead``: ``BcosConv2d`` 1 × 1, B = 2, no
MaxOut, uncentered bias-free BatchNorm between layers, a logit bias of −log(C − 1)).

A B-cos unit with unit-norm weight ŵ computes |cos(x, ŵ)|^(B−1) · ŵᵀx; for B = 2 that is
(|ŵᵀx| / ‖x‖) · ŵᵀx. Every layer here is *dynamic linear*: its output is W(x) x with no bias. With the
dynamic factors detached (``explanation_mode``), the gradient of a logit with respect to the head's input is
W(x)ᵀ, so input ⊙ gradient summed over channels is the exact contribution of every position (its sum is the
logit minus the constant logit bias): the B-cos explanation (``studies.probe.attributions.bcos_map``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: Stabilizer inside the patch norm sqrt(Σ x² + ε), the reference's value.
NORM_EPS = 1e-6


class BcosConv2d1x1(nn.Module):
    """B-cos 1 × 1 convolution, B = 2: x [N, K, h, w] → [N, O, h, w], out = (|ŵᵀx| / ‖x‖) · ŵᵀx per position,
    ‖x‖ = sqrt(Σ_k x_k² + 1e-6), ŵ = each output's weight row scaled to unit L2 norm. No bias (a B-cos layer
    has none). ``detach`` (set by ``explanation_mode``) detaches the dynamic factor |ŵᵀx| / ‖x‖."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default initialisation
        self.detach = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)
        out = torch.einsum("ok,nkhw->nohw", w, x)
        norm = (x.pow(2).sum(dim=1, keepdim=True) + NORM_EPS).sqrt()
        scale = out.abs() / norm
        if self.detach:
            scale = scale.detach()
        return scale * out


class UncenteredBatchNorm2d(nn.Module):
    """Batch norm without centering and without bias (the reference's ``NoBias(BatchNormUncentered2d)``):
    x / sqrt(var + eps) · weight per channel, var = the batch's population variance over (N, h, w) in training
    (running average kept, momentum 0.1), the running one in eval. Linear in x in eval mode."""

    running_var: torch.Tensor  # a buffer [K]

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps, self.momentum = eps, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach())
        else:
            var = self.running_var
        return x / (var + self.eps).sqrt()[None, :, None, None] * self.weight[None, :, None, None]


def bcos_layers(in_channels: int, num_classes: int, hidden: int, num_layers: int) -> list[nn.Module]:
    """The reference's B-cos head body (``with_avg_pool=True``, ``with_last_bn=False``): ``num_layers`` B-cos
    1 × 1 layers (in → hidden → … → C; one layer: in → C), an uncentered BN after each hidden layer, no ReLU
    (the B-cos factor is the non-linearity)."""
    if num_layers < 1:
        raise ValueError(f"a B-cos head needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    width = in_channels
    for _ in range(num_layers - 1):
        layers += [BcosConv2d1x1(width, hidden), UncenteredBatchNorm2d(hidden)]
        width = hidden
    layers.append(BcosConv2d1x1(width, num_classes))
    return layers


def is_bcos(module: nn.Module) -> bool:
    """Whether ``module`` contains a B-cos layer."""
    return any(isinstance(m, BcosConv2d1x1) for m in module.modules())


@contextlib.contextmanager
def explanation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block every B-cos layer of ``module`` detaches its dynamic factor, so that gradients are the
    dynamic linear weights W(x)ᵀ; restored afterwards (also after an exception)."""
    layers = [m for m in module.modules() if isinstance(m, BcosConv2d1x1)]
    previous = [m.detach for m in layers]
    for m in layers:
        m.detach = True
    try:
        yield module
    finally:
        for m, value in zip(layers, previous, strict=True):
            m.detach = value
