"""The ``diffusion:`` section of a study file (ARCHITECTURE §11) and its presets.

Validated like every section (``evidrift.core.config``: ``Section``, ``validate_model``): unknown keys are
errors, and a wrong value is raised as ``ConfigError`` naming its dotted key (``diffusion.unet.channels:
...``). ``preset(name)`` gives
the ``quick`` (tests, < 2 min), ``default`` (≤ 10 min on 2 CPU cores) and ``gpu`` (64 px, long training)
configurations; a study file's ``diffusion:`` mapping overrides a preset key by key (``preset: quick``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from evidrift.core.config import ConfigError, Section, validate_model

Variant = Literal["frozen", "learnable", "cross_attention"]
VARIANTS: tuple[Variant, ...] = ("frozen", "learnable", "cross_attention")


class DiffusionConfigError(ConfigError):
    """A diffusion study file or preset that cannot be used; the message names the file/key and the fix."""


class DataSection(Section):
    """Phantom images for the study: a base set (pretraining), a fine-tune set and a test set, all rendered
    at ``size`` px from their own seeds; ``marker`` is the probability of a planted marker (named in the
    report) in the base and fine-tune sets; half the test images carry one (alternate class cycles, see
    ``studies.diffusion.data``)."""

    size: Annotated[int, Field(ge=16, le=512)] = 32
    n_base: Annotated[int, Field(ge=10)] = 400
    n_finetune: Annotated[int, Field(ge=10)] = 200
    n_test: Annotated[int, Field(ge=5)] = 40
    marker: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    marker_size: Annotated[int, Field(ge=1)] = 3
    seed: int = 0


class UNetSection(Section):
    """``UNet2DConditionModel`` sizes: ``channels`` per block (cross-attention in every block but the first),
    ``head_dim`` per attention head."""

    channels: Annotated[list[int], Field(min_length=2)] = [16, 32, 64]
    layers_per_block: Annotated[int, Field(ge=1)] = 1
    head_dim: Annotated[int, Field(ge=1)] = 8
    norm_groups: Annotated[int, Field(ge=1)] = 8

    @model_validator(mode="after")
    def _groups_divide(self) -> UNetSection:
        bad = [c for c in self.channels if c % self.norm_groups or c % self.head_dim]
        if bad:
            raise ValueError(f"channels {bad} must be multiples of norm_groups and head_dim")
        return self


class TextSection(Section):
    """``CLIPTextModel`` sizes (built from a ``CLIPTextConfig``) and its contrastive pretraining."""

    hidden: Annotated[int, Field(ge=8)] = 32
    layers: Annotated[int, Field(ge=1)] = 2
    heads: Annotated[int, Field(ge=1)] = 2
    max_length: Annotated[int, Field(ge=4)] = 8
    pretrain_steps: Annotated[int, Field(ge=0)] = 150
    pretrain_lr: Annotated[float, Field(gt=0)] = 2e-3

    @model_validator(mode="after")
    def _heads_divide(self) -> TextSection:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        return self


class TrainSection(Section):
    """DDPM noise-prediction training: the base model on the base set, then each variant from the base on
    the fine-tune set with the same seed and budget. ``text_lr``: the learnable text encoder's rate (None:
    the UNet's rate, as chest-distillation's ``LatentDiffusion.configure_optimizers`` adds the conditioner's
    parameters to the one optimizer). ``ucg``: probability of an empty prompt (unconditional-guidance
    dropout; the reference's ``ucg_probability``, 0 in its default config — here 0.1 so that guided
    sampling has an unconditional model)."""

    batch_size: Annotated[int, Field(ge=1)] = 16
    base_steps: Annotated[int, Field(ge=1)] = 400
    finetune_steps: Annotated[int, Field(ge=1)] = 150
    lr: Annotated[float, Field(gt=0)] = 1e-3
    finetune_lr: Annotated[float, Field(gt=0)] = 5e-4
    text_lr: Annotated[float, Field(gt=0)] | None = None
    ucg: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    train_timesteps: Annotated[int, Field(ge=10)] = 1000
    variants: Annotated[list[Variant], Field(min_length=1)] = list(VARIANTS)
    seed: int = 0


class AttentionSection(Section):
    """The reference protocol: the real image noised to each of ``timesteps`` (DDPM indices, noise seeded per
    (image, timestep)), one UNet pass each; maps upsampled to ``map_size`` and averaged over heads, layers,
    timesteps and the query word's tokens. ``noise_seeds``: the study seed and the noise-floor seed."""

    timesteps: Annotated[list[int], Field(min_length=1)] = [100, 250, 400, 550, 700]
    map_size: Annotated[int, Field(ge=4)] = 32
    noise_seed: int = 0
    floor_seed: int = 1

    @field_validator("timesteps")
    @classmethod
    def _non_negative(cls, steps: list[int]) -> list[int]:
        if any(t < 0 for t in steps):
            raise ValueError(f"timesteps must be >= 0, got {steps}")
        return steps


