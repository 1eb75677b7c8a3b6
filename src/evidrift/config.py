"""study.yaml as pydantic models (DESIGN § 2).

``load_config(path)`` reads and validates a study file; a validation error is raised as ``ConfigError``
whose message names each wrong key by its dotted path, the value given and what is allowed. Unknown keys are
errors too (a typo must not be silently ignored). ``resolved_dict(config)`` is the canonical form written to
``run/config.yaml`` and hashed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evidrift.artifacts import config_hash

DEFAULT_EXPLAIN_METHODS = ["gradcam++", "layercam", "gradcam", "xgradcam"]


class ConfigError(ValueError):
    """A study file that cannot be used; the message names the file, the keys and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(Section):
    """The embedded procedural chest X-ray set (DESIGN § 9)."""

    n: Annotated[int, Field(ge=10, description="number of images (balanced over the five classes)")] = 500
    size: Annotated[int, Field(ge=32, le=2048, description="image side in pixels")] = 256
    seed: int = 0
    shortcut_marker: Annotated[
        float, Field(ge=0.0, le=1.0, description="probability that an image carries its class's text marker")
    ] = 0.0
    n_source: Annotated[int, Field(ge=0, description="images of the stage-0 `source` set")] = 800


class SplitConfig(Section):
    """Seeded stratified split fractions (grouped by patient_id when present); train gets the rest."""

    val: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.15
    test: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} must be < 1 so that train is not empty")
        return self


class DataConfig(Section):
    """Where images come from. ``source``: ``phantom`` (generated into the run), ``folder`` (one sub-folder
    per class under ``path``) or ``csv`` (a manifest with columns ``path,label`` and optional ``split``,
    ``patient_id``, ``mask``, ``x0,y0,x1,y1``; paths relative to the CSV)."""

    source: Literal["phantom", "folder", "csv"] = "phantom"
    path: Path | None = None
    classes: list[str] | None = None
    phantom: PhantomConfig = PhantomConfig()
    split: SplitConfig = SplitConfig()
    on_bad_image: Literal["error", "skip"] = "error"
    resize: Literal["pad", "crop"] = "pad"
    augment: bool = True

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataConfig:
        if self.source != "phantom" and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


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
    then folds the standardization into the head's first linear layer, so the checkpoint is a plain model.
    ``image_size`` sets the stage's input side for every model; ``image_scale`` instead multiplies each
    model's own side (e.g. 0.5: stage 0 pretrains at half resolution, about 4x cheaper per image).
    Stage 2 only: ``freeze_batchnorm`` keeps the backbone's BatchNorm running statistics fixed while every
    weight trains (Keras' fine-tuning recipe), so fine-tuning starts from the function stage 1 ended with.
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
    freeze_batchnorm: bool = False
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
#: 0.46 after 15 epochs, chance level after 4-6). Stage 1 caches and standardizes its features. Stage 2
#: keeps BatchNorm's running statistics: with batch statistics the standardized stage-1 head's input shifts
#: and fine-tuning diverged (README, "Three training details").
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage0": {"epochs": 15, "lr": 2e-3, "monitor": "val_accuracy", "batch_size": 16},
    "stage1": {"epochs": 10, "lr": 3e-3, "cache_features": True, "standardize_features": True},
    "stage2": {"epochs": 6, "lr": 3e-4, "freeze_batchnorm": True},
}


class TrainConfig(Section):
    """The protocol (DESIGN § 4): stage 0 only without pretrained weights, stage 1 frozen, stage 2 full.
    Each stage's keys default to ``STAGE_DEFAULTS`` one by one (setting one key never changes another)."""

    loss: Literal["ce", "bce"] = "ce"
    device: str = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0
    deterministic: bool = True
    #: ``auto``: bf16 autocast + channels-last where the device computes bf16 natively, else fp32
    #: (``evidrift.precision``); explanations, test evaluation and metrics always run in fp32.
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
            for option in ("cache_features", "standardize_features"):
                if getattr(stage, option):
                    raise ValueError(
                        f"train.{name}.{option} applies to stage 1 only (the frozen-backbone head); "
                        f"remove it from train.{name}"
                    )
        for name in ("stage0", "stage1"):
            if getattr(self, name).freeze_batchnorm:
                raise ValueError(
                    f"train.{name}.freeze_batchnorm applies to stage 2 only (stage 0 trains from scratch, "
                    f"stage 1 keeps the whole backbone in eval mode); remove it from train.{name}"
                )
        return self


