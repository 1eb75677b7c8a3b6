"""Gates: do the attention maps mean anything? (ARCHITECTURE §11). One row per gate and model: gates.csv.

- ``marker``: on test images with a planted marker, the pointing game of the ``marker`` word's map at the
  marker square. Chance = the marker's share of the image (a uniformly random argmax). Passes when the
  CI's lower bound exceeds ``MARKER_FACTOR`` × chance.
- ``twin``: map(image) − map(lesion-free twin), same noise, positive part, energy pointing game on the
  lesion, minus the lesion's area share (what a flat difference would give). Passes when the CI of that
  excess lies above 0.
- ``baseline:<name>``: the paired difference of ``PRIMARY_METRIC`` (model − baseline) on shared images
  (baselines: random-init UNet, start-token map, per-class mean-mask prior). Passes when its CI lies
  above 0.

``verdict``: ``conclusive`` when every gate of every fine-tuned variant (and the base) passes, else
``inconclusive`` naming the failed gates: the trade-off is not drawn from maps that fail them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from evidrift.metrics import localization as loc
from evidrift.stats import describe

MARKER_FACTOR = 3.0


def _gate_row(stats: dict[str, float], chance: float, threshold: float) -> dict[str, object]:
    """One gates.csv row from a ``describe``-style summary: passes when the CI's lower bound exceeds
    ``threshold``."""
    return {
        "value": stats["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "n": stats["n"],
        "chance": chance,
        "threshold": threshold,
        "passed": bool(np.isfinite(stats["ci_low"]) and stats["ci_low"] > threshold),
    }


def marker_gate(maps: Tensor, markers: Tensor, n_boot: int, seed: int) -> dict[str, object]:
    """maps [N, S, S] of the marker word, markers bool [N, S', S'] (non-empty)."""
    pg = loc.pointing_game(maps.float(), markers).numpy()
    chance = float(markers.float().flatten(1).mean(1).mean())
    return _gate_row(describe(pg, n_boot=n_boot, seed=seed), chance, MARKER_FACTOR * chance)


def twin_gate(maps: Tensor, twin_maps: Tensor, masks: Tensor, n_boot: int, seed: int) -> dict[str, object]:
    """maps / twin_maps [N, S, S] of the query word on the image and on its twin; masks bool [N, S', S']."""
    difference = (maps.float() - twin_maps.float()).clamp_min(0)
    energy = loc.energy_pointing_game(difference, masks).numpy()
    area = masks.float().flatten(1).mean(1).numpy()
    stats = describe(energy - area, n_boot=n_boot, seed=seed)
    return _gate_row(stats, float(np.mean(area)), 0.0)


def baseline_gate(difference: dict[str, float]) -> dict[str, object]:
    """From ``scores.paired_difference`` (model − baseline)."""
    return _gate_row(difference, float("nan"), 0.0)


def verdict(gates: pd.DataFrame, models: Sequence[str]) -> tuple[str, list[str]]:
    """(``conclusive`` | ``inconclusive``, the failed ``model:gate`` names) over the rows of ``models``."""
    rows = gates[gates["model"].isin(list(models))]
    failed = [f"{r.model}:{r.gate}" for r in rows.itertuples() if not bool(r.passed)]
    if rows.empty:
        return "inconclusive", ["no gates computed"]
    return ("conclusive" if not failed else "inconclusive"), failed


def as_masks(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(array, dtype=bool))
