"""Predictions and classification figures: per-epoch validation metrics and the test-split evaluation.

``evaluate_study`` writes ``run/eval/{arch}.parquet`` (one row per test image: ``id``, ``label``,
``pred_stage{1,2}``, ``prob_stage{1,2}``) and ``run/eval/classification.csv`` (arch × stage: accuracy,
macro-F1, macro AUROC with percentile-bootstrap 95% CIs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from evidrift.classifier.feeds import Feed, ImageFeed, predict_logits, probabilities
from evidrift.core.distributed import Context
from evidrift.core.errors import DataError, UsageError
from evidrift.core.io import write_csv_atomic

if TYPE_CHECKING:
    from evidrift.classifier.config import ClassifierStudy
    from evidrift.core.paths import RunPaths


# --- test-split evaluation ----------------------------------------------------------------------------------
def summarize(y_true: np.ndarray, probs: np.ndarray, config: ClassifierStudy) -> dict[str, float]:
    """n, accuracy, macro_f1, macro_auroc and their ``_ci_low``/``_ci_high`` percentile-bootstrap bounds
    (``evidrift.stats.classification_summary`` with the study's ``stats`` settings)."""
    from evidrift.stats import classification_summary

    stats = config.stats
    return dict(classification_summary(y_true, probs, n_boot=stats.n_boot, ci=stats.ci, seed=stats.seed))


def accuracy_change(table: Mapping[str, Any]) -> dict[str, float | int]:
    """The paired stage 1 → stage 2 accuracy change on the same test images (``stats.mcnemar_exact``) from
    an evaluation table with ``label``, ``pred_stage1`` and ``pred_stage2`` [N]: n, accuracy_stage1,
    accuracy_stage2, change, only_stage1, only_stage2 (images right at that stage only), p_mcnemar."""
    from evidrift.stats import mcnemar_exact

    label = np.asarray(table["label"])
    test = mcnemar_exact(np.asarray(table["pred_stage1"]) == label, np.asarray(table["pred_stage2"]) == label)
    return {
        "n": test["n"],
        "accuracy_stage1": test["accuracy_a"],
        "accuracy_stage2": test["accuracy_b"],
        "change": test["change"],
        "only_stage1": test["only_a"],
        "only_stage2": test["only_b"],
        "p_mcnemar": test["p"],
    }


def evaluate_model(
    model: nn.Module, feed: Feed, ctx: Context, batch_size: int, loss: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64, probabilities [N, C] float32) of ``model`` in eval mode over ``feed``."""
    model.eval()
    cuda = ctx.device.type == "cuda"
    labels, logits = predict_logits(model, feed, ctx, batch_size, autocast=cuda, channels_last=cuda)
    return labels.numpy(), probabilities(logits, loss).numpy()


def _write_per_arch_csv(path: Path, table: pd.DataFrame, arch: str | None) -> pd.DataFrame:
    """Write ``table`` (rows with an ``arch`` column) to ``path``; when only ``arch`` was evaluated, the
    other architectures' rows already in the file are kept. Returns what was written."""
    if arch is not None and path.exists():
        previous = pd.read_csv(path)
        table = pd.concat([previous[previous["arch"] != arch], table], ignore_index=True)
    write_csv_atomic(path, table)
    return table


def evaluate_study(
    config: ClassifierStudy,
    paths: RunPaths,
    arch: str | None = None,
    ctx: Context | None = None,
    title: str = "test-split classification",
) -> pd.DataFrame:
    """Predict the test split with the stage-1 and stage-2 checkpoints of each model (or only ``arch``);
    writes ``eval/{arch}.parquet``, ``eval/classification.csv`` and ``eval/accuracy_change.csv`` (the
    paired stage 1 → stage 2 change per model, ``accuracy_change``), prints both (the table under ``title``);
    returns the classification table."""
    from rich.console import Console
    from rich.table import Table

    from evidrift.classifier.checkpoint import load_checkpoint
    from evidrift.core import distributed
    from evidrift.core.io import write_parquet_atomic
    from evidrift.data.dataset import ManifestDataset
    from evidrift.data.sources import load_manifest

    ctx = ctx or distributed.setup(config.train.device)
    frame, classes = load_manifest(paths)
    test = frame[(frame["split"] == "test") & (frame["status"] == "ok")].reset_index(drop=True)
    if test.empty:
        raise DataError(f"the manifest {paths.manifest} has no usable test image; raise data.split.test")
    model_cfgs = [m for m in config.models if arch is None or m.key == arch]
    if not model_cfgs:
        raise UsageError(f"--arch {arch!r} is not in the study's models {[m.key for m in config.models]}")
    rows: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    for model_cfg in model_cfgs:
        table: dict[str, Any] = {"id": test["id"].astype(str).tolist()}
        for stage in ("1", "2"):
            checkpoint = paths.checkpoint(model_cfg.key, stage)
            model, meta = load_checkpoint(checkpoint, map_location=ctx.device)
            size, mean, std = meta.preprocessing(checkpoint)
            dataset = ManifestDataset(test, classes, size, resize=config.data.resize, mean=mean, std=std)
            labels, probs = evaluate_model(
                model, ImageFeed(dataset), ctx, config.train.stage2.batch_size, meta.loss
            )
            table["label"] = labels.astype(np.int64)
            table[f"pred_stage{stage}"] = probs.argmax(axis=1).astype(np.int64)
            table[f"prob_stage{stage}"] = [row.astype(np.float64).tolist() for row in probs]
            moved = meta.weight_change
            rows.append(
                {
                    "arch": model_cfg.key,
                    "stage": int(stage),
                    **summarize(labels, probs, config),
                    "weight_change_backbone": float(moved.get("backbone", float("nan"))),
                    "weight_change_head": float(moved.get("head", float("nan"))),
                }
            )
        changes.append({"arch": model_cfg.key, **accuracy_change(table)})
        if ctx.is_main:
            columns = ["id", "label", "pred_stage1", "pred_stage2", "prob_stage1", "prob_stage2"]
            write_parquet_atomic(paths.eval_table(model_cfg.key), pd.DataFrame(table)[columns])
    summary = pd.DataFrame(rows)
    if ctx.is_main:
        summary = _write_per_arch_csv(paths.classification, summary, arch)
        change_table = _write_per_arch_csv(paths.accuracy_change, pd.DataFrame(changes), arch)
        rich_table = Table(title=f"{title} ({len(test)} images, 95% bootstrap CI)")
        for column in ("arch", "stage", "accuracy", "macro-F1", "macro AUROC", "Δθ backbone", "Δθ head"):
            rich_table.add_column(column, justify="left" if column == "arch" else "right")
        for _, row in summary.iterrows():
            cells = [
                f"{row[m]:.3f} [{row[f'{m}_ci_low']:.3f}, {row[f'{m}_ci_high']:.3f}]"
                for m in ("accuracy", "macro_f1", "macro_auroc")
            ]
            parts = ("backbone", "head")
            shifts = [f"{row.get(f'weight_change_{part}', float('nan')):.4f}" for part in parts]
            rich_table.add_row(str(row["arch"]), str(row["stage"]), *cells, *shifts)
        console = Console()
        console = console if console.is_terminal else Console(width=120)  # a log keeps whole rows
        console.print(rich_table)
        for _, row in change_table.iterrows():
            console.print(
                f"{row['arch']}: accuracy {row['accuracy_stage1']:.3f} → {row['accuracy_stage2']:.3f} "
                f"({row['change']:+.3f}; right only at stage 1: {row['only_stage1']}, only at stage 2: "
                f"{row['only_stage2']}; exact McNemar p = {row['p_mcnemar']:.3g})"
            )
    distributed.barrier(ctx)
    return summary