class ExplainConfig(Section):
    """Which maps are computed: methods (see ``evidrift.cam``), samples (``tp_both`` = test images correctly
    classified at both stages, ``tp_any``, ``all``), target class (``label`` or ``prediction``), score
    (``logit`` or ``softmax``)."""

    methods: list[str] = DEFAULT_EXPLAIN_METHODS
    samples: Literal["tp_both", "tp_any", "all"] = "tp_both"
    target: Literal["label", "prediction"] = "label"
    score: Literal["logit", "softmax"] = "logit"
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_images: Annotated[int, Field(ge=1)] | None = None
    shard_size: Annotated[int, Field(ge=1)] = 256


class DriftConfig(Section):
    """Reference-free drift metrics (DESIGN § 6). ``metrics``: ``all`` or names; ``size``: analysis side in
    pixels, one for the whole study (null = the smallest input size of the study's models); ``zone_grid``:
    [rows, columns]; ``topk``: fractions for @k; ``equivalence_spearman``: two methods whose maps agree with
    a median Spearman ≥ this (or differ by ≤ 1e-3 after min-max) for every architecture at a layer count as
    one method there."""

    metrics: list[str] | Literal["all"] = "all"
    size: Annotated[int, Field(ge=8, le=1024)] | None = None
    zone_grid: tuple[int, int] = (3, 2)
    topk: list[Annotated[float, Field(gt=0, lt=1)]] = [0.05, 0.10, 0.20, 0.30]
    equivalence_spearman: Annotated[float, Field(gt=0, le=1)] = 0.99


class StatsConfig(Section):
    """Statistics (DESIGN § 7): seeded percentile bootstrap, Wilcoxon with Holm correction at ``alpha``;
    ``permutations``: draws of the permutation null of the rank-reversal count."""

    n_boot: Annotated[int, Field(ge=100)] = 2000
    permutations: Annotated[int, Field(ge=200)] = 1000
    ci: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    seed: int = 0


class ReportConfig(Section):
    """The HTML report: ``examples`` overlays per (arch, method) for typical and most-drifted images."""

    enabled: bool = True
    examples: Annotated[int, Field(ge=0, le=32)] = 3
    title: str = "evidrift study"


class OutputConfig(Section):
    dir: Path = Path("runs/study")


