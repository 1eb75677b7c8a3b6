"""The training stages (ARCHITECTURE §4): stage 0 (source pretraining), stage 1 (frozen backbone, optionally
on cached features), stage 2 (full fine-tuning from stage 1's best), single process or torchrun DDP; the
loop itself is ``classifier.loop.fit``, the schedule ``classifier.schedule``.

Files of one model under ``run/models/{key}/``:

- ``stage{s}.safetensors`` + ``stage{s}.json``: the stage's best checkpoint, written when the stage is done;
  its sidecar's ``config_hash`` (the stage hash) marks the stage complete, so a rerun skips it.
- ``stage{s}.last.pt``: rolling resume state after each completed epoch (weights of the trained module,
  optimizer, RNG states, counters; tensors and plain types only, loaded with ``weights_only=True``).
- ``stage{s}.best.safetensors``: best weights so far (stage 1: the head's only);
  ``stage1.features.{train,val}.safetensors``: cached pooled features.
- ``metrics.jsonl``: one record per (stage, epoch).

Every epoch is a function of (stage seed, epoch): the data order (DistributedSampler), the augmentation
(``dataset.set_epoch``) and the RNG state saved with the weights. So a run killed at any moment and restarted
with the same command resumes from the last completed epoch and ends with the same weights (bit-identical on
CPU) as an uninterrupted run.

Divergence guard: an epoch whose train or validation loss is non-finite, or above
``divergence_factor`` × a reference: the train loss × this stage's first epoch's, the validation loss × the
starting checkpoint's when known (stage 2: stage 1's best epoch), else × the first epoch's)
stops the stage with ``TrainingDivergedError`` naming the stage, the epoch, the loss and the settings to
try; that epoch is logged to ``metrics.jsonl`` but neither its weights nor its resume state are written, so
the best weights and the resume state of the last good epoch are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn

from evidrift.classifier import models
from evidrift.classifier.checkpoint import read_checkpoint_meta, save_checkpoint
from evidrift.classifier.config import ClassifierStudy, HeadConfig, ModelConfig, StageConfig
from evidrift.classifier.feeds import Feed, ImageFeed, TensorFeed, predict_logits
from evidrift.classifier.freezing import (
    NOTHING_FROZEN,
    freeze_backbone,
    freeze_batchnorm_stats,
    unfreeze,
)
from evidrift.classifier.loop import FitOptions, OnStep, StageFiles, Trainee, TrainState, fit
from evidrift.classifier.precision import Precision, resolve_precision
from evidrift.classifier.weight_change import parameters_snapshot, stage_weight_change
from evidrift.core import distributed
from evidrift.core.distributed import Context
from evidrift.core.errors import DataError, MissingInputError, UsageError
from evidrift.core.io import config_hash, save_safetensors_atomic
from evidrift.core.paths import RunPaths

__all__ = ["train_stage", "train_study"]

logger = logging.getLogger(__name__)
STAGES = ("0", "1", "2")


def stage_seed(config: ClassifierStudy, key: str, stage: str) -> int:
    """Seed of one (model, stage), derived from the study seed."""
    return int(hashlib.sha256(f"{config.seed}/{key}/{stage}".encode()).hexdigest()[:8], 16)


def stage_config(config: ClassifierStudy, stage: str) -> StageConfig:
    return {"0": config.train.stage0, "1": config.train.stage1, "2": config.train.stage2}[stage]


def uses_stage0(model_cfg: ModelConfig) -> bool:
    """Stage 0 runs only without pretrained weights (ARCHITECTURE §4)."""
    return model_cfg.weights == "none"


def stage_hash(config: ClassifierStudy, model_cfg: ModelConfig, stage: str) -> str:
    """Hash of everything that determines a stage's weights: seed, data, the model (not its CAM layers), loss,
    determinism, the stage's optimisation settings, and the previous stage's hash."""
    if stage == "0":
        previous: str | None = None
    elif stage == "1":
        previous = (
            stage_hash(config, model_cfg, "0") if uses_stage0(model_cfg) else f"weights:{model_cfg.weights}"
        )
    else:
        previous = stage_hash(config, model_cfg, "1")
    model = model_cfg.model_dump(mode="json", exclude={"cam_layers"})
    return config_hash(
        {
            "seed": config.seed,
            "data": config.data.model_dump(mode="json"),
            "model": model,
            "loss": config.train.loss,
            "deterministic": config.train.deterministic,
            "precision": config.train.precision,
            "stage": stage,
            "stage_config": _stage_settings(stage_config(config, stage)),
            "previous": previous,
        }
    )


#: Stage settings added after runs existed, whose field defaults are the behaviour before: hashed only when
#: they differ from that default, so that older runs keep their hashes (unset, ``augment`` follows
#: ``data.augment``, which the hash covers).
_HASHED_WHEN_SET = ("augment", "feature_scale", "final_lr_ratio")


def _stage_settings(cfg: StageConfig) -> dict[str, Any]:
    """The stage's settings as hashed (``_HASHED_WHEN_SET`` only when off their field default)."""
    fields = StageConfig.model_fields
    unset = {key for key in _HASHED_WHEN_SET if getattr(cfg, key) == fields[key].default}
    return cfg.model_dump(mode="json", exclude=unset)


