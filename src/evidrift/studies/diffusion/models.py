"""The diffusion study's networks, built from configs (no downloads) or loaded from a local folder.

- ``build_unet``: a pixel-space ``diffusers.UNet2DConditionModel`` on one-channel images: a plain first
  block, cross-attention in every later down/up block and in the middle block.
- ``build_text_encoder``: a ``transformers.CLIPTextModel`` from a ``CLIPTextConfig`` over the report
  vocabulary (``evidrift.data.reports``).
- ``build_schedulers``: ``DDPMScheduler`` for training, ``DDIMScheduler`` (same betas) for sampling.
- ``SmallImageEncoder``: a 3-conv CNN [N, 1, S, S] → [N, dim]: the image side of the text encoder's
  contrastive pretraining and, with a class head, the in-run fidelity classifier.
- ``save_model_folder`` / ``load_model_folder``: a Stable-Diffusion-style folder (``unet/``,
  ``text_encoder/``, ``scheduler/``) written with ``save_pretrained`` and read with
  ``from_pretrained(local_files_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

from evidrift.core.errors import EvidriftError
from evidrift.data.reports import WordTokenizer
from evidrift.studies.diffusion.config import DiffusionConfig

if TYPE_CHECKING:
    # The classes' own modules: under TYPE_CHECKING ``from diffusers import X`` resolves to diffusers' dummy
    # placeholder objects (diffusers/utils/dummy_pt_objects.py), which have none of the real attributes.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ModelFolderError(EvidriftError, ValueError):
    """A ``diffusion.model`` folder that cannot be loaded; the message names the folder and what is
    missing."""


def build_unet(config: DiffusionConfig) -> UNet2DConditionModel:
    """``UNet2DConditionModel`` for [N, 1, size, size] images in [-1, 1] conditioned on [N, L, text.hidden]
    token states. Heads per attention block = block channels / ``unet.head_dim`` (diffusers' legacy
    ``attention_head_dim`` argument of this class is the number of heads)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    channels = tuple(config.unet.channels)
    n = len(channels)
    heads = tuple(max(1, c // config.unet.head_dim) for c in channels)
    return UNet2DConditionModel(
        sample_size=config.data.size,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=channels,
        layers_per_block=config.unet.layers_per_block,
        cross_attention_dim=config.text.hidden,
        attention_head_dim=heads,
        norm_num_groups=config.unet.norm_groups,
    )


def build_text_encoder(config: DiffusionConfig, tokenizer: WordTokenizer) -> CLIPTextModel:
    """``CLIPTextModel`` from a ``CLIPTextConfig`` sized by ``config.text`` over ``tokenizer``'s
    vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = config.text
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer.vocabulary),
        hidden_size=text.hidden,
        intermediate_size=2 * text.hidden,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        max_position_embeddings=tokenizer.max_length,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.start_id,
        eos_token_id=tokenizer.end_id,
    )
    return CLIPTextModel(clip_config)


def build_schedulers(config: DiffusionConfig) -> tuple[DDPMScheduler, DDIMScheduler]:
    """(DDPMScheduler for training, DDIMScheduler with the same betas for sampling)."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    ddpm = DDPMScheduler(
        num_train_timesteps=config.train.train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    return ddpm, DDIMScheduler.from_config(ddpm.config)


def text_states(text_encoder: CLIPTextModel, ids: Tensor) -> Tensor:
    """Last hidden states float32 [N, L, hidden] of token ids int64 [N, L] (pad positions masked out of the
    encoder's attention)."""
    return text_encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state


def to_device(module: ModuleT, device: torch.device) -> ModuleT:
    """``module.to(device)`` typed as returning ``module``'s own class. (diffusers' ``ModelMixin.to`` and
    transformers' ``PreTrainedModel.to`` are decorated with ``functools.wraps(nn.Module.to)``, which makes
    type checkers see an unbound function; the call here still dispatches to those overrides.)"""
    return module.to(device)


class SmallImageEncoder(nn.Module):
    """[N, 1, S, S] in [-1, 1] → features [N, dim]: three stride-2 3×3 convs (ReLU), global mean pool,
    linear; ``classes > 0`` adds a linear class head used by ``logits``."""

    def __init__(self, dim: int, classes: int = 0, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.project = nn.Linear(4 * width, dim)
        self.head = nn.Linear(dim, classes) if classes > 0 else None

    def forward(self, images: Tensor) -> Tensor:
        return self.project(self.body(images).mean(dim=(2, 3)))

    def logits(self, images: Tensor) -> Tensor:
        if self.head is None:
            raise ValueError("this encoder was built without a class head (classes=0)")
        return self.head(torch.relu(self(images)))


def save_model_folder(
    folder: str | os.PathLike[str],
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
) -> Path:
    """Write ``unet/``, ``text_encoder/`` and ``scheduler/`` under ``folder`` (safetensors weights)."""
    root = Path(folder)
    unet.save_pretrained(root / "unet")
    text_encoder.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    return root


def load_model_folder(
    folder: str | os.PathLike[str],
) -> tuple[UNet2DConditionModel, CLIPTextModel, DDPMScheduler]:
    """(UNet2DConditionModel, CLIPTextModel, DDPMScheduler) from a local Stable-Diffusion-style folder, with
    ``local_files_only=True`` (never a download). The UNet must work in pixel space on one channel (a
    folder with a ``vae/`` latent model is not supported by this study)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel

    root = Path(folder)
    missing = [part for part in ("unet", "text_encoder", "scheduler") if not (root / part).is_dir()]
    if missing:
        raise ModelFolderError(
            f"diffusion.model {root} lacks {missing}; it must hold unet/, text_encoder/ and scheduler/ "
            "(as written by save_pretrained)"
        )
    quiet_hub_logging()
    unet = UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False
    )
    if unet.config.in_channels != 1:
        raise ModelFolderError(
            f"diffusion.model {root}: unet has {unet.config.in_channels} input channels; this study runs in "
            "pixel space on one-channel images (latent models with a vae/ are not supported)"
        )
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return unet, text_encoder, scheduler


def quiet_hub_logging() -> None:
    """diffusers / transformers: errors only, no progress bars while loading weights."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
