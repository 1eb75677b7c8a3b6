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
positive scale. ``read_maps`` concatenates the shards in shard order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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


MAPS_SHARD_SUFFIX = ".safetensors"
