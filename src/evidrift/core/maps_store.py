"""The maps store: CAM (and attention) maps of a run on disk (ARCHITECTURE §3).

``run/maps/{arch}/stage{s}/{method}.part{k:05d}.safetensors``; each shard holds one tensor ``maps``
[n, h, w] float16 (≥ 0, each map divided by its own maximum, so in [0, 1]) and, in the safetensors metadata,
``ids`` (JSON list of image ids, one per map), ``scales`` (JSON list of each map's maximum before scaling:
raw map = stored map × scale), ``layer``, ``arch``, ``stage``, ``method`` and any extra string fields.
Scaling first keeps float16's 11 significant bits for every map: raw maps of ``score: softmax`` are ~1e-6,
float16 subnormals, where a map and its stored copy would disagree. Every metric is invariant to a positive
scale. ``read_maps`` concatenates the shards in shard order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from evidrift.core.errors import MissingInputError
from evidrift.core.io import save_safetensors_atomic
from evidrift.core.paths import MAPS_SHARD_SUFFIX, RunPaths, safe_name


def write_maps_shard(
    paths: RunPaths,
    arch: str,
    stage: int | str,
    method: str,
    shard: int,
    maps: torch.Tensor,
    ids: Sequence[str],
    layer: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write one maps shard: ``maps`` [n, h, w] (negatives clipped to 0, each map divided by its maximum,
    stored float16; the maxima go to the ``scales`` metadata), ``ids`` (n str).

    Raises ValueError when the counts differ or the maps are not 3-D.
    """
    if maps.ndim != 3:
        raise ValueError(
            f"maps for {arch}/stage{stage}/{method} must be [n, h, w], got shape {tuple(maps.shape)}"
        )
    if len(ids) != maps.shape[0]:
        raise ValueError(
            f"{len(ids)} ids for {maps.shape[0]} maps in {arch}/stage{stage}/{method} shard {shard}"
        )
    clipped = maps.detach().float().clamp_min(0).nan_to_num(nan=0.0, posinf=torch.finfo(torch.float32).max)
    scales = clipped.flatten(1).amax(dim=1) if clipped.numel() else torch.zeros(clipped.shape[0])
    stored = (clipped / torch.where(scales > 0, scales, 1.0)[:, None, None]).to(torch.float16)
    metadata = {
        "ids": json.dumps([str(i) for i in ids]),
        "scales": json.dumps([float(v) for v in scales.tolist()]),
        "layer": layer,
        "arch": arch,
        "stage": str(stage),
        "method": method,
        **(dict(extra) if extra else {}),
    }
    return save_safetensors_atomic(paths.maps_shard(arch, stage, method, shard), {"maps": stored}, metadata)


def maps_shards(paths: RunPaths, arch: str, stage: int | str, method: str) -> list[Path]:
    """The completed shards of one (arch, stage, method), in shard order (temporary files excluded)."""
    folder = paths.maps_dir(arch, stage)
    prefix = f"{safe_name(method)}.part"
    if not folder.exists():
        return []
    return sorted(
        p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(MAPS_SHARD_SUFFIX)
    )


def read_maps_shard(path: Path) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """One shard: (maps float16 [n, h, w] in [0, 1], ids, metadata)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        maps = handle.get_tensor("maps")
    ids = json.loads(metadata.pop("ids", "[]"))
    return maps, ids, metadata


def read_maps(
    paths: RunPaths, arch: str, stage: int | str, method: str
) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """All shards of one (arch, stage, method) concatenated: (maps float16 [N, h, w] in [0, 1], ids,
    metadata); ``metadata["scales"]`` is the JSON list of all N maps' maxima (absent in stores written
    before maps were scaled).

    Raises FileNotFoundError naming the folder when there is no shard (run ``evidrift explain`` first).
    """
    shards = maps_shards(paths, arch, stage, method)
    if not shards:
        raise MissingInputError(
            f"no maps for arch={arch!r} stage={stage} method={method!r} in {paths.maps_dir(arch, stage)}; "
            "run `evidrift explain study.yaml` first"
        )
    parts: list[torch.Tensor] = []
    ids: list[str] = []
    scales: list[float] = []
    metadata: dict[str, str] = {}
    for shard in shards:
        maps, shard_ids, metadata = read_maps_shard(shard)
        parts.append(maps)
        ids.extend(shard_ids)
        if "scales" in metadata:
            scales.extend(json.loads(metadata["scales"]))
    if len(scales) == len(ids):
        metadata["scales"] = json.dumps(scales)
    else:
        metadata.pop("scales", None)
    return torch.cat(parts, dim=0), ids, metadata


def stored_methods(paths: RunPaths, arch: str, stage: int | str) -> list[str]:
    """Method names present in the maps store of one (arch, stage), from the shards' metadata."""
    folder = paths.maps_dir(arch, stage)
    if not folder.exists():
        return []
    names = set()
    for shard in folder.glob(f"*.part*{MAPS_SHARD_SUFFIX}"):
        if not shard.name.startswith(".tmp-"):
            with safe_open(str(shard), framework="pt") as handle:
                names.add((handle.metadata() or {}).get("method", shard.name.split(".part")[0]))
    return sorted(names)
