"""The ``models:``, ``train:`` and ``stats:`` sections of a study file: architectures, heads, weights and CAM
layers per model; the three training stages (``STAGE_DEFAULTS`` per stage, then the user's keys); the
statistics settings. ``ClassifierStudy`` is what training and evaluation read of a study."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from evidrift.core.config import Section
from evidrift.data.config import DataConfig


class HeadConfig(Section):
    """Classifier head: ``linear`` (``bias`` on/off) or ``mlp2``/``mlp3`` (``hidden`` wide, BN + ReLU)."""

    type: Literal["linear", "mlp2", "mlp3"] = "linear"
    bias: bool = True
    hidden: Annotated[int, Field(ge=1)] = 256
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


#: A model key (``name``, else ``arch``) is a folder and file-name part of the run directory: letters,
#: digits, ``-``, ``_`` and ``.``, not starting with a dot (no path separators, no ``..``).
MODEL_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


_UNSAFE_KEY = (
    "cannot name the model's folder in the run directory: use only letters, digits, '-', '_' and '.', "
    "not starting with a dot (no '/', '\\', '..' at the start, spaces or markup)"
)


class ModelConfig(Section):
    """One architecture of the study. ``arch``: an alias (densenet201, resnet50v2, inceptionv3) or any timm
    name. ``weights``: ``none`` (stage 0 pretraining on the phantom source set), ``imagenet`` (timm hub), or a
    local ``.safetensors``/``.pth`` file. ``cam_layers``: ``default`` (the paper's post-activation last
    stage), ``spatial`` (the layer before it, where the CAM gradient varies over space), ``auto`` or dotted
    module names. ``name`` (else ``arch``) names the model's folders and table rows: ``MODEL_KEY_PATTERN``."""

    arch: str
    weights: str = "none"
    image_size: Annotated[int, Field(ge=16, le=1024)] | None = None
    head: HeadConfig = HeadConfig()
    cam_layers: list[str] = ["default"]
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_safe_file_name(cls, name: str | None) -> str | None:
        if name is not None and MODEL_KEY_PATTERN.fullmatch(name) is None:
            raise ValueError(f"model name {name!r} {_UNSAFE_KEY}")
        return name

    @model_validator(mode="after")
    def _arch_key_is_a_safe_file_name(self) -> ModelConfig:
        if self.name is None and MODEL_KEY_PATTERN.fullmatch(self.arch) is None:
            raise ValueError(f"arch {self.arch!r} is used as the model's name and {_UNSAFE_KEY}; set `name`")
        return self

    @property
    def key(self) -> str:
        """Name used in run paths and tables (``name`` if given, else ``arch``)."""
        return self.name or self.arch


class StageConfig(Section):
    """Optimisation of one training stage (warm-up + cosine schedule, early stopping on ``monitor``).

    Stage 1 only (both default to on there): ``cache_features`` computes the frozen backbone's pooled
    features once (no augmentation); ``standardize_features`` trains the head on standardized features,
    then folds the standardization into the head's first linear layer, so the checkpoint is a plain model;
    ``feature_scale``: ``shared`` (one scale, the features' RMS standard deviation: low-variance features are
    not blown up, so the folded head stays as smooth as the features) or ``per_feature``.
    ``image_size`` sets the stage's input side for every model; ``image_scale`` instead multiplies each
    model's own side (e.g. 0.5: stage 0 pretrains at half resolution, about 4x cheaper per image).
    Stage 2 only: ``freeze_batchnorm`` keeps the backbone's BatchNorm running statistics fixed while every
    weight trains (Keras' fine-tuning recipe), so fine-tuning starts from the function stage 1 ended with.
    ``final_lr_ratio``: where the cosine schedule ends, as a fraction of ``lr``.
    ``augment`` turns the training augmentation on or off for this stage (null: ``data.augment``); a stage
    that caches features never augments.
    ``divergence_factor``: the stage stops with an error when an epoch's train or validation loss is
    non-finite or above this factor times the first epoch's (null: no growth check).

    The defaults of each stage are ``STAGE_DEFAULTS[stage]`` (``TrainConfig`` fills them in key by key): the
    field defaults below are only the keys no stage sets."""

    epochs: Annotated[int, Field(ge=0)] = 10
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    patience: Annotated[int, Field(ge=1)] | None = 5
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1", "val_macro_auroc"] = "val_macro_f1"
    grad_clip: Annotated[float, Field(gt=0)] | None = 5.0
    cache_features: bool | None = None
    standardize_features: bool | None = None
    feature_scale: Literal["shared", "per_feature"] | None = None
    freeze_batchnorm: bool = False
    augment: bool | None = None
    final_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    image_size: Annotated[int, Field(ge=16, le=1024)] | None = None
    image_scale: Annotated[float, Field(gt=0.0, le=4.0)] | None = None
    max_steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
    divergence_factor: Annotated[float, Field(gt=1.0)] | None = 10.0

    @model_validator(mode="after")
    def _one_size_rule(self) -> StageConfig:
        if self.image_size is not None and self.image_scale is not None:
            raise ValueError(
                f"image_size ({self.image_size}) and image_scale ({self.image_scale:g}) both set; keep one"
            )
        return self


