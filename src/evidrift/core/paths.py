"""``RunPaths``: every path of a run directory (ARCHITECTURE §3), as pure path arithmetic (nothing is
created). No module builds a run-directory path by hand; a new artifact gets a property here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run directory (ARCHITECTURE §3). Pure path arithmetic: nothing is created."""

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
        return self.models_dir / arch

    def checkpoint(self, arch: str, stage: int | str) -> Path:
        """``models/{arch}/stage{stage}.safetensors`` (its JSON sidecar: ``.with_suffix('.json')``)."""
        return self.model_dir(arch) / f"stage{stage}.safetensors"

    def train_metrics(self, arch: str) -> Path:
        return self.model_dir(arch) / "metrics.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_table(self, arch: str) -> Path:
        return self.eval_dir / f"{arch}.parquet"

    @property
    def classification(self) -> Path:
        """``eval/classification.csv``: accuracy, macro-F1, macro AUROC with CIs per arch × stage."""
        return self.eval_dir / "classification.csv"

    @property
    def accuracy_change(self) -> Path:
        """``eval/accuracy_change.csv``: the paired stage-1 → stage-2 accuracy change per arch (McNemar)."""
        return self.eval_dir / "accuracy_change.csv"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def maps_root(self) -> Path:
        return self.root / "maps"

    def maps_dir(self, arch: str, stage: int | str) -> Path:
        return self.maps_root / arch / f"stage{stage}"

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
    def equivalence(self) -> Path:
        return self.root / "equivalence.csv"

    @property
    def tests(self) -> Path:
        return self.root / "tests.csv"

    @property
    def kendall(self) -> Path:
        return self.root / "kendall.csv"

    @property
    def localization(self) -> Path:
        return self.root / "localization.parquet"

    @property
    def localization_summary(self) -> Path:
        return self.root / "localization_summary.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    # --- `evidrift compare` ------------------------------------------------------------------------------
    @property
    def band_dir(self) -> Path:
        """``band/``: the noise band's run (its maps and per-image drift) of a comparison."""
        return self.root / "band"

    @property
    def gate_dir(self) -> Path:
        """``gate/``: a comparison's verdicts.json and where-tables."""
        return self.root / "gate"

    # --- the probe and sanity studies (``evidrift probe`` / ``evidrift sanity``) ---------------------------
    @property
    def probe_table(self) -> Path:
        return self.root / "probe.parquet"

    @property
    def probe_summary(self) -> Path:
        return self.root / "probe_summary.csv"

    @property
    def probe_pairs(self) -> Path:
        return self.root / "probe_pairs.csv"

    @property
    def probe_pool(self) -> Path:
        return self.root / "probe_pool.csv"

    @property
    def probe_baseline(self) -> Path:
        return self.root / "probe_vs_baseline.csv"

    @property
    def probe_work(self) -> Path:
        """``probe/``: trained heads and per-model tables (what a rerun reuses)."""
        return self.root / "probe"

    @property
    def sanity_table(self) -> Path:
        return self.root / "sanity.parquet"

    @property
    def sanity_summary(self) -> Path:
        return self.root / "sanity_summary.csv"

    @property
    def sanity_selftest(self) -> Path:
        return self.root / "sanity_selftest.json"

    @property
    def sanity_work(self) -> Path:
        """``sanity/``: the self-test's checkpoints and per-model tables."""
        return self.root / "sanity"

    def step_marker(self, step: str) -> Path:
        """``steps/{step}.json``: written last by a step, holding the config hash it ran with."""
        return self.root / "steps" / f"{step}.json"


def safe_name(method: str) -> str:
    """A method or layer name as a file-name part: ``gradcam++`` → ``gradcam++``, ``a/b`` → ``a_b``."""
    return "".join(c if (c.isalnum() or c in "+-_.@=") else "_" for c in method)


MAPS_SHARD_SUFFIX = ".safetensors"
