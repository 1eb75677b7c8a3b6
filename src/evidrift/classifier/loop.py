"""The training loop: ``fit(trainee, train_feed, val_feed, ctx, files, options)`` — epochs of optimizer
steps with warm-up + cosine learning rate (``schedule``), validation after each epoch, the best weights kept,
early stopping, a divergence guard, and a resume state after every epoch (``StageFiles.last``), so a killed
stage resumes bit-for-bit. ``Trainee`` says what trains and how it is called, ``FitOptions`` how."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from evidrift.classifier import models
from evidrift.classifier.config import StageConfig
from evidrift.classifier.feeds import Feed, predict_logits, probabilities
from evidrift.classifier.freezing import (
    NOTHING_FROZEN,
    Freezing,
    set_train_mode,
)
from evidrift.classifier.precision import Precision, resolve_precision
from evidrift.classifier.schedule import compute_loss, improved, lr_at, make_optimizer
from evidrift.core import distributed
from evidrift.core.distributed import Context, all_reduce_sum, epoch_batches
from evidrift.core.errors import EvidriftError
from evidrift.core.io import atomic_path, read_jsonl, save_safetensors_atomic, write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.stats import classification_metrics

logger = logging.getLogger(__name__)
OnStep = Callable[[str, int], None]


class TrainingDivergedError(EvidriftError, RuntimeError):
    """A training stage whose loss became non-finite or exploded; the message names the stage, the epoch, the
    loss and the settings to try."""


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
            lr = lr_at(state.step, total_steps, warmup_steps, cfg.lr, cfg.final_lr_ratio)
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
            lr=lr_at(max(state.step - 1, 0), total_steps, warmup_steps, cfg.lr, cfg.final_lr_ratio),
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


def default_precision(device: torch.device) -> Precision:
    """The precision of a ``fit`` / ``validate`` call that names none: bf16 autocast on CUDA, fp32 elsewhere
    (what they did before ``train.precision``; a study's stages pass the configured one)."""
    return resolve_precision("bf16" if device.type == "cuda" else "fp32", device)


def full_batches(batches: list[list[int]], batch_size: int) -> list[list[int]]:
    """The batches of ``batch_size`` samples (a trailing partial batch dropped), or all of them when none is
    full (a split smaller than one batch)."""
    return [b for b in batches if len(b) == batch_size] or batches
