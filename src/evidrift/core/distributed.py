"""Single-process and torchrun (DDP) execution context: devices, ranks, barriers, gathers, sharded batches.

Under ``torchrun --nproc-per-node N`` the environment carries ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
``setup(device)`` then joins the process group (NCCL on CUDA, gloo on CPU). Without it everything here is a
no-op over a world of one, so the training code has a single path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from evidrift.core.errors import UsageError


@dataclass(frozen=True)
class Context:
    """Where this process runs: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:{local_rank}`` when CUDA is available else ``cpu``; otherwise the named device.

    Raises ValueError when CUDA is asked for but not available.
    """
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"train.device is {preference!r} but CUDA is not available; use `auto` or `cpu`")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(preference: str = "auto") -> Context:
    """The context of this process; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(ctx: Context) -> None:
    """Wait for every process (no-op in a world of one)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Element-wise sum over processes of a float64 tensor (returned on CPU)."""
    values = values.to(torch.float64)
    if not ctx.distributed:
        return values
    buffer = values.to(ctx.device)
    dist.all_reduce(buffer)
    return buffer.cpu()


def all_gather_cat(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every process in rank order (equal shapes required); on CPU."""
    if not ctx.distributed:
        return tensor.cpu()
    local = tensor.contiguous().to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return torch.cat([p.cpu() for p in parts], dim=0)


def epoch_batches(
    n: int, batch_size: int, ctx: Context, seed: int, epoch: int, shuffle: bool, train: bool
) -> list[list[int]]:
    """This process's batches of dataset indices for one epoch.

    The order is a function of (seed, epoch) only (``DistributedSampler``: every process draws the same
    permutation, padded to a multiple of the world size, and takes its share). For training, a trailing batch
    of one sample is dropped (BatchNorm cannot train on it) unless it is the only batch.
    """
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]  # torch types it Dataset, but the sampler only calls len() on it
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if train and len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def cleanup(ctx: Context) -> None:
    """Leave the process group if this module joined one."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
