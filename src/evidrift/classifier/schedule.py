"""The optimization schedule of a training stage: the learning rate per step (linear warm-up, then cosine to
``min_ratio``), the optimizer (AdamW or SGD), the loss (``ce``, or ``bce`` with uniform off-labels) and the
early-stopping comparison."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evidrift.classifier.config import StageConfig
from evidrift.core.errors import UsageError


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


def make_optimizer(params: Sequence[nn.Parameter], cfg: StageConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
