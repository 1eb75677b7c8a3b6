"""The explain step (``evidrift explain study.yaml``): a stage checkpoint's maps of the selected test images.

For one (arch, stage): the checkpoint is loaded, the test images chosen by ``explain.samples`` (ARCHITECTURE
§4:
``tp_both`` = correctly classified at both stages, ``tp_any``, ``all``; from ``run/eval/{arch}.parquet``;
capped by ``explain.max_images``, in manifest order) are streamed in batches through ``CAMEngine`` and the
maps are written to the maps store (ARCHITECTURE §3) in shards of ``explain.shard_size`` images:
``maps/{arch}/stage{s}/{name}.part{k}.safetensors``; ``name`` is the method (with several CAM layers:
``{method}@{layer}`` with the layer as the study names it, e.g. ``gradcam@spatial``; ``ms-*`` fusions keep
their name). Each shard's metadata holds the ids, layer(s),
the method (``cam_method``) and the layer as the study names it (``layer_key``: ``default``, ``spatial``, …),
``input_size``, ``target``/``score``, the explained classes (``targets``), degenerate flags and a ``tag``
(hash of the explain settings, layers, weights and input size).

Resumable: a shard whose files all exist with the expected ids and tag is skipped, so a killed run redoes at
most one shard. Memory holds one shard of maps, never the dataset. Under ``torchrun`` rank r explains the
shards k ≡ r (mod world size); shard numbers are global, so the ranks' shards together form one store in
manifest order. ``cam/`` knows nothing of files: this module is the bridge.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from evidrift.core import distributed
from evidrift.core.errors import MissingInputError, UsageError
from evidrift.core.io import config_hash
from evidrift.core.maps_store import maps_shards, read_maps_shard, write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.studies.config import StudyConfig

logger = logging.getLogger("evidrift.studies.drift.explain")


@dataclass(frozen=True)
class ExplainSummary:
    """What one ``explain_run`` did on this process."""

    arch: str
    stage: int
    n_images: int
    n_shards: int
    written: int
    skipped: int


def select_samples(
    test: pd.DataFrame, table: pd.DataFrame | None, samples: str, max_images: int | None
) -> pd.DataFrame:
    """Rows of the ``test`` manifest frame to explain, in manifest order.

    ``all``: every row. ``tp_both`` / ``tp_any``: rows whose id the evaluation ``table`` (columns id, label,
    pred_stage1, pred_stage2) marks correct at both / at least one stage. Raises ValueError when the table
    is needed but missing, or for an unknown rule.
    """
    if samples == "all":
        chosen = test
    elif samples in ("tp_both", "tp_any"):
        if table is None:
            raise UsageError(
                f"explain.samples={samples!r} needs the evaluation table; run the evaluate step first"
            )
        ok1 = table["pred_stage1"].astype(int) == table["label"].astype(int)
        ok2 = table["pred_stage2"].astype(int) == table["label"].astype(int)
        keep = ok1 & ok2 if samples == "tp_both" else ok1 | ok2
        ids = set(table.loc[keep, "id"].astype(str))
        chosen = test[test["id"].astype(str).isin(ids)]
    else:
        raise UsageError(f"explain.samples must be tp_both, tp_any or all; got {samples!r}")
    chosen = chosen.reset_index(drop=True)
    return chosen.iloc[:max_images].reset_index(drop=True) if max_images is not None else chosen


def store_names(methods: Sequence[str], layers: Sequence[str] | dict[str, str]) -> dict[Any, str]:
    """Engine map key → maps-store name (module docstring). ``layers``: the dotted layers, or dotted layer →
    the name the study gave it (``cam_layer_keys``), which then names the map set (``gradcam@spatial``), so
    that one name means the same role in every architecture."""
    keys = dict(layers) if isinstance(layers, dict) else {layer: layer for layer in layers}
    from evidrift.cam.methods import FUSION_PREFIX, method_spec

    names: dict[Any, str] = {}
    for method in methods:
        spec = method_spec(method)
        at_input = spec.kind == "input" or method in ("integrated_gradients", "smoothgrad", "lrp")
        if method.startswith(FUSION_PREFIX) or at_input or len(layers) == 1:
            names[method] = method
        else:
            for layer, key in keys.items():
                names[(layer, method)] = f"{method}@{key}"
    return names


def _shard_complete(
    paths: RunPaths, arch: str, stage: int, names: Sequence[str], shard: int, ids: list[str], tag: str
) -> bool:
    for name in names:
        file = paths.maps_shard(arch, stage, name, shard)
        if not file.is_file():
            return False
        try:
            _, stored_ids, meta = read_maps_shard(file)
        except Exception as exc:  # a truncated or foreign file: redo the shard, say so
            logger.warning("redoing %s: unreadable (%s)", file, exc)
            return False
        if stored_ids != ids or meta.get("tag") != tag:
            return False
    return True


def _remove_extra_shards(paths: RunPaths, arch: str, stage: int, names: Sequence[str], n_shards: int) -> None:
    """Shards numbered ≥ n_shards (left by a larger earlier selection) would join the store: remove them."""
    for name in names:
        for file in maps_shards(paths, arch, stage, name):
            index = int(file.name.rsplit(".part", 1)[1].split(".")[0])
            if index >= n_shards:
                file.unlink()


def explain_run(
    config: StudyConfig,
    paths: RunPaths,
    arch: str,
    stage: int | str,
    ctx: distributed.Context | None = None,
    progress: bool = True,
) -> ExplainSummary:
    """Write the maps of ``arch`` (a model key of the study) at ``stage`` (1 or 2); see the module docstring.

    Raises ValueError for an arch not in the study or a bad CAM layer/method, FileNotFoundError for a missing
    checkpoint, manifest or (for ``tp_*`` samples) evaluation table.
    """
    from torch.utils.data import DataLoader

    from evidrift.cam import CAMEngine, resolve_method
    from evidrift.classifier.checkpoint import file_sha256, load_checkpoint
    from evidrift.classifier.models import cam_layer_keys
    from evidrift.data.dataset import ManifestDataset
    from evidrift.data.sources import load_manifest

    stage = int(stage)
    model_cfg = next((m for m in config.models if m.key == arch), None)
    if model_cfg is None:
        raise UsageError(
            f"arch {arch!r} is not a model of the study; the models are {[m.key for m in config.models]}"
        )
    cfg = config.explain
    methods = [resolve_method(m) for m in cfg.methods]
    ctx = ctx or distributed.setup(config.train.device)
    checkpoint = paths.checkpoint(arch, stage)
    model, meta = load_checkpoint(checkpoint, map_location=ctx.device)
    layer_keys = cam_layer_keys(model, meta.arch or model_cfg.arch, model_cfg.cam_layers)
    layers = list(layer_keys)
    names = store_names(methods, layer_keys)

    frame, classes = load_manifest(paths)
    test = frame[(frame["split"] == "test") & (frame["status"] == "ok")].reset_index(drop=True)
    table_path = paths.eval_table(arch)
    if cfg.samples != "all" and not table_path.is_file():
        raise MissingInputError(f"{table_path} does not exist; run the evaluate step first (`evidrift run`)")
    table = pd.read_parquet(table_path) if cfg.samples != "all" else None
    chosen = select_samples(test, table, cfg.samples, cfg.max_images)
    ids = chosen["id"].astype(str).tolist()
    size, mean, std = meta.preprocessing(checkpoint)
    tag = config_hash(
        {
            "explain": cfg.model_dump(mode="json"),
            "layers": layers,
            "weights": meta.weights_sha256 or file_sha256(checkpoint),
            "size": size,
        }
    )
    n_shards = -(-len(ids) // cfg.shard_size)
    if ctx.is_main:
        _remove_extra_shards(paths, arch, stage, list(names.values()), n_shards)
    if not ids:
        logger.warning(
            "%s stage %d: no test image matches explain.samples=%s; nothing to explain",
            arch,
            stage,
            cfg.samples,
        )
        return ExplainSummary(arch, stage, 0, 0, 0, 0)

    mine = list(range(ctx.rank, n_shards, ctx.world_size))
    todo = []
    for shard in mine:
        wanted = ids[shard * cfg.shard_size : (shard + 1) * cfg.shard_size]
        if not _shard_complete(paths, arch, stage, list(names.values()), shard, wanted, tag):
            todo.append(shard)
    n_mine = sum(len(ids[s * cfg.shard_size : (s + 1) * cfg.shard_size]) for s in mine)
    n_todo = sum(len(ids[s * cfg.shard_size : (s + 1) * cfg.shard_size]) for s in todo)
    dataset = ManifestDataset(chosen, classes, size, resize=config.data.resize, mean=mean, std=std)
    bar = tqdm(
        total=n_mine,
        initial=n_mine - n_todo,
        desc=f"explain {arch} stage{stage}",
        unit="img",
        disable=not progress,
        leave=False,
    )
    base = {
        "input_size": json.dumps([size, size]),
        "target": cfg.target,
        "score": cfg.score,
        "tag": tag,
        "methods": json.dumps(methods),
    }
    with CAMEngine(model, layers, seed=config.seed) as engine:
        for shard in todo:
            start = shard * cfg.shard_size
            subset = torch.utils.data.Subset(dataset, range(start, min(start + cfg.shard_size, len(ids))))
            loader = DataLoader(
                subset, batch_size=cfg.batch_size, shuffle=False, num_workers=config.train.num_workers
            )
            parts: dict[Any, list[torch.Tensor]] = {key: [] for key in names}
            flags: dict[Any, list[torch.Tensor]] = {key: [] for key in names}
            shard_ids: list[str] = []
            targets: list[torch.Tensor] = []
            for batch in loader:
                x = batch["image"].to(ctx.device)
                labels = batch["label"].to(ctx.device)
                out = engine(x, cfg.target, methods=methods, score=cfg.score, labels=labels)
                for key in names:
                    parts[key].append(out.maps[key].detach().to("cpu", torch.float32))  # scaled, then fp16
                    flags[key].append(out.degenerate[key].cpu())
                targets.append(out.targets.cpu())
                shard_ids.extend(str(i) for i in batch["id"])
                bar.update(x.shape[0])
            explained = json.dumps(torch.cat(targets).tolist())
            for key, name in names.items():
                layer = "+".join(layers) if isinstance(key, str) else key[0]
                extra = {
                    **base,
                    "cam_method": key if isinstance(key, str) else key[1],
                    "layer_key": (
                        "+".join(layer_keys.values()) if isinstance(key, str) else layer_keys[key[0]]
                    ),
                    "targets": explained,
                    "degenerate": json.dumps(torch.cat(flags[key]).tolist()),
                }
                write_maps_shard(
                    paths, arch, stage, name, shard, torch.cat(parts[key]), shard_ids, layer, extra
                )
    bar.close()
    return ExplainSummary(arch, stage, len(ids), n_shards, len(todo), len(mine) - len(todo))
