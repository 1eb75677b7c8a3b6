"""Cross-attention maps through diffusers' attention-processor API (ARCHITECTURE §11).

The default ``AttnProcessor2_0`` calls ``scaled_dot_product_attention`` and never materializes the attention
probabilities, so ``capture_cross_attention`` swaps a ``CaptureProcessor`` into every cross-attention layer
(``attn2`` of each transformer block) with ``unet.set_attn_processor`` and restores the original processors
(``unet.attn_processors`` taken before) on exit, also when the body raises. The processor is diffusers'
``AttnProcessor`` (the classic path: ``get_attention_scores`` → softmax probabilities) plus one line that
stores the head-averaged probabilities — the approach of DAAM's ``UNetCrossAttentionHooker`` and of
chest-distillation's ``CrossAttention.forward`` (``save_attention``: ``sim.softmax`` averaged over heads).

Protocol (chest-distillation ``scripts/compute_bbox_iou.py::compute_masks`` with ``DDIMSampler.
sample_with_attention`` and ``mask=1``: the real image is re-noised at every kept timestep): for each
timestep t of the config, the real image x0 is noised, x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, with ε seeded per
(image id, t) (``noise_seed``), and the UNet runs once conditioned on the image's report; every
cross-attention layer's map [B, h·w, tokens] (mean over heads) is reshaped to [B, tokens, h, w] and
upsampled to ``map_size`` (nearest-neighbour repetition for integer factors as the reference's
``normalize_attention_map_size``, bilinear otherwise); a word's map is the mean over its tokens, the
layers and the timesteps (``multi_relevant_token_step_mean`` / ``all_mean``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention, AttentionProcessor
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler


@dataclass
class AttentionStore:
    """Head-averaged cross-attention probabilities per layer name, float32 [B, h·w, tokens], of the last
    UNet call (``clear`` before each call)."""

    maps: dict[str, Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.maps.clear()


class CaptureProcessor:
    """diffusers ``AttnProcessor`` that also stores the head-mean attention probabilities of a
    cross-attention call in ``store.maps[name]``."""

    def __init__(self, name: str, store: AttentionStore) -> None:
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        # diffusers annotates the mask as Tensor, but the method returns None for None (as AttnProcessor
        # itself calls it)
        attention_mask = attn.prepare_attention_mask(
            attention_mask,  # type: ignore[arg-type]
            sequence_length,
            batch_size,
        )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:  # [B·heads, h·w, tokens] → mean over heads [B, h·w, tokens]
            probs = attention_probs.detach().float()
            self.store.maps[self.name] = probs.view(-1, attn.heads, *probs.shape[1:]).mean(dim=1)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """Processor keys of the UNet's cross-attention layers (``...attn2.processor``), in module order."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def capture_cross_attention(unet: UNet2DConditionModel) -> Iterator[AttentionStore]:
    """Within the block every cross-attention layer of ``unet`` records into the yielded store (keys: layer
    names without ``.processor``); the original processors are restored on exit, also after an exception."""
    original = dict(unet.attn_processors)
    store = AttentionStore()
    replaced: dict[str, AttentionProcessor | CaptureProcessor] = dict(original)
    names = cross_attention_names(unet)
    if not names:
        raise ValueError("the UNet has no cross-attention layers (attn2); nothing to capture")
    for name in names:
        replaced[name] = CaptureProcessor(name.removesuffix(".processor"), store)
    # set_attn_processor pops from the dict it is given: pass copies. diffusers types the argument as its own
    # processor classes only, though it accepts any processor callable (custom processors are documented).
    unet.set_attn_processor(replaced)  # type: ignore[arg-type]
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))


def noise_seed(seed: int, image_id: str, timestep: int) -> int:
    """A 63-bit seed from (seed, image id, timestep): two models see the same noise on the same image."""
    digest = hashlib.sha256(f"{seed}:{image_id}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_noise(shape: Sequence[int], seed: int, ids: Sequence[str], timestep: int) -> Tensor:
    """float32 [B, *shape] standard normal noise, image i's drawn from ``noise_seed(seed, ids[i], t)``."""
    out = []
    for image_id in ids:
        generator = torch.Generator().manual_seed(noise_seed(seed, image_id, timestep))
        out.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(out)


def to_spatial(probs: Tensor, size: int) -> Tensor:
    """[B, h·w, tokens] (square h = w) → [B, tokens, size, size]: nearest repetition when size is a multiple
    of h (the reference), bilinear otherwise."""
    batch, hw, tokens = probs.shape
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"attention over {hw} positions is not a square map")
    maps = probs.transpose(1, 2).reshape(batch, tokens, side, side)
    if side == size:
        return maps
    if size % side == 0:
        factor = size // side
        return maps.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class CapturedMaps:
    """Per-layer, per-timestep token maps of one batch: float32 [B, layers, timesteps, tokens, S, S]."""

    maps: Tensor
    layers: tuple[str, ...]
    timesteps: tuple[int, ...]


@torch.no_grad()
def capture_maps(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    images: Tensor,
    states: Tensor,
    ids: Sequence[str],
    timesteps: Sequence[int],
    seed: int,
    map_size: int,
) -> CapturedMaps:
    """Run the protocol on one batch: ``images`` float32 [B, 1, S, S] in [-1, 1], ``states`` the text
    states [B, L, D] of their reports, ``ids`` the image ids (noise seeds). Returns every layer's token maps
    at every timestep, upsampled to ``map_size``."""
    per_step = []
    layers: tuple[str, ...] = ()
    device = images.device
    with capture_cross_attention(unet) as store:
        for t in timesteps:
            noise = seeded_noise(images.shape[1:], seed, ids, int(t)).to(device)
            steps = torch.full((images.shape[0],), int(t), dtype=torch.long, device=device)
            # diffusers annotates timesteps as torch.IntTensor (int32) but indexes with any integer tensor;
            # its own training examples pass int64 as here
            noisy = scheduler.add_noise(images, noise, steps)  # type: ignore[arg-type]
            store.clear()
            unet(noisy, steps, encoder_hidden_states=states)
            layers = tuple(store.maps)
            per_step.append(torch.stack([to_spatial(store.maps[name], map_size) for name in layers], dim=1))
    return CapturedMaps(torch.stack(per_step, dim=2).cpu(), layers, tuple(int(t) for t in timesteps))


def token_weights(positions: Sequence[Sequence[int]], tokens: int) -> Tensor:
    """float32 [B, tokens]: 1/len(positions[i]) on image i's token positions (the mean over a word's
    tokens); an image without positions gets all zeros (its map is degenerate, scored NaN)."""
    weights = torch.zeros(len(positions), tokens)
    for i, pos in enumerate(positions):
        if pos:
            weights[i, list(pos)] = 1.0 / len(pos)
    return weights


def word_maps(captured: CapturedMaps, weights: Tensor) -> Tensor:
    """Token-weighted maps float32 [B, layers, timesteps, S, S] (weights [B, tokens])."""
    return torch.einsum("bltkhw,bk->blthw", captured.maps, weights)
