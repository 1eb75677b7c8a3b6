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
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from evidrift import stats
from evidrift.classifier import models
from evidrift.classifier.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint, sidecar_path
from evidrift.classifier.config import ModelConfig
from evidrift.core.distributed import Context
from evidrift.core.errors import DataError, UsageError
from evidrift.core.io import write_csv_atomic, write_json_atomic, write_parquet_atomic
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Step, run_steps
from evidrift.studies.config import StudyConfig

logger = logging.getLogger("evidrift.studies.sanity.study")

#: Containers whose children are randomized one by one (timm's stage lists).
SPLIT_CONTAINERS: tuple[str, ...] = ("features", "stages", "blocks", "layers")
#: Name of the pseudo-block holding parameters registered directly on the root module (ViT pos_embed...).
ROOT_BLOCK = "<root>"
SIMILARITY_METRICS: tuple[str, ...] = (
    "spearman_abs",
    "spearman_signed",
    "ssim",
    "topk_iou@0.2",
    "hog_spearman",
)

Mode = Literal["cascading", "independent"]


# --- blocks and re-initialization ---------------------------------------------------------------------------
def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomization_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's parameter-holding blocks, from the head down to the input.

    Top-level children in reverse definition order; a child named in ``SPLIT_CONTAINERS`` (densenet
    ``features``, resnetv2/convnext ``stages``, ViT ``blocks``) contributes its own children instead.
    Parameters registered on the root itself (ViT ``cls_token``, ``pos_embed``) form the last block
    ``<root>``.
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


# --- similarity of maps -------------------------------------------------------------------------------------
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
        raise UsageError(
            f"maps of {tuple(maps.shape[-2:])} pixels hold no {cell}x{cell} HOG cell; lower hog_cell"
        )
    per_block = min(3, n_cells)
    flat = maps.detach().double().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape).cpu().numpy()
    feats = [
        hog(m, pixels_per_cell=(cell, cell), cells_per_block=(per_block, per_block), feature_vector=True)
        for m in norm
    ]
    return torch.from_numpy(np.stack(feats).astype(np.float32))


def _shift_to_zero(maps: torch.Tensor) -> torch.Tensor:
    """Each map minus its own minimum ([N, H, W] → ≥ 0): leaves the ranks of its pixels unchanged."""
    return maps - maps.flatten(1).amin(dim=1)[:, None, None]


def map_similarity(
    reference: torch.Tensor,
    current: torch.Tensor,
    reference_signed: torch.Tensor,
    current_signed: torch.Tensor,
    hog_cell: int = 16,
) -> dict[str, torch.Tensor]:
    """Similarity of each map to its reference; maps [N, H, W] at one size (the input size).

    Returns ``SIMILARITY_METRICS`` → float64 [N] (1 = identical; NaN where a map is degenerate or constant):
    ``spearman_abs`` (Spearman of |map|), ``spearman_signed`` (Spearman of the signed maps; each is shifted
    by its own minimum first, which keeps its ranks, since ``evidrift.metrics`` clips negatives), ``ssim``,
    ``topk_iou@0.2`` (``metrics.drift``) and ``hog_spearman`` (Spearman of ``hog_features``).
    """
    from evidrift.metrics import drift

    table = drift.compare(reference.abs(), current.abs(), metrics=["spearman", "ssim", "topk_iou@0.2"])
    hog_ref = hog_features(reference, hog_cell)[:, None, :]
    hog_cur = hog_features(current, hog_cell)[:, None, :]
    return {
        "spearman_abs": torch.tensor(table["spearman"].to_numpy()),
        "spearman_signed": drift.spearman(_shift_to_zero(reference_signed), _shift_to_zero(current_signed)),
        "ssim": torch.tensor(table["ssim"].to_numpy()),
        "topk_iou@0.2": torch.tensor(table["topk_iou@0.2"].to_numpy()),
        "hog_spearman": drift.spearman(hog_ref, hog_cur),
    }


