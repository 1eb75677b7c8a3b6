"""Explanation sanity checks by parameter randomization (Adebayo et al. 2018) and the metrics' self-test.

A faithful explanation depends on the model's parameters: re-initializing them must change the maps.
Two protocols, both over the model's *blocks* (timm's top-level children, with the big containers
``features`` / ``stages`` / ``blocks`` / ``layers`` split into their own children), listed from the head
down to the input (``randomization_blocks``):

- ``cascading``: step k re-initializes blocks 1..k (the head first, then deeper and deeper);
- ``independent``: step k re-initializes block k alone, every other block keeps its trained weights.

At every step the maps of the same images and target classes are compared with the original model's maps
(step 0, the unmodified model, so every curve starts at similarity 1): Spearman rank correlation of the
absolute maps and of the signed maps (the CAM before its final ReLU), SSIM, top-20% IoU, and the Spearman
correlation of HOG descriptors (``skimage.feature.hog``, ``hog_cell``-pixel cells, default block layout).

``self_test`` checks the drift metrics themselves: two identical checkpoints must give zero drift, a fully
randomized model a large one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

#: Containers whose children are randomized one by one (timm's stage lists).
SPLIT_CONTAINERS: tuple[str, ...] = ("features", "stages", "blocks", "layers")
#: Name of the pseudo-block holding parameters registered directly on the root module (ViT pos_embed...).
ROOT_BLOCK = "<root>"
SIMILARITY_METRICS: tuple[str, ...] = ("spearman_abs", "spearman_signed", "ssim", "topk_iou@0.2", "hog_spearman")

Mode = Literal["cascading", "independent"]


# --- blocks and re-initialization ----------------------------------------------------------------------------
def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomization_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's parameter-holding blocks, from the head down to the input.

    Top-level children in reverse definition order; a child named in ``SPLIT_CONTAINERS`` (densenet
    ``features``, resnetv2/convnext ``stages``, ViT ``blocks``) contributes its own children instead.
    Parameters registered on the root itself (ViT ``cls_token``, ``pos_embed``) form the last block ``<root>``.
    """
    blocks: list[str] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        grandchildren = [(f"{name}.{n}", c) for n, c in child.named_children() if _has_params(c)]
        if name in SPLIT_CONTAINERS and len(grandchildren) >= 2:
            blocks += [n for n, _ in grandchildren]
        else:
            blocks.append(name)
    blocks.reverse()
    if any(True for _ in model.parameters(recurse=False)):
        blocks.append(ROOT_BLOCK)
    return blocks


def _reinit_(module: nn.Module, recurse: bool = True) -> None:
    """Re-initialize every parameter of ``module`` with the framework's default initializers in place:
    ``reset_parameters()`` of each submodule that has one (BatchNorm running statistics reset too); any
    parameter not covered (layer scales, tokens, position embeddings) ~ N(0, 0.02²)."""
    covered: set[int] = set()
    modules = module.modules() if recurse else [module]
    for sub in modules:
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    params = module.parameters() if recurse else module.parameters(recurse=False)
    with torch.no_grad():
        for param in params:
            if id(param) not in covered:
                param.normal_(0.0, 0.02)


def randomize_blocks_(model: nn.Module, blocks: Sequence[str], seed: int) -> nn.Module:
    """Re-initialize the named blocks of ``model`` in place (seeded; the global RNG is left untouched).

    ``<root>`` re-initializes the parameters registered directly on the root module. Returns the model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in blocks:
            if name == ROOT_BLOCK:
                _reinit_(model, recurse=False)
            else:
                _reinit_(model.get_submodule(name))
    return model


# --- similarity of maps --------------------------------------------------------------------------------------
def hog_features(maps: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """HOG descriptors of min-max-normalized maps: [N, H, W] → [N, L] float32.

    ``skimage.feature.hog`` with ``cell`` × ``cell``-pixel cells, 9 orientations and 3 × 3-cell blocks (fewer
    when the map holds fewer cells). A constant map gives a zero descriptor.
    """
    from skimage.feature import hog

    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
    n_cells = min(maps.shape[-2], maps.shape[-1]) // cell
    if n_cells < 1:
        raise ValueError(f"maps of {tuple(maps.shape[-2:])} pixels hold no {cell}x{cell} HOG cell; lower hog_cell")
    per_block = min(3, n_cells)
    flat = maps.detach().double().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape).cpu().numpy()
    feats = [
        hog(m, pixels_per_cell=(cell, cell), cells_per_block=(per_block, per_block), feature_vector=True)
        for m in norm
    ]
    return torch.from_numpy(np.stack(feats).astype(np.float32))


def map_similarity(
    reference: torch.Tensor,
    current: torch.Tensor,
    reference_signed: torch.Tensor,
    current_signed: torch.Tensor,
    hog_cell: int = 16,
) -> dict[str, torch.Tensor]:
    """Similarity of each map to its reference, maps [N, H, W] at the same (analysis) size.

    Returns ``SIMILARITY_METRICS`` → [N] float32: ``spearman_abs`` (of |map|), ``spearman_signed`` (of the
    signed pre-ReLU maps), ``ssim``, ``topk_iou@0.2`` (each via ``evidrift.metrics.drift``) and
    ``hog_spearman`` (Spearman of ``hog_features``). 1 means identical; NaN marks a degenerate map.
    """
    from evidrift.metrics import drift

    ref_hog = hog_features(reference, hog_cell)
    cur_hog = hog_features(current, hog_cell)
    return {
        "spearman_abs": drift.spearman(reference.abs(), current.abs()),
        "spearman_signed": drift.spearman(reference_signed, current_signed),
        "ssim": drift.ssim(reference, current),
        "topk_iou@0.2": drift.topk_iou(reference, current, k=0.2),
        "hog_spearman": drift.spearman(ref_hog[:, None, :], cur_hog[:, None, :]),
    }
