"""Head probing study ("How to Probe", Gairola et al.): how the classifier head's training changes the maps.

On one frozen backbone (pretrained weights, or the run's stage-0 checkpoint), a head is trained for every
variant ``loss × head`` — losses ``ce`` and ``bce`` (uniform off-labels, targets max(onehot, 1/C)), heads
``linear``, ``linear_nobias``, ``mlp2``, ``mlp3`` — with the same budget and seed, on cached backbone
features. Each variant is then explained with every CAM method and scored:

- ``correct``: per test image, 1 if the variant classifies it correctly (its mean is the accuracy);
- ``gridpg@n``: GridPG on n × n grids. A grid tiles n² test images (downscaled) into one input of the
  model's size, one image per class, each image classified correctly with probability ≥ ``confidence`` by
  *every* variant (so all variants are scored on the same grids); when the data has fewer classes than
  cells, the remaining cells are blank (value 0 after normalization, the mean intensity) and are never
  targets. For each image of a grid the map for its class, upsampled to the input size and smoothed by a
  ``smoothing`` × ``smoothing`` average pool, is scored by the share of its positive mass inside the image's
  cell (1 = perfect, 1/n² = a uniform map);
- ``pointing_game``, ``energy_pointing_game``: against the lesion masks, on test images whose mask is not
  empty (target = the label);
- ``entropy``, ``gini``: concentration of each test image's map (target = the label).

The frozen backbone is run once: the CAM layer's activations A (the backbone's output, checked numerically)
are cached for the test images and the grids, and each variant's maps come from ``CAMEngine`` applied to
``head(A)`` — exactly the maps of the full model, since gradients of a head-only change stop at A.

Outputs (run directory): ``probe.parquet`` (one row per arch, variant, method, unit, metric),
``probe_summary.csv`` (mean and bootstrap CI per arch, variant, method, metric), ``probe_pairs.csv``
(paired Wilcoxon tests between variants on shared units, Holm-corrected), ``figures/probe_*.png``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evidrift import models
from evidrift.artifacts import (
    RunPaths,
    config_hash,
    save_safetensors_atomic,
    write_csv_atomic,
    write_parquet_atomic,
)
from evidrift.cam import CAMEngine, upsample
from evidrift.config import (
    ConfigError,
    HeadConfig,
    ModelConfig,
    ProbeConfig,
    SanityConfig,
    StageConfig,
    StudyConfig,
    load_config,
)
from evidrift.distributed import Context
from evidrift.evaluate import TensorFeed, probabilities
from evidrift.metrics import complexity, localization
from evidrift.probe_grids import GridSpec, sample_grids, smooth_maps, tile_grid
from evidrift.probe_stats import summarize_probe
from evidrift.train import StageFiles, determinism, fit, image_size_for, stage_hash, train_stage, uses_stage0

logger = logging.getLogger("evidrift.probe")

LOSSES: tuple[str, ...] = ("ce", "bce")
HEADS: tuple[str, ...] = ("linear", "linear_nobias", "mlp2", "mlp3")


@dataclass(frozen=True)
class ProbeVariant:
    """One head variant: ``loss`` (ce | bce) × ``head`` (linear | linear_nobias | mlp2 | mlp3)."""

    loss: str
    head: str

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"probe loss {self.loss!r} is not one of {list(LOSSES)}")
        if self.head not in HEADS:
            raise ValueError(f"probe head {self.head!r} is not one of {list(HEADS)}")

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.head}"

    def head_config(self, hidden: int = 256) -> HeadConfig:
        """The ``HeadConfig`` that ``models.build_head`` builds this head from."""
        if self.head == "linear_nobias":
            return HeadConfig(type="linear", bias=False, hidden=hidden)
        return HeadConfig(type=self.head, bias=True, hidden=hidden)


def probe_variants(losses: Sequence[str], heads: Sequence[str]) -> list[ProbeVariant]:
    """Every ``loss × head`` variant, losses outer."""
    return [ProbeVariant(loss, head) for loss in losses for head in heads]


# --- probabilities and confident images ---------------------------------------------------------------------
def confident_correct(
    logits_per_variant: Sequence[torch.Tensor], losses: Sequence[str], labels: torch.Tensor, threshold: float
) -> torch.Tensor:
    """bool [N]: images that EVERY variant classifies correctly with probability of the label ≥ ``threshold``
    (softmax for ``ce`` heads, sigmoid for ``bce`` heads: each head's own probability model).

    ``logits_per_variant``: one [N, C] tensor per variant; ``labels`` int64 [N].
    """
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    for logits, loss in zip(logits_per_variant, losses, strict=True):
        probs = probabilities(logits, loss)
        correct = logits.argmax(dim=1) == labels
        confident = probs.gather(1, labels[:, None])[:, 0] >= threshold
        keep &= correct & confident
    return keep


# --- explaining a head on cached activations ----------------------------------------------------------------
class HeadOnFeatures(nn.Module):
    """The model's head applied to cached CAM-layer activations: A [B, K, h, w] → logits [B, C].

    ``features`` (an identity) is the CAM layer: hooked by ``CAMEngine``, it sees the same A and
    d score / dA as the model's own last feature layer does, so the maps equal the full model's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.model = model

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.features(activations))


