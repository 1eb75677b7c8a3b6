"""The "How to Probe" attribution set as *signed* maps (the reference clips only after smoothing).

The reference (``evaluate_attributions/gridpg/eval_gridpg_compactness_complexity.py``) computes, per image
and target class:

- ``gradcam``: Captum ``LayerGradCam`` at ``backbone.layer4[-1].conv3`` (ResNet-50's last convolution, before
  its BN, residual add and ReLU), ``relu_attributions=False``: Σ_k mean_hw(G_k) A_k, signed, upsampled
  bilinearly to the input size;
- ``input_x_gradient``: Captum ``InputXGradient``, summed over colour channels;
- ``integrated_gradients``: zennit ``IntegratedGradients`` (``n_iter`` 20, zero baseline), summed over
  channels (here: the midpoint Riemann rule of ``evidrift.cam.perturbation``, without its ReLU);
- ``lrp``: zennit ``EpsilonPlusFlat`` with a ResNet canonizer, relevance summed over channels;
- ``bcos``: for B-cos models, Σ_c x ⊙ (the dynamic linear weights) — here at the head's input, since only
  the head is B-cos (``evidrift.studies.probe.bcos``);

then, for GridPG / entropy, ``avg_pool2d(5, stride 1, padding 2)`` and only then clips negative values.

Every function takes the network (``evidrift.studies.probe.heads.ProbeNet``), inputs and targets long [B], and
returns float32 maps [B, h, w] (layer / head-input resolution) or [B, H, W] (input resolution), signed.
Parameter ``.grad`` is never touched; the network runs in eval mode and its flags are restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from evidrift.cam.lrp import lrp_relevance
from evidrift.studies.probe import bcos

#: Methods of this module (the rest of the names a probe accepts run through ``CAMEngine``).
REFERENCE_METHODS: tuple[str, ...] = ("gradcam", "input_x_gradient", "integrated_gradients", "lrp", "bcos")
#: Methods whose map lives at the input resolution and that need the whole network (never cached features).
INPUT_METHODS: tuple[str, ...] = ("input_x_gradient", "integrated_gradients", "lrp")


@contextlib.contextmanager
def _eval(net: nn.Module) -> Iterator[nn.Module]:
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield net
    finally:
        for module, training in flags:
            module.training = training


def _target_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, targets.to(logits.device).long()[:, None])[:, 0]


def signed_gradcam(net: nn.Module, layer: str, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM without its ReLU (Captum ``LayerGradCam``, ``relu_attributions=False``): Σ_k mean_hw(G_k) A_k
    at module ``layer`` of ``net``; x [B, ...] → [B, h, w]."""
    module = net.get_submodule(layer)
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().clone().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()  # in-place ops after the layer act on the clone

    with _eval(net):
        handle = module.register_forward_hook(hook)
        try:
            logits = net(x.detach())
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"layer {layer!r} ran {len(captured)} times in one forward pass (expected once)")
        A = captured[0]
        (G,) = torch.autograd.grad(_target_logits(logits, targets).sum(), [A])
    return (G.mean(dim=(2, 3), keepdim=True) * A.detach()).sum(dim=1).float()


def _input_gradient(net: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_target_logits(net(leaf), targets).sum(), [leaf])
    return grad.detach()


def input_x_gradient(net: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_c x_c · d logit / d x_c through the whole network: x [B, C, H, W] → [B, H, W] signed."""
    with _eval(net):
        return (x.detach() * _input_gradient(net, x, targets)).sum(dim=1).float()


def integrated_gradients(
    net: nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int = 20, chunk_size: int = 64
) -> torch.Tensor:
    """Integrated Gradients, zero baseline, midpoint rule over ``steps`` points (the rule of
    ``evidrift.cam.perturbation.integrated_gradients``), summed over channels, not clipped: [B, H, W]."""
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps ≥ 1, got {steps}")
    x = x.detach()
    B = x.shape[0]
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x, dtype=torch.float32)
    pairs = torch.arange(B * steps, device=x.device)
    with _eval(net):
        for start in range(0, B * steps, chunk_size):
            chunk = pairs[start : start + chunk_size]
            b, a = chunk // steps, alphas[chunk % steps]
            grads = _input_gradient(net, a[:, None, None, None] * x[b], targets.to(x.device)[b]).float()
            total.index_add_(0, b, grads)
    return (x.float() * total / steps).sum(dim=1)


def lrp(net: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """zennit ``EpsilonPlusFlat`` relevance of the target logit, summed over channels: [B, H, W] signed."""
    if bcos.is_bcos(net):
        raise ValueError("lrp has no rule for B-cos layers; explain B-cos heads with `bcos`")
    return lrp_relevance(net, x, targets).sum(dim=1)


def bcos_map(net: nn.Module, activations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The B-cos explanation of a B-cos head: Σ_k A_k · W(A)ᵀ_k at every position of the head's input, for
    ``net`` a ``ProbeNet`` on cached activations (``backbone`` None) — A [B, K, h, w] → [B, h, w] signed.
    Exact: Σ_hw map = logit − logit bias (the head is dynamic linear and bias-free)."""
    if getattr(net, "backbone", None) is not None:
        raise ValueError("bcos_map explains the head on cached activations: pass a ProbeNet without backbone")
    if not bcos.is_bcos(net):
        raise ValueError("bcos_map needs a B-cos head (heads bcos1, bcos2, bcos3)")
    with _eval(net), bcos.explanation_mode(net):
        leaf = activations.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_logits(net(leaf), targets).sum(), [leaf])
    return (activations.detach() * grad).sum(dim=1).float()
