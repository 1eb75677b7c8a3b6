"""The training protocol (ARCHITECTURE §4): stage 0 (source pretraining), stage 1 (frozen backbone,
optionally on cached features), stage 2 (full fine-tuning from stage 1's best), single process or torchrun
DDP.

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
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from evidrift.classifier import models
from evidrift.classifier.checkpoint import read_checkpoint_meta, save_checkpoint
from evidrift.classifier.config import ClassifierStudy, HeadConfig, ModelConfig, StageConfig
from evidrift.classifier.feeds import Feed, ImageFeed, TensorFeed, predict_logits, probabilities
from evidrift.classifier.freezing import (
    NOTHING_FROZEN,
    Freezing,
    freeze_backbone,
    freeze_batchnorm_stats,
    set_train_mode,
    unfreeze,
)
from evidrift.classifier.precision import Precision, resolve_precision
from evidrift.classifier.weight_change import parameters_snapshot, stage_weight_change
from evidrift.core import distributed
from evidrift.core.distributed import Context, all_reduce_sum, epoch_batches
from evidrift.core.errors import DataError, EvidriftError, MissingInputError, UsageError
from evidrift.core.io import atomic_path, config_hash, read_jsonl, save_safetensors_atomic, write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.stats import classification_metrics

__all__ = ["FitOptions", "Trainee", "TrainingDivergedError", "fit", "train_stage", "train_study"]

logger = logging.getLogger("evidrift.classifier.training")
STAGES = ("0", "1", "2")
OnStep = Callable[[str, int], None]


class TrainingDivergedError(EvidriftError, RuntimeError):
    """A training stage whose loss became non-finite or exploded; the message names the stage, the epoch, the
    loss and the settings to try."""


# --- pure pieces --------------------------------------------------------------------------------------------
def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.01) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up from base_lr/warmup_steps to base_lr
    over ``warmup_steps`` steps, then cosine decay to ``min_ratio · base_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of logits [B, C] for labels [B] int: ``ce`` cross-entropy; ``bce`` binary cross-entropy on
    every logit with uniform off-labels, targets = max(onehot, 1/C)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    if loss == "bce":
        n_classes = logits.shape[1]
        targets = F.one_hot(labels, n_classes).float().clamp_min(1.0 / n_classes)
        return F.binary_cross_entropy_with_logits(logits, targets)
    raise UsageError(f"train.loss must be 'ce' or 'bce', got {loss!r}")


def improved(value: float, best: float | None, monitor: str) -> bool:
    """True when ``value`` beats ``best`` (lower for ``val_loss``, else higher; NaN never beats a value)."""
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value < best if monitor == "val_loss" else value > best


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
            "stage_config": stage_config(config, stage).model_dump(mode="json"),
            "previous": previous,
        }
    )


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


# --- state of a stage ---------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Counters of a stage in progress: last completed ``epoch`` (-1 before the first), optimizer ``step``,
    best monitored value and its epoch, epochs without improvement, whether early stopping fired."""

    epoch: int = -1
    step: int = 0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    best_metrics: dict[str, Any] = field(default_factory=dict)
    first_train_loss: float | None = None
    first_val_loss: float | None = None


@dataclass
class StageFiles:
    final: Path
    last: Path
    best: Path
    metrics: Path

    @classmethod
    def of(cls, paths: RunPaths, key: str, stage: str) -> StageFiles:
        final = paths.checkpoint(key, stage)
        return cls(
            final=final,
            last=final.with_name(f"stage{stage}.last.pt"),
            best=final.with_name(f"stage{stage}.best.safetensors"),
            metrics=paths.train_metrics(key),
        )


def save_resume_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, tag: str
) -> None:
    """Atomically write the resume file: weights, optimizer state, RNG states, counters and the stage hash."""
    payload = {
        "tag": tag,
        "state": json.dumps(asdict(state)),
        "model": {k: v.detach().cpu() for k, v in models.unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_resume_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tag: str
) -> TrainState | None:
    """Restore weights, optimizer and RNG from the resume file when it exists with the same ``tag`` (stage
    hash); returns its counters, or None (nothing restored) otherwise."""
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("tag") != tag:
        logger.info("ignoring %s: written for another configuration", path)
        return None
    models.unwrap(model).load_state_dict(payload["model"], strict=True)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return TrainState(**json.loads(payload["state"]))


def log_epoch(path: Path, record: dict[str, Any]) -> None:
    """Append one epoch record to metrics.jsonl, replacing an earlier record of the same (stage, epoch, hash)
    (written by a run killed before its resume file)."""
    same = ("stage", "epoch", "config_hash")
    kept = [r for r in read_jsonl(path) if any(r.get(k) != record[k] for k in same)]
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in [*kept, record])
    write_text_atomic(path, text)


