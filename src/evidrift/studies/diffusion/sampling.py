"""DDIM sampling with classifier-free guidance (the images scored by ``fidelity``).

ε = ε_uncond + g · (ε_cond − ε_uncond) with the empty prompt as the unconditional input (g = 1: no guidance,
one UNet pass per step), η = 0, ``steps`` DDIM steps; the start noise is seeded.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from evidrift.studies.diffusion.models import text_states
from evidrift.studies.diffusion.training import empty_prompt

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextModel


@torch.no_grad()
def sample_images(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    ddim: DDIMScheduler,
    ids: Tensor,
    size: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int = 32,
) -> Tensor:
    """Generated images float32 [N, size, size] in [0, 1] for prompts ``ids`` int64 [N, L]."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    scheduler = copy.deepcopy(ddim)
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        x = torch.randn((batch.shape[0], 1, size, size), generator=generator).to(device)
        cond = text_states(text_encoder, batch)
        uncond = text_states(text_encoder, empty_prompt(batch)) if guidance != 1.0 else None
        for t in scheduler.timesteps:
            steps_t = torch.full((batch.shape[0],), int(t), dtype=torch.long, device=device)
            if uncond is None:
                eps = unet(x, steps_t, encoder_hidden_states=cond).sample
            else:
                both = unet(
                    torch.cat([x, x]),
                    torch.cat([steps_t, steps_t]),
                    encoder_hidden_states=torch.cat([uncond, cond]),
                ).sample
                eps_u, eps_c = both.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            output = scheduler.step(eps, t, x)  # return_dict=True: a DDIMSchedulerOutput
            if not isinstance(output, DDIMSchedulerOutput):
                raise TypeError(
                    f"DDIMScheduler.step returned {type(output).__name__}, not DDIMSchedulerOutput"
                )
            x = output.prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2)[:, 0].cpu())
    return torch.cat(out)