# --- maps of a model ----------------------------------------------------------------------------------------
class NegatedScore(nn.Module):
    """``model`` with its logits negated: explaining it gives each method's map of the evidence *against*
    the target class (the gradient is −G). Its layers are ``model.<name>``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


@dataclass
class ModelMaps:
    """Maps of N images at the input size, per method: ``positive`` [N, H, W] ≥ 0 (the method's map) and
    ``signed`` [N, H, W] = positive − the same method's map for the negated score. For methods linear in the
    gradient (gradcam, xgradcam, hirescam) ``signed`` is exactly the map before its final ReLU; for
    gradient-free methods (eigencam) it is 0."""

    positive: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]


def explain_model(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    methods: Sequence[str],
    batch_size: int = 16,
    signed: bool = True,
) -> ModelMaps:
    """``ModelMaps`` of ``images`` [N, 3, H, W] for ``targets`` [N] int64 at ``layer``, through ``CAMEngine``
    (one forward + backward per batch for every method; a second one on ``NegatedScore`` when ``signed``)."""
    from evidrift.cam import CAMEngine, upsample

    size = (images.shape[-2], images.shape[-1])
    device = next(model.parameters()).device

    def run(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
        with CAMEngine(net, layers=[name]) as engine:
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device)
                out = engine(x, targets[start : start + batch_size].to(device), methods=list(methods))
                for m in methods:
                    parts[m].append(upsample(out.maps[m], size).cpu())
        return {m: torch.cat(v) for m, v in parts.items()}

    positive = run(model, layer)
    if not signed:
        return ModelMaps(positive, positive)
    negative = run(NegatedScore(model), f"model.{layer}")
    return ModelMaps(positive, {m: positive[m] - negative[m] for m in methods})


# --- randomization curves -----------------------------------------------------------------------------------
def randomization_curves(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    methods: Sequence[str],
    modes: Sequence[Mode] = ("cascading", "independent"),
    seed: int = 0,
    hog_cell: int = 16,
    batch_size: int = 16,
    ids: Sequence[str] | None = None,
    progress: bool = True,
    blocks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Similarity of the maps to the original model's maps at every randomization step.

    Step 0 is an unmodified copy of the model (so every curve starts at similarity 1); step k re-initializes
    ``blocks[k - 1]`` (default ``randomization_blocks(model)``, head first; seed ``seed + k``, the same draw
    in both modes) on top of the earlier steps (``cascading``) or alone (``independent``). ``model`` itself
    is never modified. A degenerate map (all zero) gives NaN similarities, also at step 0.

    Returns one row per (mode, step, method, image): mode, step, block, method, image, and one column per
    ``SIMILARITY_METRICS``.
    """
    for mode in modes:
        if mode not in ("cascading", "independent"):
            raise UsageError(f"sanity mode must be 'cascading' or 'independent', got {mode!r}")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
    blocks = list(blocks) if blocks is not None else randomization_blocks(model)
    reference = explain_model(model, layer, images, targets, methods, batch_size)
    frames: list[pd.DataFrame] = []

    def record(mode: str, step: int, block: str, net: nn.Module) -> None:
        maps = explain_model(net, layer, images, targets, methods, batch_size)
        for method in methods:
            sims = map_similarity(
                reference.positive[method],
                maps.positive[method],
                reference.signed[method],
                maps.signed[method],
                hog_cell,
            )
            frame = pd.DataFrame({k: v.numpy() for k, v in sims.items()})
            frame.insert(0, "image", ids)
            frame.insert(0, "method", method)
            frame.insert(0, "block", block)
            frame.insert(0, "step", step)
            frame.insert(0, "mode", mode)
            frames.append(frame)

    total = len(modes) * (len(blocks) + 1)
    with tqdm(total=total, desc="randomization", unit="step", leave=False, disable=not progress) as bar:
        for mode in modes:
            net = copy.deepcopy(model)
            record(mode, 0, "original", net)
            bar.update()
            for k, block in enumerate(blocks, start=1):
                if mode == "independent":
                    net = copy.deepcopy(model)
                randomize_blocks_(net, [block], seed + k)
                record(mode, k, block, net)
                bar.update()
    return pd.concat(frames, ignore_index=True)


# --- self-test of the drift metrics -------------------------------------------------------------------------
#: (check, metric, expectation, predicate on the mean) of the self-test.
SELF_TEST_CHECKS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("identical checkpoints", "topk_iou@0.2", "= 1", lambda v: abs(v - 1.0) <= 1e-6),
    ("identical checkpoints", "spearman", "= 1", lambda v: abs(v - 1.0) <= 1e-6),
    ("identical checkpoints", "ssim", "= 1", lambda v: abs(v - 1.0) <= 1e-6),
    ("identical checkpoints", "centroid_shift", "= 0", lambda v: abs(v) <= 1e-9),
    ("identical checkpoints", "peak_shift", "= 0", lambda v: abs(v) <= 1e-9),
    ("identical checkpoints", "js", "= 0", lambda v: abs(v) <= 1e-9),
    ("randomized model", "topk_iou@0.2", "< 0.5", lambda v: v < 0.5),
    ("randomized model", "spearman", "< 0.5", lambda v: v < 0.5),
)
# Not JS for the randomized model: two near-uniform maps (gradcam++/layercam of a weak model) have a small JS
# even when their pixel orders are unrelated; ranks and top-k sets show the change.


