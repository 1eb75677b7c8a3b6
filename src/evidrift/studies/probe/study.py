"""Head probing study ("How to Probe", Gairola et al.; ARCHITECTURE §10): how the head changes the
explanations.

On one frozen backbone (pretrained weights, the run's stage-0 checkpoint, or its stage-2 backbone), a head
is trained for every variant ``loss × head`` — losses ``ce`` and ``bce`` (uniform off-labels, targets
max(onehot, ``probe.bce_off_label``), default 1/C), heads ``linear``, ``linear_nobias``, ``mlp2``,
``mlp3``, ``bcos1``–``bcos3`` (``studies.probe.heads``: the reference's per-position heads, pooling after
the last layer, hidden width ``probe.hidden`` = 2048) — with the same standardization, budget and seed, on
cached backbone feature maps. Each variant is then explained with every method of ``probe.methods``:

- the reference set (``evidrift.studies.probe.attributions``, signed maps): ``gradcam`` at ``probe.layer``
  (``reference`` = the last block's final convolution), ``input_x_gradient``, ``integrated_gradients``,
  ``lrp`` (through the whole network), ``bcos`` (B-cos heads only);
- any other ``CAMEngine`` method name (``gradcam++``, ``layercam``, ``xgradcam``, ...) at ``probe.layer``.

Where the maps come from: methods at the backbone output (``probe.layer: features``) and ``bcos`` run on
the cached activations (the same maps as the whole network: a head-only change of gradients stops there);
every other method runs the whole network on the images. Nothing that needs the input runs on features.

Scores (maps upsampled bilinearly to the input size, smoothed by a ``probe.smoothing`` average pool, then
clipped at 0 — the reference's order):

- ``correct``: per test image, 1 if the variant classifies it correctly (its mean is the accuracy);
- ``gridpg@n``: GridPG on n × n grids of full-size test images (an n·S-pixel input), one image per class,
  each classified correctly with confidence ≥ ``probe.confidence`` by *every* variant (softmax for
  standard heads, sigmoid for B-cos heads, as the reference's ``get_confident_images.py``); cells beyond
  the number of classes are blank and never targets. ``grid_entropy@n`` / ``grid_gini@n`` on the same maps;
- ``pointing_game``, ``energy_pointing_game``: against the lesion masks, on test images whose mask is not
  empty (target = the label); ``entropy``, ``gini`` of those single-image maps.

Outputs (run directory): ``probe.parquet`` (one row per arch, variant, method, unit, metric),
``probe_summary.csv`` (mean and bootstrap CI), ``probe_pairs.csv`` (paired Wilcoxon tests between
variants on shared units, Holm-corrected), ``probe_pool.csv`` (the grid pool's size per class),
``probe_vs_baseline.csv`` (every variant against ``ce-linear``: paired mean difference, bootstrap CI,
Wilcoxon, Holm), ``figures/probe_*.png``; heads under ``probe/{arch}/{variant}/head.safetensors``
(reused by a rerun).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evidrift.cam import CAMEngine, upsample
from evidrift.cam.methods import method_spec, resolve_method
from evidrift.classifier import models
from evidrift.classifier.config import HeadConfig, ModelConfig
from evidrift.classifier.freezing import freeze_backbone
from evidrift.classifier.schedule import lr_at
from evidrift.classifier.training import determinism, image_size_for, stage_hash, train_stage, uses_stage0
from evidrift.core.config import ConfigError
from evidrift.core.distributed import Context
from evidrift.core.errors import DataError, UsageError
from evidrift.core.io import config_hash, save_safetensors_atomic, write_csv_atomic, write_parquet_atomic
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Step, run_steps
from evidrift.metrics import complexity, localization
from evidrift.studies.config import StudyConfig, load_config
from evidrift.studies.probe import attributions as probe_attributions
from evidrift.studies.probe.config import ProbeConfig
from evidrift.studies.probe.grids import GridSpec, reference_postprocess, sample_grids, tile_grid
from evidrift.studies.probe.heads import PROBE_HEADS, ProbeNet, build_probe_head, channel_scale
from evidrift.studies.probe.stats import summarize_probe, versus_baseline
from evidrift.studies.sanity.config import SanityConfig

logger = logging.getLogger("evidrift.studies.probe.study")

LOSSES: tuple[str, ...] = ("ce", "bce")
#: The variant every other is compared with in ``probe_vs_baseline.csv`` (the paper's baseline probe).
BASELINE = "ce-linear"
HEADS: tuple[str, ...] = tuple(PROBE_HEADS)


@dataclass(frozen=True)
class ProbeVariant:
    """One head variant: ``loss`` (ce | bce) × ``head`` (a key of ``probe_heads.PROBE_HEADS``)."""

    loss: str
    head: str

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"probe loss {self.loss!r} is not one of {list(LOSSES)}")
        if self.head not in HEADS:
            raise UsageError(f"probe head {self.head!r} is not one of {list(HEADS)}")

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.head}"

    @property
    def is_bcos(self) -> bool:
        return PROBE_HEADS[self.head][0] == "bcos"


def probe_variants(losses: Sequence[str], heads: Sequence[str]) -> list[ProbeVariant]:
    """Every ``loss × head`` variant, losses outer."""
    return [ProbeVariant(loss, head) for loss in losses for head in heads]


# --- losses, probabilities and confident images -------------------------------------------------------------
def probe_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss: str, off_label: float | None
) -> torch.Tensor:
    """Mean loss of logits [B, C] for labels [B] int64: ``ce`` cross-entropy; ``bce`` the reference's
    ``UniformOffLabelsBCEWithLogitsLoss``: BCE with logits on targets max(onehot, off), off = ``off_label``
    or 1/C."""
    if loss == "ce":
        return F.cross_entropy(logits.float(), labels)
    if loss == "bce":
        n_classes = logits.shape[1]
        off = off_label if off_label is not None else 1.0 / n_classes
        targets = F.one_hot(labels, n_classes).float().clamp_min(off)
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    raise UsageError(f"probe loss must be 'ce' or 'bce', got {loss!r}")


def variant_probabilities(logits: torch.Tensor, variant: ProbeVariant) -> torch.Tensor:
    """The reference's confidence (``get_confident_images.py``): softmax for standard heads, sigmoid for
    B-cos heads, whatever the loss. logits [N, C] → [N, C] in [0, 1]."""
    logits = logits.float()
    return torch.sigmoid(logits) if variant.is_bcos else torch.softmax(logits, dim=1)


def confident_correct(
    logits_per_variant: Sequence[torch.Tensor],
    variants: Sequence[ProbeVariant],
    labels: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """bool [N]: images that EVERY variant classifies correctly (argmax = label) with probability of the
    label ≥ ``threshold`` (``variant_probabilities``). ``logits_per_variant``: one [N, C] per variant."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    for logits, variant in zip(logits_per_variant, variants, strict=True):
        probs = variant_probabilities(logits, variant)
        correct = logits.argmax(dim=1) == labels
        keep &= correct & (probs.gather(1, labels[:, None])[:, 0] >= threshold)
    return keep