# --- the study ----------------------------------------------------------------------------------------------
#: Files of the probing study in the run directory.
PROBE_FILES: dict[str, str] = {
    "table": "probe.parquet",
    "summary": "probe_summary.csv",
    "pairs": "probe_pairs.csv",
    "work": "probe",
}


@dataclass
class CachedSplit:
    """Backbone outputs of one split: ``pooled`` [N, F] (the head's input), ``labels`` [N] int64, and for the
    test split ``activations`` [N, K, h, w] at the CAM layer, ``ids`` and lesion ``masks`` [N, S, S] bool."""

    pooled: torch.Tensor
    labels: torch.Tensor
    activations: torch.Tensor | None = None
    ids: list[str] | None = None
    masks: torch.Tensor | None = None


def cam_layer_is_backbone_output(model: nn.Module, layer: str, x: torch.Tensor) -> bool:
    """True when the output of module ``layer`` equals ``model.forward_features(x)`` (so that the head is all
    that lies between the CAM layer and the logits, and cached activations can be explained)."""
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach())
    )
    try:
        with torch.no_grad():
            features = model.forward_features(x)
    finally:
        handle.remove()
    return bool(captured) and captured[-1].shape == features.shape and torch.equal(captured[-1], features)


@torch.no_grad()
def cache_split(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    activations: bool,
    desc: str,
    progress: bool = True,
) -> CachedSplit:
    """Run the frozen backbone once over ``dataset`` (items: ``image``, ``label``, ``id``, optional ``mask``).

    ``activations``: also keep ``forward_features`` [N, K, h, w] float32, the ids and the masks (bool).
    """
    model.eval()
    pooled, labels, acts, ids, masks = [], [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for item in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        features = model.forward_features(item["image"].to(device))
        pooled.append(model.forward_head(features, pre_logits=True).flatten(1).float().cpu())
        labels.append(torch.as_tensor(item["label"]).long())
        if activations:
            acts.append(features.float().cpu())
            ids += [str(i) for i in item["id"]]
            if "mask" in item:
                masks.append(item["mask"] > 0.5)
    if not pooled:
        raise ValueError(f"{desc}: no images (check the manifest's splits)")
    return CachedSplit(
        pooled=torch.cat(pooled),
        labels=torch.cat(labels),
        activations=torch.cat(acts) if activations else None,
        ids=ids if activations else None,
        masks=torch.cat(masks) if masks else None,
    )


def head_stage_config(probe: ProbeConfig) -> StageConfig:
    """The optimisation budget every variant gets: ``probe.epochs`` epochs of AdamW at ``probe.lr`` (one
    warm-up epoch, cosine), no early stopping (equal budgets), best epoch by validation loss."""
    return StageConfig(
        epochs=probe.epochs,
        lr=probe.lr,
        weight_decay=probe.weight_decay,
        batch_size=probe.batch_size,
        warmup_epochs=1.0,
        patience=None,
        monitor="val_loss",
        cache_features=True,
    )


def train_probe_head(
    variant: ProbeVariant,
    train: CachedSplit,
    val: CachedSplit,
    num_classes: int,
    probe: ProbeConfig,
    work_dir: Path,
    tag: str,
    ctx: Context,
    label: str,
    progress: bool = True,
) -> nn.Module:
    """Train one variant's head on cached pooled features with ``train.fit`` (resumable, seeded by
    ``probe.seed``: every variant starts from the same RNG state); returns the head (best epoch, eval mode).

    Files under ``work_dir``: ``head.safetensors`` (final, its metadata ``tag`` marks it done),
    ``metrics.jsonl``, and while training ``head.last.pt`` / ``head.best.safetensors``.
    """
    files = StageFiles(
        final=work_dir / "head.safetensors",
        last=work_dir / "head.last.pt",
        best=work_dir / "head.best.safetensors",
        metrics=work_dir / "metrics.jsonl",
    )
    torch.manual_seed(probe.seed)
    head = models.build_head(train.pooled.shape[1], num_classes, variant.head_config(probe.hidden)).to(
        ctx.device
    )
    if files.final.is_file():
        with safe_open(str(files.final), framework="pt") as handle:
            if (handle.metadata() or {}).get("tag") == tag:
                head.load_state_dict({k: handle.get_tensor(k) for k in handle.keys()}, strict=True)
                return head.eval()
    val_feed = (
        TensorFeed(val.pooled, val.labels) if len(val.labels) else TensorFeed(train.pooled, train.labels)
    )
    fit(
        head,
        head,
        head,
        head,
        TensorFeed(train.pooled, train.labels),
        val_feed,
        head_stage_config(probe),
        variant.loss,
        ctx,
        files,
        tag,
        probe.seed,
        label,
        progress,
    )
    head.load_state_dict(load_file(str(files.best)), strict=True)
    save_safetensors_atomic(files.final, head.state_dict(), {"tag": tag, "variant": variant.name})
    files.best.unlink(missing_ok=True)
    files.last.unlink(missing_ok=True)
    return head.eval()


def iter_maps(
    net: nn.Module,
    layer: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    methods: Sequence[str],
    size: int,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Maps of ``net`` at ``layer`` for ``inputs`` [N, ...] and ``targets`` [N] int64, batch by batch.

    Yields (the batch's slice of N, {method: maps [b, size, size] float32 ≥ 0, upsampled bilinearly}); one
    ``CAMEngine`` forward + backward per batch serves every method.
    """
    with CAMEngine(net, layers=[layer]) as engine:
        for start in range(0, len(inputs), batch_size):
            part = slice(start, min(start + batch_size, len(inputs)))
            out = engine(inputs[part].to(device), targets[part].to(device), methods=list(methods))
            yield part, {m: upsample(out.maps[m].float(), (size, size)).cpu() for m in methods}


@dataclass
class GridSet:
    """The grids of one size: their inputs [G, ...] (activations or images) and specs."""

    n: int
    inputs: torch.Tensor
    specs: list[GridSpec]


def score_variant(
    net: nn.Module,
    layer: str,
    test_inputs: torch.Tensor,
    test: CachedSplit,
    grids: Sequence[GridSet],
    methods: Sequence[str],
    classes: Sequence[str],
    size: int,
    smoothing: int,
    batch_size: int,
    device: torch.device,
) -> list[dict[str, object]]:
    """Localization and complexity rows of one variant (``net`` with its head in place), every method.

    Test images (target = label): ``entropy`` and ``gini`` of every map, ``pointing_game`` and
    ``energy_pointing_game`` where the lesion mask is not empty. Grids: ``gridpg@n`` per (grid, image) on
    maps smoothed by ``smoothing``. Rows: method, unit (``image`` | ``grid{n}``), unit_id, target, metric,
    value.
    """
    rows: list[dict[str, object]] = []
    assert test.ids is not None
    for part, maps in iter_maps(net, layer, test_inputs, test.labels, methods, size, batch_size, device):
        ids, labels = test.ids[part], test.labels[part].tolist()
        masks = test.masks[part] if test.masks is not None else None
        lesion = masks.flatten(1).any(1) if masks is not None else torch.zeros(len(ids), dtype=torch.bool)
        for method, m in maps.items():
            scores = {"entropy": complexity.entropy(m), "gini": complexity.gini(m)}
            if lesion.any():
                assert masks is not None
                for name, fn in (
                    ("pointing_game", localization.pointing_game),
                    ("energy_pointing_game", localization.energy_pointing_game),
                ):
                    values = torch.full((len(ids),), float("nan"))
                    values[lesion] = fn(m[lesion], masks[lesion]).float().cpu()
                    scores[name] = values
            for metric, values in scores.items():
                for i, value in enumerate(values.tolist()):
                    if metric in ("pointing_game", "energy_pointing_game") and not lesion[i]:
                        continue
                    rows.append(
                        dict(
                            method=method,
                            unit="image",
                            unit_id=ids[i],
                            target=classes[labels[i]],
                            metric=metric,
                            value=float(value),
                        )
                    )
    for grid in grids:
        owner = torch.tensor([g for g, spec in enumerate(grid.specs) for _ in spec.images], dtype=torch.long)
        targets = torch.tensor([c for spec in grid.specs for c in spec.classes], dtype=torch.long)
        cells = torch.tensor([c for spec in grid.specs for c in spec.cells], dtype=torch.long)
        for part, maps in iter_maps(
            net, layer, grid.inputs[owner], targets, methods, size, batch_size, device
        ):
            for method, m in maps.items():
                values = localization.gridpg(smooth_maps(m, smoothing), cells[part], grid.n)
                for j, value in zip(range(part.start, part.stop), values.tolist(), strict=True):
                    spec = grid.specs[int(owner[j])]
                    rows.append(
                        dict(
                            method=method,
                            unit=f"grid{grid.n}",
                            unit_id=f"{spec.grid_id}/{int(cells[j])}",
                            target=classes[int(targets[j])],
                            metric=f"gridpg@{grid.n}",
                            value=float(value),
                        )
                    )
    return rows


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
    (``train.train_stage``, resumable); the checkpoint's own head is dropped."""
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
    models.freeze_backbone(model)
    return model.eval(), identity


def probe_model(
    config: StudyConfig,
    paths: RunPaths,
    model_cfg: ModelConfig,
    frame: pd.DataFrame,
    classes: list[str],
    ctx: Context,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Every variant of one model: train the heads, build the grids, explain and score (rows of
    ``probe.parquet`` without the ``arch`` column)."""
    from evidrift.data.dataset import ManifestDataset

    probe = config.probe
    key, device = model_cfg.key, ctx.device
    size = image_size_for(model_cfg, config.train.stage1)
    mean, std = models.normalization(model_cfg.arch)
    with determinism(config.train.deterministic and device.type == "cpu"):
        model, identity = probe_backbone(config, paths, model_cfg, len(classes), ctx, progress)
        layer = models.resolve_cam_layers(model, model_cfg.arch, model_cfg.cam_layers)[0]

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
        test_set = dataset(test_frame, with_mask=True)
        batch = probe.batch_size
        train = cache_split(
            model, dataset(_split(frame, "train")), batch, device, False, f"{key} train features", progress
        )
        val_frame = _split(frame, "val")
        if val_frame.empty:  # train_probe_head then validates on the training features
            val = CachedSplit(train.pooled[:0], train.labels[:0])
        else:
            val = cache_split(
                model, dataset(val_frame), batch, device, False, f"{key} val features", progress
            )
        test = cache_split(model, test_set, batch, device, True, f"{key} test activations", progress)
        probe_x = torch.stack([test_set[i]["image"] for i in range(min(2, len(test_set)))]).to(device)
        fast = cam_layer_is_backbone_output(model, layer, probe_x)
        assert test.activations is not None

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
            head = train_probe_head(
                variant,
                train,
                val,
                len(classes),
                probe,
                paths.root / PROBE_FILES["work"] / key / variant.name,
                tag,
                ctx,
                f"{key} probe {variant.name}",
                progress,
            )
            heads[variant.name] = head
            with torch.no_grad():
                logits[variant.name] = head(test.pooled.to(device)).float().cpu()

        eligible = confident_correct(
            [logits[v.name] for v in variants], [v.loss for v in variants], test.labels, probe.confidence
        )
        if probe.grid_pool == "all":
            eligible = torch.ones_like(eligible)
        grid_sets = []
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
            images = torch.stack(
                [
                    tile_grid(torch.stack([test_set[i]["image"] for i in spec.images]), spec.cells, n)
                    for spec in specs
                ]
            )
            if fast:
                with torch.no_grad():
                    images = torch.cat(
                        [
                            model.forward_features(images[i : i + batch].to(device)).float().cpu()
                            for i in range(0, len(images), batch)
                        ]
                    )
            grid_sets.append(GridSet(n, images, specs))

        if fast:
            net, cam_layer, test_inputs = HeadOnFeatures(model), "features", test.activations
        else:
            logger.info(
                "%s: CAM layer %s is not the backbone output; explaining through the full model", key, layer
            )
            net, cam_layer = model, layer
            test_inputs = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
        rows: list[dict[str, object]] = []
        head_path = models.head_name(model)
        for variant in tqdm(variants, desc=f"{key} explain variants", leave=False, disable=not progress):
            model.set_submodule(head_path, heads[variant.name])
            model.eval()
            correct = (logits[variant.name].argmax(1) == test.labels).float().tolist()
            variant_rows = [
                dict(
                    method="-",
                    unit="image",
                    unit_id=test.ids[i],
                    target=classes[int(test.labels[i])],
                    metric="correct",
                    value=c,
                )
                for i, c in enumerate(correct)
            ]
            variant_rows += score_variant(
                net,
                cam_layer,
                test_inputs,
                test,
                grid_sets,
                probe.methods,
                classes,
                size,
                probe.smoothing,
                batch,
                device,
            )
            for row in variant_rows:
                row.update(variant=variant.name, loss=variant.loss, head=variant.head)
            rows += variant_rows
    return rows


_TRAINING_KEYS = ("hidden", "epochs", "lr", "weight_decay", "batch_size", "seed")


def run_probe(
    config: StudyConfig, paths: RunPaths, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The probing study for every model of ``config``: writes ``probe.parquet``, ``probe_summary.csv`` and
    ``probe_pairs.csv`` into the run directory; returns (summary, pairs)."""
    from evidrift.distributed import resolve_device

    ctx = Context(device=resolve_device(config.train.device))
    frame, classes = load_study_data(config, paths)
    rows: list[dict[str, object]] = []
    for model_cfg in config.models:
        for row in probe_model(config, paths, model_cfg, frame, classes, ctx, progress):
            rows.append({"arch": model_cfg.key, **row})
    columns = ["arch", "variant", "loss", "head", "method", "unit", "unit_id", "target", "metric", "value"]
    table = pd.DataFrame(rows)[columns]
    write_parquet_atomic(paths.root / PROBE_FILES["table"], table)
    summary, pairs = summarize_probe(table, config)
    write_csv_atomic(paths.root / PROBE_FILES["summary"], summary)
    write_csv_atomic(paths.root / PROBE_FILES["pairs"], pairs)
    return summary, pairs


def quick_config(out: str | os.PathLike[str]) -> StudyConfig:
    """The ``--quick`` study of ``evidrift probe`` / ``evidrift sanity``: the quick demo preset
    (``presets.demo_config(quick=True)``: 60 phantoms, resnet18 at 64 px, one stage-0 epoch; a rerun in the
    same folder reuses its stage 0) with short probes (20 epochs, 10 grids of each size) and 8 images for
    the sanity checks. Its backbone classifies near chance, so its grids take any test image
    (``grid_pool: all``): a smoke run of every step, not a result."""
    from evidrift.presets import demo_config

    config = demo_config(quick=True, out=Path(out).resolve())
    config.probe = ProbeConfig(
        epochs=20, n_grids=10, batch_size=16, grid_pool="all", methods=["gradcam", "layercam"]
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
