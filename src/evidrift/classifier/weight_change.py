"""How far a training stage moved the weights: ‖θ_end − θ_start‖ / ‖θ_start‖ over parameter groups.

``relative_change(start, end)`` is the relative L2 distance between two state dicts over the parameter
names both hold with the same shape (floating-point tensors only; BatchNorm's running statistics and
counters are not parameters and are left out by passing only ``named_parameters``). ``stage_weight_change``
splits it into the backbone and the head of a timm classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn


def relative_change(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    include: Callable[[str], bool] = lambda name: True,
) -> float:
    """sqrt(Σ ‖end_k − start_k‖²) / sqrt(Σ ‖start_k‖²) over the names k in both mappings with equal shapes,
    floating-point dtype and ``include(k)`` (sums in float64). NaN when no tensor qualifies or the start's
    norm is 0."""
    moved = norm = 0.0
    used = 0
    for name, before in start.items():
        after = end.get(name)
        if (
            after is None
            or after.shape != before.shape
            or not before.is_floating_point()
            or not include(name)
        ):
            continue
        b, a = before.detach().double().cpu(), after.detach().double().cpu()
        moved += float(((a - b) ** 2).sum())
        norm += float((b**2).sum())
        used += 1
    return math.sqrt(moved) / math.sqrt(norm) if used and norm > 0 else math.nan


def parameters_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU float32 copy of every parameter of ``model`` by name (buffers left out)."""
    return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in model.named_parameters()}


def stage_weight_change(
    start: Mapping[str, torch.Tensor], model: nn.Module, head_prefix: str
) -> dict[str, float]:
    """Relative weight change of ``model`` since ``start`` (a ``parameters_snapshot``): ``all`` parameters,
    the ``backbone`` (names not under ``head_prefix``) and the ``head`` (names under it)."""
    end = parameters_snapshot(model)

    def in_head(name: str) -> bool:
        return name == head_prefix or name.startswith(head_prefix + ".")

    return {
        "all": relative_change(start, end),
        "backbone": relative_change(start, end, lambda n: not in_head(n)),
        "head": relative_change(start, end, in_head),
    }