# --- probe / sanity (issue 7) -------------------------------------------------------------------------------
ProbeHead = Literal["linear", "linear_nobias", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3"]
#: The "How to Probe" attribution set (``evidrift.probe_attributions``).
PROBE_METHODS = ["gradcam", "input_x_gradient", "integrated_gradients", "lrp", "bcos"]


class ProbeConfig(Section):
    """Head probing study ("How to Probe"): on a frozen backbone (``backbone``: ``pretrained`` = the model's
    weights, or its stage-0 checkpoint when ``weights: none``; ``finetuned`` = the run's stage-2 backbone, for
    an in-domain backbone when pretraining transfers poorly), one head per ``losses`` × ``heads`` variant
    (same ``epochs``/``lr``/``batch_size``/``seed``), explained with ``methods``. Heads run at every position
    of the backbone's feature map (1 × 1 convolutions, ``hidden`` wide, average pooling after the last layer);
    ``standardize`` divides every channel by its training standard deviation for every variant alike. ``bce``
    targets are max(onehot, ``bce_off_label``) (null = 1/C, the reference's default). Layer methods run at
    ``layer`` (``reference`` = the last block's final convolution, ``features`` = the backbone output, or a
    dotted module name of the backbone). GridPG grids (n × n full-size images for n in ``grids``,
    ``n_grids`` of each) are built from test images every variant classifies correctly with probability ≥
    ``confidence`` (``grid_pool: all``: any test image, for tiny smoke runs); maps are smoothed by a
    ``smoothing`` × ``smoothing`` average pool (1 = none) before negative values are clipped. ``max_images``
    caps the test images explained against the lesion masks (null = all)."""

    backbone: Literal["pretrained", "finetuned"] = "pretrained"
    losses: Annotated[list[Literal["ce", "bce"]], Field(min_length=1)] = ["ce", "bce"]
    heads: Annotated[list[ProbeHead], Field(min_length=1)] = ["linear", "linear_nobias", "mlp2", "mlp3"]
    hidden: Annotated[int, Field(ge=1)] = 2048
    standardize: bool = True
    bce_off_label: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    layer: str = "reference"
    epochs: Annotated[int, Field(ge=1)] = 30
    lr: Annotated[float, Field(gt=0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    batch_size: Annotated[int, Field(ge=1)] = 64
    methods: Annotated[list[str], Field(min_length=1)] = PROBE_METHODS
    ig_steps: Annotated[int, Field(ge=1, le=256)] = 20
    confidence: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    grid_pool: Literal["confident", "all"] = "confident"
    grids: Annotated[list[Annotated[int, Field(ge=2, le=8)]], Field(min_length=1)] = [2, 3]
    n_grids: Annotated[int, Field(ge=1)] = 50
    smoothing: Annotated[int, Field(ge=1, le=31)] = 5
    max_images: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0

    @field_validator("smoothing")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"probe.smoothing must be an odd kernel size (1 = no smoothing), got {value}")
        return value


class SanityConfig(Section):
    """Parameter-randomization sanity checks: ``mode`` ``cascading`` (from the head down, block by block),
    ``independent`` (one block at a time) or ``both``; ``n_images`` test images explained with ``methods``;
    HOG features with ``hog_cell`` × ``hog_cell``-pixel cells."""

    methods: Annotated[list[str], Field(min_length=1)] = DEFAULT_EXPLAIN_METHODS
    mode: Literal["cascading", "independent", "both"] = "both"
    n_images: Annotated[int, Field(ge=2)] = 16
    hog_cell: Annotated[int, Field(ge=4)] = 16
    seed: int = 0


class StudyConfig(Section):
    """A whole study (study.yaml)."""

    seed: int = 0
    data: DataConfig = DataConfig()
    models: Annotated[list[ModelConfig], Field(min_length=1)] = [
        ModelConfig(arch="densenet201"),
        ModelConfig(arch="resnet50v2"),
        ModelConfig(arch="inceptionv3"),
    ]
    train: TrainConfig = TrainConfig()
    explain: ExplainConfig = ExplainConfig()
    drift: DriftConfig = DriftConfig()
    stats: StatsConfig = StatsConfig()
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()
    probe: ProbeConfig = ProbeConfig()
    sanity: SanityConfig = SanityConfig()

    @field_validator("models")
    @classmethod
    def _unique_model_keys(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        keys = [m.key for m in models]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"models listed twice: {duplicated}; give each a distinct `name`")
        return models


def _section_model(parts: list[str]) -> type[BaseModel] | None:
    """The pydantic model holding the key at dotted path ``parts`` (list indices skipped), or None."""
    import typing

    model: type[BaseModel] = StudyConfig
    for part in parts[:-1]:
        if part.isdigit() or part not in model.model_fields:
            continue
        stack, found = [model.model_fields[part].annotation], None
        while stack and found is None:
            candidate = stack.pop()
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found = candidate
            else:
                stack.extend(typing.get_args(candidate))
        if found is None:
            return None
        model = found
    return model


def _describe_unknown_key(location: str, parts: list[str]) -> str:
    """``a.b.typo: unknown key; did you mean 'key'? (allowed: k1, k2, ...)``."""
    import difflib

    model = _section_model(parts)
    if model is None:
        return f"{location}: unknown key (check the spelling; `evidrift validate` prints every valid key)"
    keys = list(model.model_fields)
    close = difflib.get_close_matches(parts[-1], keys, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{location}: unknown key; {hint}(allowed: {', '.join(keys)})"


def _describe_error(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    given = error.get("input")
    message = error["msg"]
    allowed = (error.get("ctx") or {}).get("expected")
    if error["type"] == "extra_forbidden":
        return _describe_unknown_key(location, [str(part) for part in error["loc"]])
    text = f"{location}: {message}"
    if allowed:
        text += f" (allowed: {allowed})"
    if given is not None and not isinstance(given, dict | list):
        text += f"; got {given!r}"
    return text


def parse_config(raw: dict[str, Any] | None, source: str = "<dict>") -> StudyConfig:
    """Validate a mapping; raises ``ConfigError`` listing every wrong key of ``source``."""
    try:
        return StudyConfig.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe_error(e)}" for e in exc.errors())
        raise ConfigError(f"{source} is not a valid study file:\n{lines}") from None


def load_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study YAML file. Relative ``data.path`` and ``output.dir`` are resolved against
    the file's folder. Raises ``ConfigError`` naming the file (missing, not YAML, or invalid keys)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"study file {file} does not exist; see examples/study.yaml for a template")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"{file} must hold a mapping of sections (data, models, train, ...), got {type(raw).__name__}"
        )
    if raw is not None:
        raw.pop("config_hash", None)  # written by dump_yaml into run/config.yaml; derived, not a setting
    config = parse_config(raw, str(file))
    base = file.resolve().parent
    if config.data.path is not None and not config.data.path.is_absolute():
        config.data.path = (base / config.data.path).resolve()
    if not config.output.dir.is_absolute():
        config.output.dir = (base / config.output.dir).resolve()
    return config


def resolved_dict(config: StudyConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (defaults filled in), the form written to run/config.yaml."""
    return config.model_dump(mode="json")


def study_hash(config: StudyConfig) -> str:
    """Hash of the resolved config without ``output`` (moving a run directory keeps its hash)."""
    resolved = resolved_dict(config)
    resolved.pop("output", None)
    return config_hash(resolved)


def dump_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML text, with its hash as the first key."""
    return yaml.safe_dump({"config_hash": study_hash(config), **resolved_dict(config)}, sort_keys=False)
