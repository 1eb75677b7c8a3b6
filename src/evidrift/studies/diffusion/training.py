"""Training: the text encoder's contrastive pretraining, the base diffusion model and the fine-tuned
variants (ARCHITECTURE §11).

- ``pretrain_text_encoder``: CLIP's symmetric InfoNCE between the text encoder's report embedding (mean of
  the last hidden states over non-pad tokens, then a linear projection) and a ``SmallImageEncoder``'s image
  embedding, both L2-normalized, temperature 0.07, on the base set: the analogue of a pretrained CLIP, so
  that "frozen" keeps a text encoder that means something.
- ``diffusion_loss``: DDPM ε-prediction MSE at uniform timesteps; a report is replaced by the empty prompt
  (start, end, pads) with probability ``ucg`` (unconditional-guidance dropout).
- ``train_diffusion``: AdamW steps on seeded batches. ``trainable_parameters(variant)``: ``base`` and
  ``frozen`` train the UNet only, ``learnable`` the UNet and the text encoder (``text_lr``),
  ``cross_attention`` only the UNet's cross-attention projections (``attn2.to_q/k/v/out``). Every variant
  starts from the same base weights and draws the same batches, timesteps and noise (one seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidrift.studies.diffusion.models import SmallImageEncoder, text_states

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel

VARIANT_KINDS = ("base", "frozen", "learnable", "cross_attention")


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimizer step on ``loss``; returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def pooled_text(text_encoder: CLIPTextModel, ids: Tensor) -> Tensor:
    """Mean of the last hidden states over non-pad tokens: float32 [N, hidden]."""
    states = text_states(text_encoder, ids)
    keep = (ids != 0).float()[..., None]
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    images: Tensor,
    ids: Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[dict[str, float]], None] | None = None,
) -> list[float]:
    """Contrastive pretraining in place; ``images`` [N, 1, S, S] in [-1, 1], ``ids`` int64 [N, L]. Returns
    the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    hidden = text_encoder.config.hidden_size
    image_encoder = SmallImageEncoder(hidden)
    projection = nn.Linear(hidden, hidden)
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *projection.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    text_encoder.train()
    losses = []
    n = images.shape[0]
    for step in range(steps):
        index = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        text = F.normalize(projection(pooled_text(text_encoder, ids[index])), dim=-1)
        image = F.normalize(image_encoder(images[index]), dim=-1)
        logits = text @ image.T / 0.07
        # identical reports in a batch are positives of each other (soft targets over equal ids)
        same = (ids[index][:, None, :] == ids[index][None, :, :]).all(dim=-1).float()
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (
            -(target * logits.log_softmax(dim=1)).sum(1).mean()
            - (target * logits.log_softmax(dim=0)).sum(0).mean()
        )
        losses.append(_step(optimizer, loss))
        if log is not None:
            log({"step": step, "loss": losses[-1]})
    text_encoder.eval()
    return losses


def empty_prompt(ids: Tensor) -> Tensor:
    """The empty prompt (start, end, pads) in the shape of ``ids`` [N, L]: start = ids[:, 0]."""
    empty = torch.zeros_like(ids)
    empty[:, 0] = ids[:, 0]
    end = ids.gather(1, (ids != 0).sum(dim=1, keepdim=True) - 1)  # the last non-pad token is <end>
    empty[:, 1] = end[:, 0]
    return empty


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    images: Tensor,
    ids: Tensor,
    ucg: float,
    generator: torch.Generator,
) -> Tensor:
    """ε-prediction MSE of one batch (``images`` [B, 1, S, S] in [-1, 1], ``ids`` [B, L])."""
    batch = images.shape[0]
    drop = torch.rand(batch, generator=generator) < ucg
    ids = torch.where(drop[:, None], empty_prompt(ids), ids)
    noise = torch.randn(images.shape, generator=generator)
    steps = torch.randint(0, scheduler.config["num_train_timesteps"], (batch,), generator=generator)
    device = next(unet.parameters()).device
    # diffusers annotates timesteps as torch.IntTensor (int32) but indexes with any integer tensor (int64)
    noisy = scheduler.add_noise(images, noise, steps).to(device)  # type: ignore[arg-type]
    states = text_states(text_encoder, ids.to(device))
    prediction = unet(noisy, steps.to(device), encoder_hidden_states=states).sample
    return F.mse_loss(prediction, noise.to(device))


def trainable_parameters(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, variant: str
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(UNet parameters, text-encoder parameters) trained by ``variant``; the rest get requires_grad False."""
    if variant not in VARIANT_KINDS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANT_KINDS}")
    unet_params = []
    for name, param in unet.named_parameters():
        keep = variant != "cross_attention" or ".attn2." in name
        param.requires_grad_(keep)
        if keep:
            unet_params.append(param)
    text_params = list(text_encoder.parameters()) if variant == "learnable" else []
    for param in text_encoder.parameters():
        param.requires_grad_(variant == "learnable")
    return unet_params, text_params


def train_diffusion(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    images: Tensor,
    ids: Tensor,
    variant: str,
    steps: int,
    lr: float,
    text_lr: float,
    batch_size: int,
    ucg: float,
    seed: int,
    log: Callable[[dict[str, float]], None] | None = None,
) -> list[float]:
    """Train ``unet`` (and the text encoder for ``learnable``) in place for ``steps`` AdamW steps on seeded
    batches of (``images``, ``ids``); returns the loss per step."""
    unet_params, text_params = trainable_parameters(unet, text_encoder, variant)
    groups = [{"params": unet_params, "lr": lr}]
    if text_params:
        groups.append({"params": text_params, "lr": text_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train(variant == "learnable")
    losses = []
    n = images.shape[0]
    for step in range(steps):
        index = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        loss = diffusion_loss(unet, text_encoder, scheduler, images[index], ids[index], ucg, generator)
        losses.append(_step(optimizer, loss))
        if log is not None:
            log({"step": step, "loss": losses[-1]})
    unet.eval()
    text_encoder.eval()
    for param in [*unet.parameters(), *text_encoder.parameters()]:
        param.requires_grad_(False)
    return losses


def mean_loss(values: list[float], last: int = 20) -> float:
    """Mean of the last ``last`` losses (NaN when empty)."""
    return float(np.mean(values[-last:])) if values else float("nan")
