"""The run directory: its paths, atomic writes, the config hash, and the maps store (DESIGN § 3).

Every file a run writes goes through this module: a temporary file in the same folder, flushed and fsynced,
then ``os.replace`` onto the final name, so a reader never sees a half-written file and a killed process
leaves at worst a stray ``.tmp-*`` file that the next run ignores.

Maps store: ``run/maps/{arch}/stage{s}/{method}.part{k:05d}.safetensors``; each shard holds one tensor
``maps`` [n, h, w] float16 (≥ 0, each map divided by its own maximum, so in [0, 1]) and, in the safetensors
metadata, ``ids`` (JSON list of image ids, one per map), ``scales`` (JSON list of each map's maximum before
scaling: raw map = stored map × scale), ``layer``, ``arch``, ``stage``, ``method`` and any extra string
fields. Scaling first keeps float16's 11 significant bits for every map: raw maps of ``score: softmax`` are
~1e-6, float16 subnormals, where a map and its stored copy would disagree. Every metric is invariant to a
positive scale. ``read_maps`` concatenates the shards in shard order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

MAPS_SHARD_SUFFIX = ".safetensors"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, else removed.

    Usage: ``with atomic_path(out) as tmp: write_to(tmp)``. The parent folder is created if needed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts are shared like any file
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as Parquet (index dropped) atomically; returns the path."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_csv_atomic(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (index dropped) atomically; returns the path."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_safetensors_atomic(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save contiguous CPU copies of ``tensors`` as safetensors atomically; metadata values must be str."""
    payload = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line, rewriting the file atomically (files stay small: one line per epoch)."""
    target = Path(path)
    previous = target.read_text(encoding="utf-8") if target.exists() else ""
    write_text_atomic(target, previous + json.dumps(dict(record), sort_keys=True, default=str) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file; [] when it does not exist."""
    target = Path(path)
    if not target.exists():
        return []
    return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]


def config_hash(resolved: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of a resolved config mapping."""
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run directory (DESIGN § 3). Pure path arithmetic: nothing is created."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> RunPaths:
        return cls(Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data_dir / "manifest.parquet"

    def model_dir(self, arch: str) -> Path:
        return self.root / "models" / arch

    def checkpoint(self, arch: str, stage: int | str) -> Path:
        """``models/{arch}/stage{stage}.safetensors`` (its JSON sidecar: ``.with_suffix('.json')``)."""
        return self.model_dir(arch) / f"stage{stage}.safetensors"

    def train_metrics(self, arch: str) -> Path:
        return self.model_dir(arch) / "metrics.jsonl"

    def eval_table(self, arch: str) -> Path:
        return self.root / "eval" / f"{arch}.parquet"

    def maps_dir(self, arch: str, stage: int | str) -> Path:
        return self.root / "maps" / arch / f"stage{stage}"

    def maps_shard(self, arch: str, stage: int | str, method: str, shard: int) -> Path:
        return self.maps_dir(arch, stage) / f"{safe_name(method)}.part{shard:05d}{MAPS_SHARD_SUFFIX}"

    @property
    def drift(self) -> Path:
        return self.root / "drift.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def rankings(self) -> Path:
        return self.root / "rankings.csv"

    @property
    def reversals(self) -> Path:
        return self.root / "reversals.csv"

    @property
    def reversals_summary(self) -> Path:
        return self.root / "reversals_summary.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def step_marker(self, step: str) -> Path:
        """``steps/{step}.json``: written last by a step, holding the config hash it ran with."""
        return self.root / "steps" / f"{step}.json"


def safe_name(method: str) -> str:
    """A method or layer name as a file-name part: ``gradcam++`` → ``gradcam++``, ``a/b`` → ``a_b``."""
    return "".join(c if (c.isalnum() or c in "+-_.@=") else "_" for c in method)


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
        raise FileNotFoundError(
            f"no maps for arch={arch!r} stage={stage} method={method!r} in {paths.maps_dir(arch, stage)}; "
            "run `evidrift explain study.yaml` first"
        )
    parts, ids, scales, metadata = [], [], [], {}
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