def self_test(
    checkpoint: str | os.PathLike[str],
    images: torch.Tensor,
    targets: torch.Tensor,
    methods: Sequence[str],
    work_dir: str | os.PathLike[str],
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict[str, object]]:
    """The drift metrics against known answers, per method: the checkpoint is written a second time
    (``models.save_checkpoint`` into ``work_dir``) and both files loaded — their maps must show zero drift
    (``kind`` ``metrics``: a failure is a bug in the metrics or the checkpoint I/O); the model with every
    block re-initialized must show a large drift (``kind`` ``method``: a failure flags a CAM method whose
    maps barely depend on the model's parameters, as Adebayo et al. found for some methods) — see
    ``SELF_TEST_CHECKS``.

    Returns one record per (method, check, metric): check, kind, method, metric, value (the mean over the
    images, NaN rows ignored), expected, passed.
    """
    from evidrift.metrics import drift

    model_a, meta = load_checkpoint(checkpoint)
    copy_path = Path(work_dir) / "selftest_copy.safetensors"
    save_checkpoint(copy_path, model_a, meta)
    model_b, _ = load_checkpoint(copy_path)
    randomized = randomize_blocks_(copy.deepcopy(model_a), randomization_blocks(model_a), seed)
    layer = meta.cam_layers[:1] or models.default_cam_layers(model_a, meta.arch)
    names = sorted({metric for _, metric, _, _ in SELF_TEST_CHECKS})
    maps = {
        "a": explain_model(model_a, layer[0], images, targets, methods, batch_size, signed=False).positive,
        "identical checkpoints": explain_model(
            model_b, layer[0], images, targets, methods, batch_size, signed=False
        ).positive,
        "randomized model": explain_model(
            randomized, layer[0], images, targets, methods, batch_size, signed=False
        ).positive,
    }
    for leftover in (copy_path, sidecar_path(copy_path)):
        leftover.unlink(missing_ok=True)
    records: list[dict[str, object]] = []
    for method in methods:
        tables = {
            c: drift.compare(maps["a"][method], maps[c][method], metrics=names) for c in maps if c != "a"
        }
        for check, metric, expected, predicate in SELF_TEST_CHECKS:
            value = (
                float(np.nanmean(tables[check][metric].to_numpy()))
                if tables[check][metric].notna().any()
                else math.nan
            )
            records.append(
                dict(
                    check=check,
                    kind="metrics" if check == "identical checkpoints" else "method",
                    method=method,
                    metric=metric,
                    value=value,
                    expected=expected,
                    passed=bool(math.isfinite(value) and predicate(value)),
                )
            )
    return records


