"""Training throughput per architecture: stage 1 with cached features vs frozen-backbone epochs, and stage 2.

For each architecture, the same phantom data and the same random backbone (a local weights file, so stage 0
is skipped) go through ``evidrift.classifier.training.train_stage``:

- stage 1 uncached: every epoch runs the frozen backbone forward on every train and val image;
- stage 1 cached (``cache_features: true``): one backbone pass over train and val, then the head trains on
  the pooled features;
- stage 2: full fine-tuning (forward + backward through the backbone), one epoch.

Augmentation is off so that both stage-1 variants see the same images. Printed per architecture:

- img/s = train images × epochs / seconds of the stage-1 epochs (for cached: the feature pass included);
- ``epochs ratio``: uncached / cached seconds over the stage-1 epochs (the ARCHITECTURE §8 bar: ≥ 5×);
- ``stage ratio``: the same over the whole ``train_stage`` call, i.e. with the fixed costs both variants
  share (building the model, loading weights, writing the checkpoint);
- stage-2 training img/s.

    .venv/bin/python benchmarks/training.py [--epochs 10] [--n 100] [--archs densenet201 resnet50v2 ...]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

import evidrift  # noqa: F401  (before timm)
from evidrift.classifier import models
from evidrift.classifier.checkpoint import read_checkpoint_meta
from evidrift.classifier.training import train_stage
from evidrift.core.io import read_jsonl
from evidrift.core.paths import RunPaths
from evidrift.data.sources import load_manifest, prepare_data
from evidrift.studies.config import StudyConfig, parse_config

SIZES = {"inceptionv3": 80}  # inception_v3 needs >= 75 px


def study(root: Path, arch: str, weights: Path, n: int, epochs: int, cached: bool, size: int) -> StudyConfig:
    return parse_config(
        {
            "data": {"phantom": {"n": n, "size": 64}, "split": {"val": 0.2, "test": 0.1}, "augment": False},
            "models": [{"arch": arch, "image_size": size, "weights": str(weights)}],
            "train": {
                "stage1": {"epochs": epochs, "batch_size": 16, "cache_features": cached, "patience": None},
                "stage2": {"epochs": 1, "batch_size": 16, "patience": None},
            },
            "output": {"dir": str(root / f"{arch}-{'cached' if cached else 'uncached'}")},
        }
    )


def run_stage(config: StudyConfig, stage: str) -> tuple[float, float, list[dict]]:
    """(seconds of the whole stage, seconds of its epochs incl. any feature pass, its epoch records)."""
    paths = RunPaths.at(config.output.dir)
    prepare_data(config, paths)  # data preparation is not part of the measured time
    started = time.perf_counter()
    checkpoint = train_stage(config, paths, config.models[0], stage, progress=False)
    total = time.perf_counter() - started
    records = [r for r in read_jsonl(paths.train_metrics(config.models[0].key)) if r["stage"] == stage]
    extra = read_checkpoint_meta(checkpoint).model_extra or {}
    epochs = sum(r["seconds"] for r in records) + float(extra.get("feature_cache_seconds", 0.0))
    return total, epochs, records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["densenet201", "resnet50v2", "inceptionv3"])
    parser.add_argument("--epochs", type=int, default=10, help="stage-1 epochs (the config default is 10)")
    parser.add_argument("--n", type=int, default=100, help="phantom images (70%% train, 20%% val)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (inception: at least 80)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=150)
    title = f"training throughput (CPU threads: {torch.get_num_threads()}; stage 1: {args.epochs} epochs)"
    table = Table(title=title)
    columns = [
        "arch",
        "px",
        "train imgs",
        "s1 uncached img/s",
        "s1 cached img/s",
        "epochs ratio",
        "stage ratio",
    ]
    for column in [*columns, "s2 img/s"]:
        table.add_column(column, justify="left" if column == "arch" else "right")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for arch in args.archs:
            size = max(args.size, SIZES.get(arch, 0))
            torch.manual_seed(0)
            weights = root / f"{arch}.safetensors"
            state = models.build_model(arch, 2).state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
            uncached = study(root, arch, weights, args.n, args.epochs, cached=False, size=size)
            cached = study(root, arch, weights, args.n, args.epochs, cached=True, size=size)
            total_u, epochs_u, _ = run_stage(uncached, "1")
            total_c, epochs_c, _ = run_stage(cached, "1")
            _, _, stage2 = run_stage(cached, "2")
            frame, _ = load_manifest(RunPaths.at(cached.output.dir))
            n_train = int((frame["split"] == "train").sum())
            images = n_train * args.epochs
            table.add_row(
                arch, str(size), str(n_train), f"{images / epochs_u:.0f}", f"{images / epochs_c:.0f}",
                f"{epochs_u / epochs_c:.1f}x", f"{total_u / total_c:.1f}x",
                f"{stage2[-1]['images_per_s']:.1f}",
            )  # fmt: skip
            console.print(
                f"{arch}: stage 1 epochs uncached {epochs_u:.1f} s vs cached {epochs_c:.1f} s "
                f"({epochs_u / epochs_c:.1f}x); whole stage {total_u:.1f} s vs {total_c:.1f} s",
                highlight=False,
            )
    console.print(table)


if __name__ == "__main__":
    main()