def make_optimizer(params: Sequence[nn.Parameter], cfg: StageConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# --- the epoch loop -----------------------------------------------------------------------------------------
def divergence(
    record: dict[str, Any],
    state: TrainState,
    factor: float | None,
    start: dict[str, Any] | None = None,
) -> str | None:
    """Why the epoch of ``record`` diverged, or None: a non-finite ``train_loss`` / ``val_loss`` (an empty
    validation split's NaN is not one), or, with ``factor``, a train loss above ``factor`` × this stage's
    first epoch's (in ``state``), or a val loss above ``factor`` × the val loss of ``start`` (the checkpoint
    the stage started from, when known: stage 1's for stage 2), else × the first epoch's."""
    train_loss, val_loss = float(record["train_loss"]), float(record["val_loss"])
    has_val = not (math.isnan(val_loss) and not record.get("val_auroc"))
    if not math.isfinite(train_loss):
        return f"train_loss is {train_loss}"
    if has_val and not math.isfinite(val_loss):
        return f"val_loss is {val_loss}"
    if factor is None:
        return None
    # The validation loss is measured on the same images in eval mode before and after the stage starts, so
    # every epoch's is compared with the starting checkpoint's when it is known (stage 2: stage 1's best
    # epoch), else with this stage's first epoch. The train loss is compared within the stage only: the
    # starting checkpoint's came from other inputs (stage 1: cached, unaugmented features, and the best,
    # often overfit, epoch): the demo's inceptionv3 went from stage 1's 0.50 to 10.9 in its first stage-2
    # epoch while its val_loss went 1.67 → 2.09, a healthy epoch.
    start_val = (start or {}).get("val_loss")
    usable_start = isinstance(start_val, int | float) and math.isfinite(start_val) and start_val > 0
    checks = (
        ("train_loss", train_loss, state.first_train_loss, "the first epoch's"),
        (
            "val_loss",
            val_loss if has_val else math.nan,
            start_val if usable_start else state.first_val_loss,
            "the starting checkpoint's" if usable_start else "the first epoch's",
        ),
    )
    for name, value, reference, whose in checks:
        if isinstance(reference, int | float) and math.isfinite(reference) and reference > 0:
            if value > factor * reference:
                return (
                    f"{name} {value:.4g} is {value / reference:.1f}x {whose} {reference:.4g} "
                    f"(divergence_factor {factor:g})"
                )
    return None


def _divergence_message(
    label: str, stage: str, epoch: int, why: str, cfg: StageConfig, files: StageFiles
) -> str:
    key = f"train.stage{stage}" if stage else "the stage's settings"
    tries = [f"a lower {key}.lr (now {cfg.lr:g}; try {cfg.lr / 10:g})"]
    if stage == "2" and not cfg.freeze_batchnorm:
        tries.append(f"{key}.freeze_batchnorm: true (BatchNorm keeps stage 1's statistics)")
    tries.append(
        f"{key}.grad_clip: 1.0"
        if cfg.grad_clip is None or cfg.grad_clip > 1.0
        else f"a longer {key}.warmup_epochs"
    )
    tries.append(
        f"or, if this growth is expected, a larger {key}.divergence_factor (null turns the check off)"
    )
    folder = files.final.parent
    kept = (
        f"the last good epoch's weights are kept in {folder} ({files.best.name}, resume state "
        f"{files.last.name})"
        if epoch > 0
        else f"nothing of it was written; the checkpoints it started from in {folder} are kept"
    )
    return (
        f"{label} diverged at epoch {epoch + 1}: {why}. The stage was stopped: {kept}. "
        f"Try {', '.join(tries)}, then rerun."
    )


@dataclass(frozen=True)
class Trainee:
    """What ``fit`` trains: ``model`` (the whole network, for validation and mode switches), ``trainable``
    (the module whose parameters train and whose state is saved: the whole model in stages 0 and 2, the
    head in stage 1; DDP-wrapped under torchrun), and the two forwards (train batches → logits, validation
    batches → logits; in stage 1 with cached features both take feature vectors)."""

    model: nn.Module
    trainable: nn.Module
    forward_train: Callable[[torch.Tensor], torch.Tensor]
    forward_eval: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FitOptions:
    """How ``fit`` trains: the stage's settings (``cfg``), the loss (``ce``/``bce``), the checkpoint tag (the
    stage hash: a resume state of another tag is ignored), the seed of the batch order, what is frozen,
    ``label``/``stage`` for logs and metrics, progress bars, ``on_step(label, step)`` after every optimizer
    step, ``start_losses`` (the losses of the checkpoint the stage starts from, for ``divergence``) and
    ``precision`` (how the steps and the validation compute; default: ``default_precision``)."""

    cfg: StageConfig
    loss: str
    tag: str
    seed: int
    freezing: Freezing = NOTHING_FROZEN
    label: str = ""
    stage: str = ""
    progress: bool = True
    on_step: OnStep | None = None
    start_losses: Mapping[str, Any] | None = None
    precision: Precision | None = None


def fit(
    trainee: Trainee, train_feed: Feed, val_feed: Feed, ctx: Context, files: StageFiles, options: FitOptions
) -> TrainState:
    """Train ``trainee.trainable``'s parameters that require grad for ``cfg.epochs`` epochs (resuming from
    ``files.last`` when it carries ``options.tag``), validating after each epoch, keeping the best weights of
    ``trainable`` (by ``cfg.monitor``) in ``files.best``; early stopping after ``cfg.patience`` epochs without
    improvement. Only ``trainable``'s state is saved (the frozen backbone of stage 1 never changes). Only full
    batches train (a trailing partial batch is dropped: a new batch shape re-plans the kernels). Returns the
    final counters. Raises ``TrainingDivergedError`` (see ``divergence``) with the last good epoch's files
    kept."""
    model, trainable, forward_train, forward_eval = (
        trainee.model, trainee.trainable, trainee.forward_train, trainee.forward_eval
    )  # fmt: skip
    cfg, loss, tag, seed, label, stage = (
        options.cfg, options.loss, options.tag, options.seed, options.label, options.stage
    )  # fmt: skip
    progress, on_step = options.progress, options.on_step
    precision = options.precision or default_precision(ctx.device)
    # The freezing concerns the whole network; when only the head trains (stage 1) it switches the head alone.
    whole_model_freezing = (
        options.freezing if models.unwrap(trainable) is models.unwrap(model) else NOTHING_FROZEN
    )
    start_losses = dict(options.start_losses) if options.start_losses is not None else None
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    state = load_resume_state(files.last, trainable, optimizer, tag) or TrainState()
    if state.epoch >= 0:
        logger.info("%s: resuming after epoch %d", label, state.epoch + 1)
    batches0 = full_batches(
        epoch_batches(len(train_feed), cfg.batch_size, ctx, seed, 0, shuffle=True, train=True), cfg.batch_size
    )
    steps_per_epoch = min(len(batches0), cfg.max_steps_per_epoch or len(batches0))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.stopped:
            break
        started = time.perf_counter()
        batches = epoch_batches(len(train_feed), cfg.batch_size, ctx, seed, epoch, shuffle=True, train=True)
        batches = full_batches(batches, cfg.batch_size)[:steps_per_epoch]
        set_train_mode(trainable, True, whole_model_freezing)
        n_images = sum(len(b) for b in batches) * ctx.world_size
        bar = tqdm(
            total=n_images, unit="img", desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", leave=False,
            disable=not (progress and ctx.is_main), dynamic_ncols=True,
        )  # fmt: skip
        totals = torch.zeros(2, dtype=torch.float64)
        for x, y in train_feed.iterate(batches, epoch):
            lr = lr_at(state.step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            x = precision.prepare_input(x)
            with precision.autocast():
                batch_loss = compute_loss(forward_train(x), y, loss)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            state.step += 1
            totals += torch.tensor([batch_loss.item() * len(y), len(y)], dtype=torch.float64)
            bar.update(len(y) * ctx.world_size)
            if on_step is not None:
                on_step(label, state.step)
        bar.close()
        train_seconds = time.perf_counter() - started
        loss_sum, count = all_reduce_sum(totals, ctx).tolist()
        record = validate(forward_eval, model, val_feed, cfg, loss, ctx, options.freezing, precision)
        record.update(
            train_loss=loss_sum / max(count, 1),
            lr=lr_at(max(state.step - 1, 0), total_steps, warmup_steps, cfg.lr),
            images_per_s=count / max(train_seconds, 1e-9),
            seconds=time.perf_counter() - started,
        )
        why = divergence(record, state, cfg.divergence_factor, start_losses)
        if why is not None:
            if ctx.is_main:
                log_epoch(
                    files.metrics,
                    {"stage": stage, "epoch": epoch, "config_hash": tag, "diverged": why, **record},
                )
            raise TrainingDivergedError(_divergence_message(label, stage, epoch, why, cfg, files))
        if state.first_train_loss is None:
            state.first_train_loss = float(record["train_loss"])
            if math.isfinite(float(record["val_loss"])):
                state.first_val_loss = float(record["val_loss"])
        value = float(record[cfg.monitor])
        if len(val_feed) == 0 or improved(value, state.best, cfg.monitor):  # no val split: keep the last
            state.best, state.best_epoch, state.bad_epochs = value, epoch, 0
            state.best_metrics = dict(record)
            if ctx.is_main:
                state_dict = models.unwrap(trainable).state_dict()
                save_safetensors_atomic(files.best, state_dict, {"epoch": str(epoch), "tag": tag})
        else:
            state.bad_epochs += 1
            state.stopped = cfg.patience is not None and state.bad_epochs >= cfg.patience
        state.epoch = epoch
        if ctx.is_main:
            log_epoch(files.metrics, {"stage": stage, "epoch": epoch, "config_hash": tag, **record})
            save_resume_state(files.last, trainable, optimizer, state, tag)
            _log_line(label, epoch, cfg.epochs, record, state.stopped)
        distributed.barrier(ctx)
    return state


def _log_line(label: str, epoch: int, epochs: int, record: dict[str, Any], stopped: bool) -> None:
    """The one log line of an epoch."""
    logger.info(
        "%s epoch %d/%d  train_loss %.4f  val_loss %.4f  acc %.3f  macro-F1 %.3f  AUROC %.3f  lr %.2e  "
        "%.0f img/s%s", label, epoch + 1, epochs, record["train_loss"], record["val_loss"],
        record["val_accuracy"], record["val_macro_f1"], record["val_macro_auroc"], record["lr"],
        record["images_per_s"], "  (early stop)" if stopped else "",
    )  # fmt: skip


def validate(
    forward_eval: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    val_feed: Feed,
    cfg: StageConfig,
    loss: str,
    ctx: Context,
    freezing: Freezing = NOTHING_FROZEN,
    precision: Precision | None = None,
) -> dict[str, Any]:
    """val_loss, val_accuracy, val_macro_f1, val_auroc (per class), val_macro_auroc over ``val_feed`` (NaN
    figures when it is empty), computed with ``precision`` (default: ``default_precision``). The model's
    modes are restored afterwards, honouring ``freezing``."""
    if len(val_feed) == 0:
        nan = float("nan")
        return {
            "val_loss": nan,
            "val_accuracy": nan,
            "val_macro_f1": nan,
            "val_auroc": [],
            "val_macro_auroc": nan,
        }
    was_training = model.training
    model.eval()
    precision = precision or default_precision(ctx.device)
    labels, logits = predict_logits(
        forward_eval, val_feed, ctx, cfg.batch_size, autocast=precision.bf16, channels_last=precision.bf16
    )
    set_train_mode(model, was_training, freezing)
    metrics = classification_metrics(labels.numpy(), probabilities(logits, loss).numpy())
    return {
        "val_loss": float(compute_loss(logits, labels, loss)),
        "val_accuracy": metrics["accuracy"],
        "val_macro_f1": metrics["macro_f1"],
        "val_auroc": metrics["auroc"],
        "val_macro_auroc": metrics["macro_auroc"],
    }


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
        augment = config.data.augment and not cached
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
                extra["standardized_features"] = standardize_head(model, features)
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


def default_precision(device: torch.device) -> Precision:
    """The precision of a ``fit`` / ``validate`` call that names none: bf16 autocast on CUDA, fp32 elsewhere
    (what they did before ``train.precision``; a study's stages pass the configured one)."""
    return resolve_precision("bf16" if device.type == "cuda" else "fp32", device)


def full_batches(batches: list[list[int]], batch_size: int) -> list[list[int]]:
    """The batches of ``batch_size`` samples (a trailing partial batch dropped), or all of them when none is
    full (a split smaller than one batch)."""
    return [b for b in batches if len(b) == batch_size] or batches


def caches_features(cfg: StageConfig, stage: str) -> bool:
    """Whether the stage trains its head on cached pooled features (stage 1 unless turned off)."""
    return stage == "1" and cfg.cache_features is not False


def standardizes_features(cfg: StageConfig, stage: str) -> bool:
    """Whether the stage trains its head on standardized features (stage 1 unless turned off)."""
    return stage == "1" and cfg.standardize_features is not False


def standardize_head(model: nn.Module, features: torch.Tensor) -> str:
    """Replace the model's head by a ``StandardizedHead`` fitted on the training features [N, F]: centred
    and scaled, or only scaled when the head cannot absorb a shift (a bias-free linear head). Returns which
    (``"center+scale"`` or ``"scale"``), recorded in the checkpoint's sidecar."""
    net = models.unwrap(model)
    head = models.get_head(net)
    center = models.can_center(head)
    mean, scale = models.feature_standardization(features, center=center)
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
