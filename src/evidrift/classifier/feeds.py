"""Feeds: what the training loop and the evaluation iterate over — ``ImageFeed`` (a dataset of images, loaded
in the given batches) and ``TensorFeed`` (cached backbone features) — plus ``predict_logits`` over a feed and
``probabilities`` (softmax for ``ce``, sigmoid for ``bce``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from evidrift.core.distributed import Context, all_gather_cat, epoch_batches

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
            self.dataset,
            batch_sampler=[list(batch) for batch in batches],  # DataLoader's type wants lists of indices
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for item in loader:
            yield item["image"], torch.as_tensor(item["label"]).long()


def probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Class scores in [0, 1] from logits [N, C]: softmax for ``ce``, per-class sigmoid for ``bce``."""
    logits = logits.float()
    return torch.sigmoid(logits) if loss == "bce" else torch.softmax(logits, dim=1)


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
