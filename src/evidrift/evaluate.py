"""Predictions and classification figures: per-epoch validation metrics and the test-split evaluation.

``evaluate_study`` writes ``run/eval/{arch}.parquet`` (one row per test image: ``id``, ``label``,
``pred_stage{1,2}``, ``prob_stage{1,2}``) and ``run/eval/classification.csv`` (arch × stage: accuracy,
macro-F1, macro AUROC with percentile-bootstrap 95% CIs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evidrift.artifacts import write_csv_atomic
from evidrift.distributed import Context, all_gather_cat, epoch_batches

if TYPE_CHECKING:
    from evidrift.artifacts import RunPaths
    from evidrift.config import StudyConfig

Batch = tuple[torch.Tensor, torch.Tensor]


class Feed(Protocol):
    """Indexed inputs and labels: ``len(feed)`` samples, ``feed.iterate(batches, epoch)`` yields (x, y)."""

    def __len__(self) -> int: ...

    def iterate(self, batches: Sequence[Sequence[int]], epoch: int) -> Iterator[Batch]: ...


class TensorFeed:
    """Pre-computed inputs ``x`` [N, ...] (e.g. cached pooled features [N, F] float32), labels ``y`` [N]."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seconds: float = 0.0) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs for {len(y)} labels")
        self.x, self.y, self.seconds = x, y.long(), seconds

    def __len__(self) -> int:
        return len(self.x)

    def iterate(self, batches: Sequence[Sequence[int]], epoch: int) -> Iterator[Batch]:
        for batch in batches:
            index = torch.as_tensor(batch, dtype=torch.long)
            yield self.x[index], self.y[index]


class ImageFeed:
    """A dataset of dicts (``image`` [3, S, S] float32, ``label`` int; optional ``set_epoch(epoch)`` for
    seeded augmentation) read through a DataLoader with ``num_workers`` processes."""

    def __init__(self, dataset: Dataset, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def iterate(self, batches: Sequence[Sequence[int]], epoch: int) -> Iterator[Batch]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        for item in loader:
            yield item["image"], torch.as_tensor(item["label"]).long()


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class scores in [0, 1] from logits [N, C]: softmax for ``ce``, per-class sigmoid for ``bce``."""
    logits = logits.float()
    return torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=1)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """labels [N] int in [0, C), probs [N, C] → accuracy, macro_f1, auroc (list of C one-vs-rest AUROCs, NaN
    for a class without positives or negatives) and macro_auroc (mean of the defined ones; NaN if none)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    aurocs = []
    for c in range(n_classes):
        positives = labels == c
        if positives.all() or not positives.any():
            aurocs.append(float("nan"))
        else:
            aurocs.append(float(roc_auc_score(positives, probs[:, c])))
    defined = [a for a in aurocs if not np.isnan(a)]
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "macro_f1": float(
            f1_score(labels, preds, average="macro", labels=list(range(n_classes)), zero_division=0)
        ),
        "auroc": aurocs,
        "macro_auroc": float(np.mean(defined)) if defined else float("nan"),
    }


@torch.no_grad()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    feed: Feed,
    ctx: Context,
    batch_size: int,
    autocast: bool = False,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every sample of ``feed``, sharded over processes and gathered: (labels [N] int64,
    logits [N, C] float32) in dataset order, identical on every process."""
    if len(feed) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    batches = epoch_batches(len(feed), batch_size, ctx, seed=0, epoch=0, shuffle=False, train=False)
    order = torch.as_tensor([i for b in batches for i in b], dtype=torch.long)
    labels, outputs = [], []
    for x, y in feed.iterate(batches, 0):
        x = x.to(ctx.device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs.append(forward(x).float().cpu())
        labels.append(y.cpu())
    logits = all_gather_cat(torch.cat(outputs), ctx)
    labels_all = all_gather_cat(torch.cat(labels), ctx)
    order_all = all_gather_cat(order, ctx)
    result_logits = torch.empty(len(feed), logits.shape[1])
    result_labels = torch.empty(len(feed), dtype=torch.long)
    result_logits[order_all] = logits  # padded duplicates write the same values
    result_labels[order_all] = labels_all
    return result_labels, result_logits


# --- test-split evaluation ----------------------------------------------------------------------------------
def summarize(y_true: np.ndarray, probs: np.ndarray, config: StudyConfig) -> dict[str, float]:
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
    config: StudyConfig,
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

    from evidrift import distributed
    from evidrift.artifacts import write_parquet_atomic
    from evidrift.data.dataset import ManifestDataset
    from evidrift.data.sources import load_manifest
    from evidrift.models import load_checkpoint

    ctx = ctx or distributed.setup(config.train.device)
    frame, classes = load_manifest(paths)
    test = frame[(frame["split"] == "test") & (frame["status"] == "ok")].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"the manifest {paths.manifest} has no usable test image; raise data.split.test")
    model_cfgs = [m for m in config.models if arch is None or m.key == arch]
    if not model_cfgs:
        raise ValueError(f"--arch {arch!r} is not in the study's models {[m.key for m in config.models]}")
    rows: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    for model_cfg in model_cfgs:
        table: dict[str, Any] = {"id": test["id"].astype(str).tolist()}
        for stage in ("1", "2"):
            model, meta = load_checkpoint(paths.checkpoint(model_cfg.key, stage), map_location=ctx.device)
            dataset = ManifestDataset(
                test,
                classes,
                int(meta["image_size"]),
                resize=config.data.resize,
                mean=meta["mean"],
                std=meta["std"],
            )
            labels, probs = evaluate_model(
                model, ImageFeed(dataset), ctx, config.train.stage2.batch_size, meta["loss"]
            )
            table["label"] = labels.astype(np.int64)
            table[f"pred_stage{stage}"] = probs.argmax(axis=1).astype(np.int64)
            table[f"prob_stage{stage}"] = [row.astype(np.float64).tolist() for row in probs]
            moved = meta.get("weight_change") or {}
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
        summary = _write_per_arch_csv(paths.eval_table("classification").with_suffix(".csv"), summary, arch)
        change_table = _write_per_arch_csv(
            paths.eval_table("accuracy_change").with_suffix(".csv"), pd.DataFrame(changes), arch
        )
        rich_table = Table(title=f"{title} ({len(test)} images, 95% bootstrap CI)")
        for column in ("arch", "stage", "accuracy", "macro-F1", "macro AUROC", "Δθ backbone", "Δθ head"):
            rich_table.add_column(column, justify="left" if column == "arch" else "right")
        for _, row in summary.iterrows():
            cells = [
                f"{row[m]:.3f} [{row[f'{m}_ci_low']:.3f}, {row[f'{m}_ci_high']:.3f}]"
                for m in ("accuracy", "macro_f1", "macro_auroc")
            ]
            moved = [f"{row.get(f'weight_change_{part}', float('nan')):.4f}" for part in ("backbone", "head")]
            rich_table.add_row(str(row["arch"]), str(row["stage"]), *cells, *moved)
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