# --- layers -------------------------------------------------------------------------------------------------
def reference_layer(backbone: nn.Module, arch: str) -> str:
    """The reference's Grad-CAM layer, a module name inside ``backbone``: the last residual block's final
    convolution, before its BN, residual add and activation (``layer4[-1].conv3`` for ResNet-50;
    ``conv2`` for BasicBlock ResNets; ``stages[-1].blocks[-1].conv3`` for ResNetV2). Architectures without
    such a block (DenseNet, Inception) use ARCHITECTURE §4's default CAM layer."""
    names = dict(backbone.named_modules())
    for stage in ("layer4", "stages.3"):
        if stage not in names:
            continue
        blocks = names[stage]
        inner = getattr(blocks, "blocks", None)
        container = inner if isinstance(inner, nn.Module) else blocks
        prefix = f"{stage}.blocks" if container is not blocks else stage
        last = len(list(container.children())) - 1
        for conv in ("conv3", "conv2"):
            name = f"{prefix}.{last}.{conv}"
            if isinstance(names.get(name), nn.Conv2d):
                return name
    return models.default_cam_layers(backbone, arch)[0]


def resolve_probe_layer(backbone: nn.Module, arch: str, layer: str) -> str:
    """``probe.layer`` as a module name of ``ProbeNet``: ``features`` (the backbone output), ``reference``
    (``reference_layer``) or a dotted module name of the backbone (prefixed ``backbone.``). Raises
    ConfigError with the closest names for an unknown one."""
    if layer == "features":
        return "features"
    if layer == "reference":
        return f"backbone.{reference_layer(backbone, arch)}"
    names = [n for n, _ in backbone.named_modules() if n]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=8, cutoff=0.5)
        raise ConfigError(
            f"probe.layer {layer!r} is not a module of {arch}; use `reference`, `features` or a dotted "
            f"module name (closest: {close or names[-8:]})"
        )
    return f"backbone.{layer}"