class FidelitySection(Section):
    """Fidelity without downloads: ``n_samples`` per prompt class sampled with DDIM (``sample_steps``,
    guidance ``guidance``), scored in the feature space of a classifier trained in the run
    (``classifier_steps``); ``inception_weights``: a local InceptionV3 weights file for standard FID."""

    n_samples: Annotated[int, Field(ge=2)] = 16
    sample_steps: Annotated[int, Field(ge=2)] = 10
    guidance: Annotated[float, Field(ge=1.0)] = 2.0
    classifier_steps: Annotated[int, Field(ge=1)] = 300
    kid_subset: Annotated[int, Field(ge=2)] = 50
    inception_weights: Path | None = None


class StatsSection(Section):
    n_boot: Annotated[int, Field(ge=100)] = 1000
    seed: int = 0


class DiffusionConfig(Section):
    """The diffusion study (ARCHITECTURE §11). ``model``: a local Stable-Diffusion-style folder (``unet/``,
    ``text_encoder/``, ``scheduler/``) loaded with ``local_files_only=True`` instead of training from
    scratch (the base model; the variants are fine-tuned from it)."""

    preset: Literal["quick", "default", "gpu"] = "default"
    model: Path | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    data: DataSection = DataSection()
    unet: UNetSection = UNetSection()
    text: TextSection = TextSection()
    train: TrainSection = TrainSection()
    attention: AttentionSection = AttentionSection()
    fidelity: FidelitySection = FidelitySection()
    stats: StatsSection = StatsSection()

    @model_validator(mode="after")
    def _timesteps_in_range(self) -> DiffusionConfig:
        top = self.train.train_timesteps
        bad = [t for t in self.attention.timesteps if t >= top]
        if bad:
            raise ValueError(f"attention.timesteps {bad} must be < train.train_timesteps ({top})")
        return self


#: Key-by-key overrides of the defaults per preset.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "data": {"n_base": 60, "n_finetune": 40, "n_test": 15, "size": 32},
        "unet": {"channels": [8, 16, 32], "head_dim": 8, "norm_groups": 4},
        "text": {"hidden": 16, "layers": 1, "heads": 2, "pretrain_steps": 20},
        "train": {"batch_size": 8, "base_steps": 30, "finetune_steps": 15},
        "attention": {"timesteps": [200, 500], "map_size": 16},
        "fidelity": {"n_samples": 6, "sample_steps": 5, "classifier_steps": 30, "kid_subset": 6},
        "stats": {"n_boot": 200},
    },
    "gpu": {
        "device": "auto",
        "data": {"n_base": 20000, "n_finetune": 5000, "n_test": 500, "size": 64},
        "unet": {"channels": [64, 128, 256, 256], "head_dim": 32, "norm_groups": 32},
        "text": {"hidden": 256, "layers": 4, "heads": 4, "pretrain_steps": 5000},
        "train": {"batch_size": 64, "base_steps": 40000, "finetune_steps": 10000},
        "attention": {"timesteps": list(range(20, 781, 20)), "map_size": 64},
        "fidelity": {"n_samples": 500, "sample_steps": 50, "classifier_steps": 3000, "kid_subset": 200},
        "stats": {"n_boot": 2000},
    },
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class DiffusionFile(Section):
    """The keys of a study file the diffusion command reads (other sections of the file are not read)."""

    diffusion: DiffusionConfig = DiffusionConfig()


def parse_diffusion(raw: dict[str, Any] | None, source: str = "<dict>") -> DiffusionConfig:
    """Validate a ``diffusion:`` mapping over its preset (``raw['preset']``, default ``default``); raises
    ``ConfigError`` listing every wrong key by its dotted path (``diffusion.train.lr``)."""
    raw = dict(raw or {})
    name = raw.get("preset", "default")
    if name not in PRESETS:
        raise DiffusionConfigError(f"{source}: diffusion.preset {name!r} is not one of {sorted(PRESETS)}")
    merged = _merge(PRESETS[name], raw) | {"preset": name}
    return validate_model(DiffusionFile, {"diffusion": merged}, source, "diffusion study file").diffusion


def preset(name: str) -> DiffusionConfig:
    """The named preset (``quick``, ``default``, ``gpu``)."""
    return parse_diffusion({"preset": name}, f"preset {name!r}")


def load_diffusion(path: str | os.PathLike[str]) -> tuple[DiffusionConfig, Path | None]:
    """Read a study file's ``diffusion:`` section and its ``output.dir`` (None when absent; relative paths
    resolve against the file's folder, as ``evidrift.studies.config.load_config`` does)."""
    file = Path(path)
    if not file.is_file():
        raise DiffusionConfigError(f"study file {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DiffusionConfigError(f"{file} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("diffusion", {}), dict):
        raise DiffusionConfigError(f"{file} must hold a mapping with a `diffusion:` mapping")
    config = parse_diffusion(raw.get("diffusion"), str(file))
    base = file.resolve().parent
    if config.model is not None and not config.model.is_absolute():
        config.model = (base / config.model).resolve()
    out = (raw.get("output") or {}).get("dir") if isinstance(raw.get("output"), dict) else None
    return config, ((base / out).resolve() if out is not None else None)


def config_dict(config: DiffusionConfig) -> dict[str, Any]:
    """JSON-able resolved form (hashed per step)."""
    return config.model_dump(mode="json")
