"""Methods that need their own forward passes: Score-CAM, Integrated Gradients, SmoothGrad.

Same output contract as the engine's methods: float32 maps ≥ 0 on x's device, [B, h, w] at the layer's
resolution (scorecam) or [B, H, W] at the input's (integrated_gradients, smoothgrad). Every function runs
its extra forwards in chunks of ``chunk_size`` samples, so memory is bounded by the chunk, not by B × K
(Score-CAM) or B × steps. ``model`` is called as is: put it in eval mode first (the engine does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Score-CAM's epsilon in the per-channel min-max scaling of the masks (pytorch-grad-cam's value).
SCORECAM_EPS = 1e-8


def target_scores(logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """The score explained per sample: ``logit`` or ``softmax`` probability of class ``target`` [n] → [n]."""
    values = torch.softmax(logits.float(), dim=1) if score == "softmax" else logits
    return values.gather(1, target.reshape(-1, 1).to(logits.device)).squeeze(1)


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")


@torch.no_grad()
def scorecam(
    model: nn.Module,
    x: torch.Tensor,
    A: torch.Tensor,
    target: torch.Tensor,
    score: str = "logit",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020), as pytorch-grad-cam computes it.

    x [B, C, H, W]; A [B, K, h, w] the target layer's activations for x; target long [B]. Each channel A_k is
    upsampled to [H, W] (bilinear, align_corners=True), min-max scaled to [0, 1] (ε = 1e-8), multiplied into
    x, and the masked image is scored; w = softmax_k(scores); map = ReLU(Σ_k w_k A_k) [B, h, w] float32.
    B·K masked forwards, ``chunk_size`` at a time.
    """
    _check_chunk(chunk_size)
    B, K = A.shape[:2]
    H, W = x.shape[-2:]
    pairs = torch.arange(B * K, device=x.device)
    scores = torch.empty(B * K, dtype=torch.float32, device=x.device)
    flat = A.float().reshape(B * K, 1, *A.shape[-2:])
    for start in range(0, B * K, chunk_size):
        chunk = pairs[start : start + chunk_size]
        up = F.interpolate(flat[chunk], size=(H, W), mode="bilinear", align_corners=True)[:, 0]
        lo = up.amin(dim=(1, 2), keepdim=True)
        hi = up.amax(dim=(1, 2), keepdim=True)
        mask = (up - lo) / (hi - lo + SCORECAM_EPS)
        b = chunk // K
        logits = model(x[b] * mask[:, None].to(x.dtype))
        scores[start : start + chunk.numel()] = target_scores(logits, target[b], score).float()
    weights = torch.softmax(scores.reshape(B, K), dim=1)
    return torch.relu((weights[:, :, None, None] * A.float()).sum(dim=1))


def _input_gradients(
    model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, score: str
) -> torch.Tensor:
    """d score / d inputs [n, C, H, W] for one chunk (one autograd.grad call; parameter .grad untouched)."""
    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(target_scores(model(leaf), target, score).sum(), [leaf])
    return grad.detach()


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    score: str = "logit",
    steps: int = 32,
    chunk_size: int = 64,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) with the midpoint Riemann rule over ``steps`` points.

    attribution = (x − x₀) · mean_i ∇score(x₀ + α_i (x − x₀)), α_i = (i + ½)/steps; x₀ = ``baseline``
    (default zeros, i.e. the normalized mean image). Map = ReLU(Σ_c attribution_c) [B, H, W] float32 — the
    positive evidence. Exact for a linear model: Σ of the attribution = score(x) − score(x₀).
    """
    _check_chunk(chunk_size)
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps ≥ 1, got {steps}")
    x = x.detach()
    x0 = torch.zeros_like(x) if baseline is None else baseline.detach().expand_as(x)
    B = x.shape[0]
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x, dtype=torch.float32)
    pairs = torch.arange(B * steps, device=x.device)  # (sample, step) pairs, sample-major
    for start in range(0, B * steps, chunk_size):
        chunk = pairs[start : start + chunk_size]
        b, a = chunk // steps, alphas[chunk % steps]
        inputs = x0[b] + a[:, None, None, None] * (x[b] - x0[b])
        grads = _input_gradients(model, inputs, target[b], score).float()
        total.index_add_(0, b, grads)
    attribution = (x - x0).float() * total / steps
    return torch.relu(attribution.sum(dim=1))


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    score: str = "logit",
    samples: int = 16,
    noise: float = 0.15,
    chunk_size: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over ``samples`` noisy copies of each image,
    noise σ = ``noise`` × (max − min) of that image; map = max_c |mean gradient| [B, H, W] float32.
    Seeded: the same ``seed`` gives the same map."""
    _check_chunk(chunk_size)
    if samples < 1:
        raise ValueError(f"smoothgrad needs samples ≥ 1, got {samples}")
    x = x.detach()
    B = x.shape[0]
    span = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).float()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros_like(x, dtype=torch.float32)
    pairs = torch.arange(B * samples, device=x.device)
    for start in range(0, B * samples, chunk_size):
        chunk = pairs[start : start + chunk_size]
        b = chunk // samples
        eps = torch.randn((chunk.numel(), *x.shape[1:]), generator=generator).to(x.device)
        inputs = x[b] + (eps * (noise * span[b])[:, None, None, None]).to(x.dtype)
        total.index_add_(0, b, _input_gradients(model, inputs, target[b], score).float())
    return (total / samples).abs().amax(dim=1)