# --- the study ----------------------------------------------------------------------------------------------
#: Files of the sanity checks in the run directory.
def sanity_modes(mode: str) -> list[Mode]:
    """``both`` → [cascading, independent]; otherwise [mode]."""
    return ["cascading", "independent"] if mode == "both" else [mode]  # type: ignore[list-item]


def sanity_checkpoint(
    config: StudyConfig, paths: RunPaths, model_cfg: ModelConfig, progress: bool = True
) -> Path:
    """The checkpoint the sanity checks explain: the run's stage 2 when trained with this config, else
    stage 1; when neither is, stages 0 (if needed) and 1 are trained first (``train.train_study``;
    resumable)."""
    from evidrift.classifier.loop import StageFiles
    from evidrift.classifier.training import stage_done, stage_hash, train_study

    for stage in ("2", "1"):
        if stage_done(StageFiles.of(paths, model_cfg.key, stage), stage_hash(config, model_cfg, stage)):
            return paths.checkpoint(model_cfg.key, stage)
    logger.info("%s: no stage-1/2 checkpoint in %s; training stages 0-1 first", model_cfg.key, paths.root)
    done = train_study(config, paths, arch=model_cfg.key, stages=("0", "1"), progress=progress)
    return done[model_cfg.key]["1"]


def sample_test_images(
    config: StudyConfig, paths: RunPaths, meta: CheckpointMeta, n_images: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n_images`` test images drawn at random (seeded), preprocessed as the checkpoint expects:
    (images [n, 3, S, S] float32, labels [n] int64, ids)."""
    from evidrift.data.dataset import ManifestDataset
    from evidrift.data.sources import load_manifest

    frame, classes = load_manifest(paths)
    test = frame[(frame["split"] == "test") & (frame["status"] == "ok")]
    if test.empty:
        raise DataError(f"the manifest {paths.manifest} has no usable test image; raise data.split.test")
    test = test.sample(n=min(n_images, len(test)), random_state=seed).reset_index(drop=True)
    size, mean, std = meta.preprocessing(paths.root)
    dataset = ManifestDataset(test, classes, size, resize=config.data.resize, mean=mean, std=std)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return images, labels, [str(it["id"]) for it in items]


def summarize_curves(
    curves: pd.DataFrame, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Mean similarity and its percentile-bootstrap CI per (arch, mode, step, block, method, metric)."""

    keys = ["arch", "mode", "step", "block", "method"]
    long = curves.melt(id_vars=[*keys, "image"], value_vars=list(SIMILARITY_METRICS), var_name="metric")
    return stats.summarize_values(long, [*keys, "metric"], n_boot=n_boot, ci=ci, seed=seed)


def _model_curves(paths: RunPaths, key: str) -> Path:
    return paths.sanity_work / key / "curves.parquet"


def _model_checks(paths: RunPaths, key: str) -> Path:
    return paths.sanity_work / key / "checks.json"


def sanity_model(
    config: StudyConfig, paths: RunPaths, model_cfg: ModelConfig, progress: bool = True
) -> tuple[pd.DataFrame, list[dict[str, object]]]:
    """Randomization curves and the self-test of one model: (curves, self-test records)."""
    cfg = config.sanity
    checkpoint = sanity_checkpoint(config, paths, model_cfg, progress)
    model, meta = load_checkpoint(checkpoint)
    layer = meta.cam_layers[:1] or models.default_cam_layers(model, model_cfg.arch)
    images, labels, ids = sample_test_images(config, paths, meta, cfg.n_images, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        frame = randomization_curves(
            model,
            layer[0],
            images,
            labels,
            cfg.methods,
            sanity_modes(cfg.mode),
            cfg.seed,
            cfg.hog_cell,
            config.explain.batch_size,
            ids,
            progress,
        )
    frame.insert(0, "arch", model_cfg.key)
    frame.insert(1, "checkpoint", checkpoint.name)
    work = paths.sanity_work
    work.mkdir(parents=True, exist_ok=True)
    checks = [
        {"arch": model_cfg.key, **record}
        for record in self_test(
            checkpoint, images, labels, cfg.methods, work, cfg.seed, config.explain.batch_size
        )
    ]
    return frame, checks


def sanity_steps(config: StudyConfig, progress: bool = True) -> tuple[Step[StudyConfig], ...]:
    """The sanity checks: one ``sanity-{model}`` step per model (curves and self-test), then
    ``sanity-summary`` (the tables). Markers live in ``steps/`` beside the drift study's."""

    def run_model(model_cfg: ModelConfig) -> Callable[[StudyConfig, RunPaths, Context], None]:
        def run(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
            frame, checks = sanity_model(config, paths, model_cfg, progress)
            write_parquet_atomic(_model_curves(paths, model_cfg.key), frame)
            write_json_atomic(_model_checks(paths, model_cfg.key), checks)

        return run

    def run_summary(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        write_sanity_tables(config, paths)

    def model_inputs(config: StudyConfig, model_cfg: ModelConfig) -> dict[str, Any]:
        from evidrift.classifier.training import stage_hash

        stages = {s: stage_hash(config, model_cfg, s) for s in ("0", "1", "2")}
        return {"model": model_cfg.model_dump(mode="json"), "stages": stages}

    def model_outputs(config: StudyConfig, paths: RunPaths, key: str) -> list[Path]:
        return [_model_curves(paths, key), _model_checks(paths, key)]

    model_steps = [
        Step(
            f"sanity-{m.key}",
            run_model(m),
            config=("sanity", "explain.batch_size", "data"),
            inputs=partial(model_inputs, model_cfg=m),
            outputs=partial(model_outputs, key=m.key),
        )
        for m in config.models
    ]

    def summary_outputs(config: StudyConfig, paths: RunPaths) -> list[Path]:
        return [paths.sanity_table, paths.sanity_summary, paths.sanity_selftest]

    names = tuple(s.name for s in model_steps)
    summary = Step("sanity-summary", run_summary, reads=names, config=("stats",), outputs=summary_outputs)
    return (*model_steps, summary)


def write_sanity_tables(config: StudyConfig, paths: RunPaths) -> tuple[pd.DataFrame, list[dict[str, object]]]:
    """``sanity.parquet``, ``sanity_summary.csv`` and ``sanity_selftest.json`` from the per-model tables;
    returns (summary, self-test records)."""
    curves = [pd.read_parquet(_model_curves(paths, m.key)) for m in config.models]
    checks: list[dict[str, object]] = []
    for m in config.models:
        checks += json.loads(_model_checks(paths, m.key).read_text(encoding="utf-8"))
    table = pd.concat(curves, ignore_index=True)
    write_parquet_atomic(paths.sanity_table, table)
    summary = summarize_curves(table, config.stats.n_boot, config.stats.ci, config.stats.seed)
    write_csv_atomic(paths.sanity_summary, summary)
    write_json_atomic(
        paths.sanity_selftest,
        {
            "passed": all(c["passed"] for c in checks if c["kind"] == "metrics"),
            "flagged_methods": sorted(
                {f"{c['arch']}/{c['method']}" for c in checks if not c["passed"] and c["kind"] == "method"}
            ),
            "checks": checks,
        },
    )
    return summary, checks


def run_sanity(
    config: StudyConfig,
    paths: RunPaths,
    progress: bool = True,
    force: Iterable[str] = (),
    until: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, list[dict[str, object]]]:
    """Randomization curves and the self-test for every model of the study on the step runner
    (``sanity_steps``); writes ``sanity.parquet``, ``sanity_summary.csv`` and ``sanity_selftest.json``.
    Returns (summary, self-test records). Done steps are skipped."""
    from evidrift.core.distributed import resolve_device

    ctx = Context(device=resolve_device(config.train.device))
    run_steps(sanity_steps(config, progress), config, paths, ctx, force=force, until=until, echo=echo)
    document = json.loads(paths.sanity_selftest.read_text(encoding="utf-8"))
    return pd.read_csv(paths.sanity_summary), list(document["checks"])