# --- maps ---------------------------------------------------------------------------------------------------
def resolve_probe_method(name: str) -> str:
    """A ``probe.methods`` entry: a reference method (``probe_attributions.REFERENCE_METHODS``) or a
    ``CAMEngine`` method name (canonical form). Raises ConfigError for an unknown name."""
    if name in probe_attributions.REFERENCE_METHODS:
        return name
    try:
        return resolve_method(name)
    except ValueError as exc:
        raise ConfigError(
            f"probe.methods: {exc}; the reference set is {list(probe_attributions.REFERENCE_METHODS)}"
        ) from exc


def runs_on_features(method: str, layer: str) -> bool:
    """Whether ``method`` can run on cached backbone outputs: ``bcos``, and layer methods at ``features``.
    Input-space methods (and layer methods inside the backbone) need the whole network."""
    if method == "bcos":
        return True
    if method in probe_attributions.REFERENCE_METHODS:
        return method == "gradcam" and layer == "features"
    return method_spec(method).kind == "layer" and layer == "features"


def signed_maps(
    method: str,
    net: ProbeNet,
    layer: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ig_steps: int,
    chunk_size: int,
) -> torch.Tensor:
    """Maps of ``method`` for inputs [B, ...] (images, or backbone outputs when ``net.backbone`` is None)
    and targets long [B]: [B, h, w] float32 — signed for the reference set, ≥ 0 for ``CAMEngine``
    methods (their formulas clip)."""
    if method == "gradcam":
        return probe_attributions.signed_gradcam(net, layer, inputs, targets)
    if method == "input_x_gradient":
        return probe_attributions.input_x_gradient(net, inputs, targets)
    if method == "integrated_gradients":
        return probe_attributions.integrated_gradients(net, inputs, targets, ig_steps, chunk_size)
    if method == "lrp":
        return probe_attributions.lrp(net, inputs, targets)
    if method == "bcos":
        return probe_attributions.bcos_map(net, inputs, targets)
    kind = method_spec(method).kind
    layers = [layer] if kind == "layer" or method == "scorecam" else ["features"]
    with CAMEngine(net, layers=layers, ig_steps=ig_steps) as engine:
        return engine(inputs, targets, methods=[method]).maps[method].float()