#: Per-stage defaults, applied key by key under what a study sets (``train: {stage2: {epochs: 2}}`` keeps
#: stage 2's lr 3e-4). Stage 0 trains from scratch: it needs optimizer steps (15 epochs of batch 16: ~450
#: steps on the default 800 source images) for its features to transfer (measured: stage-1 test accuracy
#: 0.46 after 15 epochs, chance level after 4-6); its cosine ends at 0.3 x lr, not near zero: an annealed
#: backbone sits in a minimum so sharp that one AdamW step of 1e-5 in stage 2 tripled a batch's loss
#: (measured on the demo's densenet201; README, "How a study runs"). Stage 1 caches its features and
#: standardizes them with one shared scale. Stage 2 keeps BatchNorm's running statistics: with batch
#: statistics the stage-1 head's input shifts and fine-tuning diverged.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage0": {"epochs": 15, "lr": 2e-3, "monitor": "val_accuracy", "batch_size": 16, "final_lr_ratio": 0.3},
    "stage1": {
        "epochs": 10,
        "lr": 3e-3,
        "cache_features": True,
        "standardize_features": True,
        "feature_scale": "shared",
    },
    "stage2": {"epochs": 6, "lr": 3e-4, "freeze_batchnorm": True},
}


class TrainConfig(Section):
    """The protocol (ARCHITECTURE §4): stage 0 only without pretrained weights, stage 1 frozen, stage 2 full.
    Each stage's keys default to ``STAGE_DEFAULTS`` one by one (setting one key never changes another)."""

    loss: Literal["ce", "bce"] = "ce"
    device: str = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0
    deterministic: bool = True
    #: ``auto``: bf16 autocast + channels-last where the device computes bf16 natively, else fp32
    #: (``classifier.precision``); explanations, test evaluation and metrics always run in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    stage0: StageConfig = StageConfig(**STAGE_DEFAULTS["stage0"])
    stage1: StageConfig = StageConfig(**STAGE_DEFAULTS["stage1"])
    stage2: StageConfig = StageConfig(**STAGE_DEFAULTS["stage2"])

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults_key_by_key(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, defaults in STAGE_DEFAULTS.items():
            given = merged.get(name)
            if isinstance(given, dict):
                merged[name] = {**defaults, **given}
            elif given is None and name in merged:
                merged[name] = dict(defaults)  # `stage2:` with nothing under it
        return merged

    @model_validator(mode="after")
    def _stage1_only_options(self) -> TrainConfig:
        for name in ("stage0", "stage2"):
            stage = getattr(self, name)
            for option in ("cache_features", "standardize_features", "feature_scale"):
                if getattr(stage, option):
                    raise ValueError(
                        f"train.{name}.{option} applies to stage 1 only (the frozen-backbone head); "
                        f"remove it from train.{name}"
                    )
        if self.stage1.cache_features and self.stage1.augment:
            raise ValueError(
                "train.stage1.augment: true has no effect while train.stage1.cache_features is on (the "
                "features are computed once, un-augmented); set cache_features: false to augment stage 1"
            )
        for name in ("stage0", "stage1"):
            if getattr(self, name).freeze_batchnorm:
                raise ValueError(
                    f"train.{name}.freeze_batchnorm applies to stage 2 only (stage 0 trains from scratch, "
                    f"stage 1 keeps the whole backbone in eval mode); remove it from train.{name}"
                )
        return self


class StatsConfig(Section):
    """Statistics (ARCHITECTURE §7): seeded percentile bootstrap, Wilcoxon with Holm correction at ``alpha``;
    ``permutations``: draws of the permutation null of the rank-reversal count."""

    n_boot: Annotated[int, Field(ge=100)] = 2000
    permutations: Annotated[int, Field(ge=200)] = 1000
    ci: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    seed: int = 0


class ClassifierStudy(Protocol):
    """What training and evaluation read of a study (``studies.config.StudyConfig`` is one): its seed, data,
    models, training and statistics sections."""

    @property
    def seed(self) -> int: ...
    @property
    def data(self) -> DataConfig: ...
    @property
    def models(self) -> list[ModelConfig]: ...
    @property
    def train(self) -> TrainConfig: ...
    @property
    def stats(self) -> StatsConfig: ...