def image_size_for(model_cfg: ModelConfig, stage_cfg: StageConfig) -> int:
    """Input side in pixels: the stage's ``image_size``; else the model's side (its ``image_size``, else the
    architecture's default) times the stage's ``image_scale`` when set, rounded, at least 16."""
    if stage_cfg.image_size is not None:
        return stage_cfg.image_size
    side = model_cfg.image_size or models.default_input_size(model_cfg.arch)
    return max(16, round(side * stage_cfg.image_scale)) if stage_cfg.image_scale is not None else side


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled, warn_only=True)`` for the block, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# --- one stage of one model ---------------------------------------------------------------------------------
def _split(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    return frame[(frame["split"] == split) & (frame["status"] == "ok")].reset_index(drop=True)


def _load_data(
    config: ClassifierStudy, paths: RunPaths, stage: str, ctx: Context
) -> tuple[pd.DataFrame, list[str]]:
    """(manifest frame, classes) of the stage's data set; rank 0 prepares it, the others wait then read it."""
    from evidrift.data import sources

    if ctx.is_main:
        if stage == "0":
            sources.prepare_source_data(config, paths)
        elif not paths.manifest.exists():
            sources.prepare_data(config, paths)
    distributed.barrier(ctx)
    return sources.load_manifest(paths, source=stage == "0")


def _dataset(
    frame: pd.DataFrame,
    classes: list[str],
    size: int,
    config: ClassifierStudy,
    mean: Any,
    std: Any,
    augment: bool,
    seed: int,
) -> Any:
    from evidrift.data.dataset import ManifestDataset

    return ManifestDataset(
        frame, classes, size, resize=config.data.resize, mean=mean, std=std, augment=augment, seed=seed
    )


def stage_done(files: StageFiles, tag: str) -> bool:
    """True when the stage's final checkpoint exists, matches its sidecar and was trained with ``tag``."""
    try:
        meta = read_checkpoint_meta(files.final)
    except (FileNotFoundError, ValueError):
        return False
    return meta.config_hash == tag


def _cached_features(
    model: nn.Module, feed: Feed, ctx: Context, batch_size: int, path: Path, tag: str, precision: Precision
) -> TensorFeed:
    """Pooled backbone features [N, F] of ``feed`` (computed once, then read from ``path``); the feed's
    ``seconds`` is the time the backbone pass took."""
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("tag") == tag:
                seconds = float(metadata.get("seconds", "0"))
                return TensorFeed(handle.get_tensor("x"), handle.get_tensor("y"), seconds)
    started = time.perf_counter()
    model.eval()
    bf16 = precision.bf16
    labels, features = predict_logits(
        lambda x: models.pooled_features(model, x), feed, ctx, batch_size, autocast=bf16, channels_last=bf16
    )
    seconds = time.perf_counter() - started
    if ctx.is_main:
        save_safetensors_atomic(path, {"x": features, "y": labels}, {"tag": tag, "seconds": repr(seconds)})
    return TensorFeed(features, labels, seconds)


def train_stage(
    config: ClassifierStudy,
    paths: RunPaths,
    model_cfg: ModelConfig,
    stage: str,
    ctx: Context | None = None,
    progress: bool = True,
    on_step: OnStep | None = None,
) -> Path:
    """Run (or resume, or skip when done) one stage of one model; returns its final checkpoint path."""
    stage = str(stage)
    if stage not in STAGES:
        raise UsageError(f"stage must be one of {STAGES}, got {stage!r}")
    ctx = ctx or distributed.setup(config.train.device)
    key, cfg, loss = model_cfg.key, stage_config(config, stage), config.train.loss
    tag = stage_hash(config, model_cfg, stage)
    files = StageFiles.of(paths, key, stage)
    label = f"{key} stage {stage}"
    if stage_done(files, tag):
        logger.info("%s: done (config hash %s), skipped", label, tag)
        return files.final
    frame, classes = _load_data(config, paths, stage, ctx)
    size = image_size_for(model_cfg, cfg)
    mean, std = models.normalization(model_cfg.arch)
    seed = stage_seed(config, key, stage)

    start_losses: dict[str, Any] | None = None
    with determinism(config.train.deterministic and ctx.device.type == "cpu"):
        torch.manual_seed(seed)
        head = HeadConfig() if stage == "0" else model_cfg.head
        if stage == "0":
            model = models.build_model(model_cfg.arch, len(classes), head, "none")
        elif stage == "1":
            weights = (
                str(StageFiles.of(paths, key, "0").final) if uses_stage0(model_cfg) else model_cfg.weights
            )
            if uses_stage0(model_cfg) and not stage_done(
                StageFiles.of(paths, key, "0"), stage_hash(config, model_cfg, "0")
            ):
                raise MissingInputError(
                    f"{label} needs stage 0 of {key}; run `evidrift train --stage 0` first"
                )
            model = models.build_model(model_cfg.arch, len(classes), head, weights)
        else:
            previous = StageFiles.of(paths, key, "1")
            if not stage_done(previous, stage_hash(config, model_cfg, "1")):
                raise MissingInputError(
                    f"{label} needs stage 1 of {key}; run `evidrift train --stage 1` first"
                )
            model = models.build_model(model_cfg.arch, len(classes), head, "none")
            model.load_state_dict(load_file(str(previous.final)), strict=True)
            start_losses = read_checkpoint_meta(previous.final).metrics
        model.to(ctx.device)
        models.check_input_size(
            model, size, f"train.stage{stage}.image_size / image_scale or models[{model_cfg.key}].image_size"
        )
        precision = resolve_precision(config.train.precision, ctx.device)
        precision.prepare_model(model)
        start_params = parameters_snapshot(model)  # the stage's θ_start (resuming does not change it)
        freezing = NOTHING_FROZEN
        if stage == "1":
            freezing = freeze_backbone(model)
        if stage == "2" and cfg.freeze_batchnorm:
            freezing = freeze_batchnorm_stats(model)
        torch.manual_seed(seed + 1)

        cached = caches_features(cfg, stage)
        augment = (config.data.augment if cfg.augment is None else cfg.augment) and not cached
        pin = ctx.device.type == "cuda"
        workers = config.train.num_workers
        train_feed: Feed = ImageFeed(
            _dataset(_split(frame, "train"), classes, size, config, mean, std, augment, seed), workers, pin
        )
        val_feed: Feed = ImageFeed(
            _dataset(_split(frame, "val"), classes, size, config, mean, std, False, seed), workers, pin
        )
        if len(train_feed) == 0:
            raise DataError(
                f"{label}: the training split is empty; check data.split and the manifest {paths.manifest}"
            )

        extra: dict[str, Any] = {}
        if stage == "1":
            if cached:
                folder = files.final.parent
                train_path = folder / "stage1.features.train.safetensors"
                train_feed = _cached_features(
                    model, train_feed, ctx, cfg.batch_size, train_path, tag, precision
                )
                val_path = folder / "stage1.features.val.safetensors"
                val_feed = _cached_features(model, val_feed, ctx, cfg.batch_size, val_path, tag, precision)
                extra["feature_cache_seconds"] = train_feed.seconds + val_feed.seconds
                if ctx.is_main:
                    logger.info(
                        "%s: cached the features of %d train + %d val images in %.1f s", label,
                        len(train_feed), len(val_feed), extra["feature_cache_seconds"],
                    )  # fmt: skip
            if standardizes_features(cfg, stage):
                if isinstance(train_feed, TensorFeed):
                    features = train_feed.x
                else:  # one pass over the un-augmented training images
                    plain = _dataset(_split(frame, "train"), classes, size, config, mean, std, False, seed)
                    _, features = predict_logits(
                        lambda x: models.pooled_features(model, x), ImageFeed(plain, workers, pin), ctx,
                        cfg.batch_size, autocast=precision.bf16, channels_last=precision.bf16,
                    )  # fmt: skip
                shared = cfg.feature_scale != "per_feature"
                extra["standardized_features"] = standardize_head(model, features, shared=shared)
                extra["feature_scale"] = "shared" if shared else "per_feature"
            head_module = models.get_head(model)
            trainable = _ddp(head_module, ctx)
            forward_train: Callable[[torch.Tensor], torch.Tensor]
            if cached:
                forward_train, forward_eval = trainable, head_module
            else:

                def forward_train(x: torch.Tensor) -> torch.Tensor:
                    with torch.no_grad():
                        features = models.pooled_features(model, x)
                    return trainable(features)

                forward_eval = model
        else:
            trainable = _ddp(model, ctx)
            forward_train, forward_eval = trainable, model

        trainee = Trainee(model, trainable, forward_train, forward_eval)
        options = FitOptions(
            cfg, loss, tag, seed, freezing, label, stage, progress, on_step, start_losses, precision
        )
        state = fit(trainee, train_feed, val_feed, ctx, files, options)
        if ctx.is_main:
            meta = {"classes": classes, "image_size": size, "mean": list(mean), "std": list(std), **extra}
            _finalize(model, trainable, files, state, tag, stage, model_cfg, loss, head, meta, start_params)
        distributed.barrier(ctx)
    return files.final


def caches_features(cfg: StageConfig, stage: str) -> bool:
    """Whether the stage trains its head on cached pooled features (stage 1 unless turned off)."""
    return stage == "1" and cfg.cache_features is not False


def standardizes_features(cfg: StageConfig, stage: str) -> bool:
    """Whether the stage trains its head on standardized features (stage 1 unless turned off)."""
    return stage == "1" and cfg.standardize_features is not False


def standardize_head(model: nn.Module, features: torch.Tensor, shared: bool = False) -> str:
    """Replace the model's head by a ``StandardizedHead`` fitted on the training features [N, F]: centred
    and scaled, or only scaled when the head cannot absorb a shift (a bias-free linear head); ``shared``: one
    scale for all features (``models.feature_standardization``). Returns which (``"center+scale"`` or
    ``"scale"``), recorded in the checkpoint's sidecar."""
    net = models.unwrap(model)
    head = models.get_head(net)
    center = models.can_center(head)
    mean, scale = models.feature_standardization(features, center=center, shared=shared)
    device = next(head.parameters()).device
    net.set_submodule(models.head_name(net), models.StandardizedHead(head, mean.to(device), scale.to(device)))
    return "center+scale" if center else "scale"


def _ddp(module: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def _finalize(
    model: nn.Module, trainable: nn.Module, files: StageFiles, state: TrainState, tag: str, stage: str,
    model_cfg: ModelConfig, loss: str, head: HeadConfig, extra: dict[str, Any],
    start_params: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """Write the final checkpoint (best weights; sidecar with ``extra``: classes, image_size, mean, std...,
    and ``weight_change``: the relative change ‖θ_end − θ_start‖/‖θ_start‖ of all / backbone / head
    parameters since ``start_params``), then remove the stage's working files."""
    net = models.unwrap(model)
    if files.best.is_file():
        models.unwrap(trainable).load_state_dict(load_file(str(files.best)), strict=True)
    head_module = models.get_head(net)
    if isinstance(head_module, models.StandardizedHead):  # a plain head again, same function
        net.set_submodule(models.head_name(net), models.fold_standardization(head_module))
    unfreeze(net)
    net.eval()
    if start_params is not None:
        change = stage_weight_change(start_params, net, models.head_name(net))
        extra = {**extra, "weight_change": change}
        logger.info(
            "%s stage %s: relative weight change all %.4f, backbone %.4f, head %.4f",
            model_cfg.key, stage, change["all"], change["backbone"], change["head"],
        )  # fmt: skip
    meta = {
        "arch": model_cfg.arch,
        "key": model_cfg.key,
        "timm_name": models.resolve_arch(model_cfg.arch),
        "head": head.model_dump(mode="json"),
        "stage": int(stage),
        "epoch": state.best_epoch,
        "epochs_run": state.epoch + 1,
        "early_stopped": state.stopped,
        "metrics": state.best_metrics,
        "config_hash": tag,
        "loss": loss,
        "weights": model_cfg.weights,
        "cam_layers": models.resolve_cam_layers(net, model_cfg.arch, model_cfg.cam_layers),
        **extra,
    }
    save_checkpoint(files.final, net.cpu(), meta)
    for leftover in (files.best, files.last, *files.final.parent.glob(f"stage{stage}.features.*")):
        leftover.unlink(missing_ok=True)


# --- the whole protocol -------------------------------------------------------------------------------------
def train_study(
    config: ClassifierStudy,
    paths: RunPaths,
    arch: str | None = None,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
    on_step: OnStep | None = None,
    ctx: Context | None = None,
) -> dict[str, dict[str, Path]]:
    """Train the stages of every model of the study (or only the one whose key is ``arch``); stage 0 only
    for models without pretrained weights. Returns {model key: {stage: checkpoint path}}."""
    ctx = ctx or distributed.setup(config.train.device)
    chosen = [m for m in config.models if arch is None or m.key == arch]
    if not chosen:
        raise UsageError(f"--arch {arch!r} is not in the study's models {[m.key for m in config.models]}")
    done: dict[str, dict[str, Path]] = {}
    for model_cfg in chosen:
        done[model_cfg.key] = {}
        for stage in stages:
            if stage == "0" and not uses_stage0(model_cfg):
                continue
            done[model_cfg.key][stage] = train_stage(config, paths, model_cfg, stage, ctx, progress, on_step)
    return done