def iter_scored_maps(
    method: str,
    net: ProbeNet,
    layer: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    size: int,
    probe: ProbeConfig,
    device: torch.device,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Batch by batch: (slice of N, maps [b, size, size] float32 ≥ 0 on CPU) — ``signed_maps`` upsampled
    bilinearly to ``size``, smoothed, then clipped (``reference_postprocess``)."""
    for start in range(0, len(inputs), probe.batch_size):
        part = slice(start, min(start + probe.batch_size, len(inputs)))
        maps = signed_maps(
            method,
            net,
            layer,
            inputs[part].to(device),
            targets[part].to(device),
            probe.ig_steps,
            probe.batch_size,
        )
        yield part, reference_postprocess(upsample(maps.float(), (size, size)), probe.smoothing).cpu()


# --- caching the frozen backbone ----------------------------------------------------------------------------
@dataclass
class CachedSplit:
    """Backbone outputs of one split: ``activations`` [N, K, h, w] float32 (the heads' input), ``labels`` [N]
    int64, and for the test split the ``ids``, the preprocessed ``images`` [N, 3, S, S] and lesion ``masks``
    [N, S, S] bool."""

    activations: torch.Tensor
    labels: torch.Tensor
    ids: list[str] | None = None
    images: torch.Tensor | None = None
    masks: torch.Tensor | None = None


@torch.no_grad()
def cache_split(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    keep_images: bool,
    desc: str,
    progress: bool = True,
) -> CachedSplit:
    """Run the frozen backbone's ``forward_features`` once over ``dataset`` (items: ``image``, ``label``,
    ``id``, optional ``mask``); ``keep_images`` also keeps the images, ids and masks (the test split)."""
    backbone.eval()
    acts, labels, ids, images, masks = [], [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for item in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        acts.append(models.timm_api(backbone).forward_features(item["image"].to(device)).float().cpu())
        labels.append(torch.as_tensor(item["label"]).long())
        if keep_images:
            images.append(item["image"].float())
            ids += [str(i) for i in item["id"]]
            if "mask" in item:
                masks.append(item["mask"] > 0.5)
    if not acts:
        raise DataError(f"{desc}: no images (check the manifest's splits)")
    return CachedSplit(
        activations=torch.cat(acts),
        labels=torch.cat(labels),
        ids=ids if keep_images else None,
        images=torch.cat(images) if keep_images else None,
        masks=torch.cat(masks) if masks else None,
    )


@torch.no_grad()
def backbone_outputs(
    backbone: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``forward_features`` of images [N, 3, H, W] in batches: [N, K, h, w] float32 on CPU."""
    return torch.cat(
        [
            models.timm_api(backbone).forward_features(images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


# --- training the heads -------------------------------------------------------------------------------------
def train_head(
    head: nn.Module,
    train: CachedSplit,
    val: CachedSplit,
    variant: ProbeVariant,
    probe: ProbeConfig,
    device: torch.device,
    label: str = "",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, float]]:
    """Train ``head`` on cached activations: ``probe.epochs`` epochs of AdamW (``probe.lr``,
    ``probe.weight_decay``), one warm-up epoch then cosine decay (``train.lr_at``), batches of
    ``probe.batch_size`` shuffled by a generator seeded with ``probe.seed`` (every variant sees the same
    batches), no early stopping; the weights of the epoch with the lowest validation loss are kept
    (validation = the training split when ``val`` is empty). A last batch of one image is dropped
    (BatchNorm needs two). Returns (the head in eval mode, {best_epoch, val_loss, seconds})."""
    started = time.perf_counter()
    head = head.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad], lr=probe.lr, weight_decay=probe.weight_decay
    )
    n = len(train.labels)
    steps_per_epoch = max(1, n // probe.batch_size + (1 if n % probe.batch_size > 1 else 0))
    total, warmup = steps_per_epoch * probe.epochs, steps_per_epoch
    generator = torch.Generator().manual_seed(probe.seed)
    check = val if len(val.labels) else train
    best_loss, best_state, best_epoch, step = math.inf, copy.deepcopy(head.state_dict()), -1, 0
    for epoch in tqdm(range(probe.epochs), desc=label, unit="epoch", leave=False, disable=not progress):
        head.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, probe.batch_size):
            batch = order[start : start + probe.batch_size]
            if len(batch) < 2:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, probe.lr)
            x, y = train.activations[batch].to(device), train.labels[batch].to(device)
            loss = probe_loss(head(x), y, variant.loss, probe.bce_off_label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        head.eval()
        with torch.no_grad():
            logits = torch.cat(
                [
                    head(check.activations[i : i + probe.batch_size].to(device)).float().cpu()
                    for i in range(0, len(check.labels), probe.batch_size)
                ]
            )
            val_loss = float(probe_loss(logits, check.labels, variant.loss, probe.bce_off_label))
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    return head.eval(), {
        "best_epoch": float(best_epoch),
        "val_loss": best_loss,
        "seconds": time.perf_counter() - started,
    }


def trained_head(
    variant: ProbeVariant,
    train: CachedSplit,
    val: CachedSplit,
    num_classes: int,
    scale: torch.Tensor,
    probe: ProbeConfig,
    work_dir: Path,
    tag: str,
    device: torch.device,
    progress: bool = True,
) -> nn.Module:
    """The variant's head: loaded from ``work_dir/head.safetensors`` when its metadata carries ``tag``, else
    built (seeded by ``probe.seed``: every variant starts from the same RNG state), trained
    (``train_head``) and saved atomically."""
    torch.manual_seed(probe.seed)
    head: nn.Module  # train_head hands it back as an nn.Module
    head = build_probe_head(variant.head, train.activations.shape[1], num_classes, probe.hidden, scale)
    final = work_dir / "head.safetensors"
    if final.is_file():
        with safe_open(str(final), framework="pt") as handle:
            if (handle.metadata() or {}).get("tag") == tag:
                head.load_state_dict({k: handle.get_tensor(k) for k in handle.keys()}, strict=True)
                return head.to(device).eval()
    head, info = train_head(head, train, val, variant, probe, device, f"probe {variant.name}", progress)
    logger.info("probe %s: best epoch %d, val loss %.4f", variant.name, info["best_epoch"], info["val_loss"])
    meta = {"tag": tag, "variant": variant.name, **{k: f"{v:.6g}" for k, v in info.items()}}
    save_safetensors_atomic(final, {k: v.contiguous() for k, v in head.state_dict().items()}, meta)
    return head


# --- scoring ------------------------------------------------------------------------------------------------
@dataclass
class GridSet:
    """The grids of one size: their images [G, 3, n·S, n·S], backbone outputs [G, K, n·h, n·w], specs."""

    n: int
    images: torch.Tensor
    activations: torch.Tensor
    specs: list[GridSpec]


def _row(method: str, unit: str, unit_id: str, target: str, metric: str, value: float) -> dict[str, object]:
    return dict(method=method, unit=unit, unit_id=unit_id, target=target, metric=metric, value=float(value))


def score_variant(
    variant: ProbeVariant,
    head: nn.Module,
    backbone: nn.Module,
    layer: str,
    test: CachedSplit,
    grids: Sequence[GridSet],
    methods: Sequence[str],
    classes: Sequence[str],
    probe: ProbeConfig,
    device: torch.device,
) -> list[dict[str, object]]:
    """Localization and complexity rows of one variant, every method (``bcos`` only for B-cos heads,
    ``lrp`` only for the others). Test images (target = label): ``entropy``, ``gini`` of every map and
    ``pointing_game``, ``energy_pointing_game`` where the lesion mask is not empty. Grids: ``gridpg@n``,
    ``grid_entropy@n``, ``grid_gini@n`` per (grid, cell with an image). Rows: method, unit (``image`` |
    ``grid{n}``), unit_id, target, metric, value."""
    assert test.ids is not None and test.images is not None
    full, cached = ProbeNet(backbone, head).eval(), ProbeNet(None, head).eval()
    rows: list[dict[str, object]] = []
    size = int(test.images.shape[-1])
    for method in methods:
        if (method == "bcos") != variant.is_bcos and method in ("bcos", "lrp"):
            continue
        fast = runs_on_features(method, layer)
        net = cached if fast else full
        inputs = test.activations if fast else test.images
        for part, maps in iter_scored_maps(method, net, layer, inputs, test.labels, size, probe, device):
            ids, labels = test.ids[part], test.labels[part].tolist()
            scores = {"entropy": complexity.entropy(maps), "gini": complexity.gini(maps)}
            if test.masks is not None:
                masks = test.masks[part]
                lesion = masks.flatten(1).any(1)
                if lesion.any():
                    scores["pointing_game"] = localization.pointing_game(maps, masks)
                    scores["energy_pointing_game"] = localization.energy_pointing_game(maps, masks)
            for metric, values in scores.items():
                for i, value in enumerate(values.tolist()):
                    if metric.endswith("pointing_game") and not bool(lesion[i]):
                        continue
                    rows.append(_row(method, "image", ids[i], classes[labels[i]], metric, value))
        for grid in grids:
            owner = torch.tensor(
                [g for g, spec in enumerate(grid.specs) for _ in spec.images], dtype=torch.long
            )
            targets = torch.tensor([c for spec in grid.specs for c in spec.classes], dtype=torch.long)
            cells = torch.tensor([c for spec in grid.specs for c in spec.cells], dtype=torch.long)
            inputs = (grid.activations if fast else grid.images)[owner]
            side = int(grid.images.shape[-1])
            for part, maps in iter_scored_maps(method, net, layer, inputs, targets, side, probe, device):
                scores = {
                    f"gridpg@{grid.n}": localization.gridpg(maps, cells[part], grid.n),
                    f"grid_entropy@{grid.n}": complexity.entropy(maps),
                    f"grid_gini@{grid.n}": complexity.gini(maps),
                }
                for metric, values in scores.items():
                    for j, value in zip(range(part.start, part.stop), values.tolist(), strict=True):
                        spec = grid.specs[int(owner[j])]
                        unit_id = f"{spec.grid_id}/{int(cells[j])}"
                        rows.append(
                            _row(method, f"grid{grid.n}", unit_id, classes[int(targets[j])], metric, value)
                        )
    return rows


# --- the study ----------------------------------------------------------------------------------------------
#: Files of the probing study in the run directory.
def _split(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    return frame[(frame["split"] == split) & (frame["status"] == "ok")].reset_index(drop=True)


def load_study_data(config: StudyConfig, paths: RunPaths) -> tuple[pd.DataFrame, list[str]]:
    """(manifest, classes) of the run: prepared (``data.prepare_data``) when the run has no manifest yet."""
    from evidrift.data import sources

    if not paths.manifest.exists():
        sources.prepare_data(config, paths)
    return sources.load_manifest(paths)


def probe_backbone(
    config: StudyConfig,
    paths: RunPaths,
    model_cfg: ModelConfig,
    num_classes: int,
    ctx: Context,
    progress: bool,
) -> tuple[nn.Module, str]:
    """The frozen backbone of one model (eval mode, on ``ctx.device``) and the identity of its weights.

    ``probe.backbone: pretrained``: the run's stage-0 checkpoint when ``weights: none``, else the configured
    weights. ``finetuned``: the backbone of the run's stage-2 checkpoint. Missing stages are trained first
    (``train.train_stage``, resumable); the checkpoint's own head is dropped (only ``forward_features`` is
    used)."""
    if config.probe.backbone == "finetuned":
        for stage in ("0", "1", "2"):
            if stage != "0" or uses_stage0(model_cfg):
                weights = str(train_stage(config, paths, model_cfg, stage, ctx, progress))
        identity = f"stage2:{stage_hash(config, model_cfg, '2')}"
    elif uses_stage0(model_cfg):
        weights = str(train_stage(config, paths, model_cfg, "0", ctx, progress))
        identity = f"stage0:{stage_hash(config, model_cfg, '0')}"
    else:
        weights, identity = model_cfg.weights, f"weights:{model_cfg.weights}"
    model = models.build_model(model_cfg.arch, num_classes, HeadConfig(), weights).to(ctx.device)
    freeze_backbone(model)
    return model.eval(), identity


def pool_table(
    key: str, labels: torch.Tensor, eligible: torch.Tensor, classes: Sequence[str]
) -> list[dict[str, object]]:
    """Rows of ``probe_pool.csv``: per class, the test images and those in the grid pool."""
    return [
        {
            "arch": key,
            "class": name,
            "n_test": int((labels == c).sum()),
            "n_pool": int(((labels == c) & eligible).sum()),
        }
        for c, name in enumerate(classes)
    ]


def probe_model(
    config: StudyConfig,
    paths: RunPaths,
    model_cfg: ModelConfig,
    frame: pd.DataFrame,
    classes: list[str],
    ctx: Context,
    progress: bool = True,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Every variant of one model: train the heads, build the grids, explain and score. Returns (rows of
    ``probe.parquet`` without the ``arch`` column, rows of ``probe_pool.csv``)."""
    from evidrift.data.dataset import ManifestDataset

    probe = config.probe
    key, device = model_cfg.key, ctx.device
    size = image_size_for(model_cfg, config.train.stage1)
    mean, std = models.normalization(model_cfg.arch)
    methods = [resolve_probe_method(m) for m in probe.methods]
    if len(classes) < 2:
        raise ConfigError(f"the probe needs at least two classes, the data has {classes}")
    with determinism(config.train.deterministic and device.type == "cpu"):
        backbone, identity = probe_backbone(config, paths, model_cfg, len(classes), ctx, progress)
        layer = resolve_probe_layer(backbone, model_cfg.arch, probe.layer)

        def dataset(part: pd.DataFrame, with_mask: bool = False) -> ManifestDataset:
            return ManifestDataset(
                part,
                classes,
                size,
                resize=config.data.resize,
                mean=mean,
                std=std,
                augment=False,
                with_mask=with_mask,
                seed=probe.seed,
            )

        test_frame = _split(frame, "test")
        if probe.max_images is not None and len(test_frame) > probe.max_images:
            test_frame = test_frame.sample(n=probe.max_images, random_state=probe.seed).reset_index(drop=True)
        batch = probe.batch_size
        train = cache_split(
            backbone, dataset(_split(frame, "train")), batch, device, False, f"{key} train features", progress
        )
        val_frame = _split(frame, "val")
        val = (
            CachedSplit(train.activations[:0], train.labels[:0])
            if val_frame.empty
            else cache_split(
                backbone, dataset(val_frame), batch, device, False, f"{key} val features", progress
            )
        )
        test = cache_split(
            backbone, dataset(test_frame, with_mask=True), batch, device, True, f"{key} test", progress
        )
        scale = channel_scale(train.activations) if probe.standardize else None
        scale_tensor = scale if scale is not None else torch.ones(train.activations.shape[1])

        variants = probe_variants(probe.losses, probe.heads)
        training = {k: v for k, v in probe.model_dump(mode="json").items() if k in _TRAINING_KEYS}
        heads: dict[str, nn.Module] = {}
        logits: dict[str, torch.Tensor] = {}
        for variant in variants:
            tag = config_hash(
                {
                    "backbone": identity,
                    "data": config.data.model_dump(mode="json"),
                    "size": size,
                    "seed": config.seed,
                    "variant": variant.name,
                    "training": training,
                }
            )
            work = paths.probe_work / key / variant.name
            head = trained_head(
                variant, train, val, len(classes), scale_tensor, probe, work, tag, device, progress
            )
            heads[variant.name] = head
            with torch.no_grad():
                logits[variant.name] = torch.cat(
                    [
                        head(test.activations[i : i + batch].to(device)).float().cpu()
                        for i in range(0, len(test.labels), batch)
                    ]
                )

        eligible = confident_correct(
            [logits[v.name] for v in variants], variants, test.labels, probe.confidence
        )
        if probe.grid_pool == "all":
            eligible = torch.ones_like(eligible)
        pool = pool_table(key, test.labels, eligible, classes)
        logger.info(
            "%s: grid pool %d of %d test images (%s)",
            key,
            int(eligible.sum()),
            len(eligible),
            ", ".join(f"{r['class']} {r['n_pool']}" for r in pool),
        )
        grid_sets = []
        assert test.images is not None
        for n in probe.grids:
            specs = sample_grids(test.labels, eligible, n, probe.n_grids, probe.seed)
            if not specs:
                logger.warning(
                    "%s: no %dx%d grid (fewer than two classes have an image every variant classifies "
                    "correctly with probability >= %.2f)",
                    key,
                    n,
                    n,
                    probe.confidence,
                )
                continue
            images = torch.stack([tile_grid(test.images[list(spec.images)], spec.cells, n) for spec in specs])
            grid_sets.append(GridSet(n, images, backbone_outputs(backbone, images, batch, device), specs))

        rows: list[dict[str, object]] = []
        for variant in tqdm(variants, desc=f"{key} explain variants", leave=False, disable=not progress):
            correct = (logits[variant.name].argmax(1) == test.labels).float().tolist()
            assert test.ids is not None
            variant_rows = [
                _row("-", "image", test.ids[i], classes[int(test.labels[i])], "correct", c)
                for i, c in enumerate(correct)
            ]
            variant_rows += score_variant(
                variant,
                heads[variant.name],
                backbone,
                layer,
                test,
                grid_sets,
                methods,
                classes,
                probe,
                device,
            )
            for row in variant_rows:
                row.update(variant=variant.name, loss=variant.loss, head=variant.head)
            rows += variant_rows
    return rows, pool


_TRAINING_KEYS = (
    "hidden",
    "standardize",
    "bce_off_label",
    "epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "seed",
)


def _model_table(paths: RunPaths, key: str) -> Path:
    return paths.probe_work / key / "rows.parquet"


def _model_pool(paths: RunPaths, key: str) -> Path:
    return paths.probe_work / key / "pool.csv"


def _model_outputs(config: StudyConfig, paths: RunPaths, key: str) -> list[Path]:
    return [_model_table(paths, key), _model_pool(paths, key)]


def _probe_model_inputs(config: StudyConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """What one model's probe depends on besides ``probe``: its backbone (the stages it comes from)."""
    return {
        "model": model_cfg.model_dump(mode="json"),
        "stages": {s: stage_hash(config, model_cfg, s) for s in ("0", "1", "2")},
    }


def probe_steps(config: StudyConfig, progress: bool = True) -> tuple[Step[StudyConfig], ...]:
    """The probing study: ``probe-data`` (the run's manifest, prepared when missing), one ``probe-{model}``
    step per model (heads trained, explained, scored; resumable per variant through ``probe/``), then
    ``probe-summary`` (the tables). Markers live in ``steps/`` beside the drift study's."""

    def run_data(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        load_study_data(config, paths)

    def run_model(model_cfg: ModelConfig) -> Callable[[StudyConfig, RunPaths, Context], None]:
        def run(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
            frame, classes = load_study_data(config, paths)
            rows, pool = probe_model(config, paths, model_cfg, frame, classes, ctx, progress)
            write_parquet_atomic(_model_table(paths, model_cfg.key), pd.DataFrame(rows))
            write_csv_atomic(_model_pool(paths, model_cfg.key), pd.DataFrame(pool))

        return run

    def run_summary(config: StudyConfig, paths: RunPaths, ctx: Context) -> None:
        write_probe_tables(config, paths)

    def summary_outputs(config: StudyConfig, paths: RunPaths) -> list[Path]:
        return [
            paths.probe_table,
            paths.probe_pool,
            paths.probe_summary,
            paths.probe_pairs,
            paths.probe_baseline,
        ]

    model_steps = [
        Step(
            f"probe-{m.key}",
            run_model(m),
            reads=("probe-data",),
            config=("probe", "seed", "train.deterministic"),
            inputs=partial(_probe_model_inputs, model_cfg=m),
            outputs=partial(_model_outputs, key=m.key),
        )
        for m in config.models
    ]
    return (
        Step("probe-data", run_data, config=("data",)),
        *model_steps,
        Step("probe-summary", run_summary, reads=tuple(s.name for s in model_steps), config=("stats",),
             outputs=summary_outputs),
    )  # fmt: skip


def write_probe_tables(config: StudyConfig, paths: RunPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``probe.parquet``, ``probe_pool.csv``, ``probe_summary.csv``, ``probe_pairs.csv`` and
    ``probe_vs_baseline.csv`` from the per-model tables; returns (summary, pairs)."""
    columns = ["arch", "variant", "loss", "head", "method", "unit", "unit_id", "target", "metric", "value"]
    parts = [pd.read_parquet(_model_table(paths, m.key)).assign(arch=m.key) for m in config.models]
    table = pd.concat(parts, ignore_index=True)[columns]
    pools = pd.concat([pd.read_csv(_model_pool(paths, m.key)) for m in config.models], ignore_index=True)
    write_parquet_atomic(paths.probe_table, table)
    write_csv_atomic(paths.probe_pool, pools)
    summary, pairs = summarize_probe(table, config)
    write_csv_atomic(paths.probe_summary, summary)
    write_csv_atomic(paths.probe_pairs, pairs)
    baseline = versus_baseline(
        table, BASELINE, config.stats.n_boot, config.stats.ci, config.stats.seed, config.stats.alpha
    )
    write_csv_atomic(paths.probe_baseline, baseline)
    return summary, pairs


def run_probe(
    config: StudyConfig,
    paths: RunPaths,
    progress: bool = True,
    force: Iterable[str] = (),
    until: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The probing study for every model of ``config`` on the step runner (``probe_steps``): writes
    ``probe.parquet``, ``probe_summary.csv``, ``probe_pairs.csv``, ``probe_pool.csv`` and
    ``probe_vs_baseline.csv`` into the run directory; returns (summary, pairs). Done steps are skipped."""
    from evidrift.core.distributed import resolve_device

    for name in config.probe.methods:
        resolve_probe_method(name)  # fail before any training
    ctx = Context(device=resolve_device(config.train.device))
    run_steps(probe_steps(config, progress), config, paths, ctx, force=force, until=until, echo=echo)
    return pd.read_csv(paths.probe_summary), pd.read_csv(paths.probe_pairs)


def quick_config(out: str | os.PathLike[str]) -> StudyConfig:
    """The ``--quick`` study of ``evidrift probe`` / ``evidrift sanity``: the quick demo preset
    (``presets.demo_config(quick=True)``: 60 phantoms, resnet18 at 64 px, one stage-0 epoch; a rerun in the
    same folder reuses its stage 0) with short probes (20 epochs, hidden width 64, four heads, 4 IG steps,
    10 grids of each size) and 8 images for the sanity checks. Its backbone classifies near chance, so its
    grids take any test image (``grid_pool: all``): a smoke run of every step, not a result."""
    from evidrift.studies.drift.presets import demo_config

    config = demo_config(quick=True, out=Path(out).resolve())
    config.probe = ProbeConfig(
        epochs=20,
        n_grids=10,
        batch_size=16,
        grid_pool="all",
        hidden=64,
        heads=["linear", "linear_nobias", "mlp2", "bcos2"],
        ig_steps=4,
    )
    config.sanity = SanityConfig(n_images=8, methods=["gradcam", "layercam"])
    return config


def probing_config(
    study: str | os.PathLike[str] | None, quick: bool, out: str | os.PathLike[str] | None
) -> StudyConfig:
    """The study of ``evidrift probe`` / ``evidrift sanity``: the ``--quick`` preset (into ``out``, default
    ``runs/probe-quick``) or the study file with ``out`` overriding its ``output.dir``. Raises ConfigError
    when both or neither are given."""
    if quick:
        if study is not None:
            raise ConfigError(f"give either a study file ({study}) or --quick, not both")
        return quick_config(out or "runs/probe-quick")
    if study is None:
        raise ConfigError("give a study file (e.g. `evidrift probe study.yaml`) or --quick [--out DIR]")
    config = load_config(study)
    if out is not None:
        config.output.dir = Path(out).resolve()
    return config
