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

Then ``train.precision`` side by side in one run (``evidrift.precision``): per architecture, a training step
(forward, backward, AdamW) and an inference forward of the same random batch in fp32 and in bf16 autocast
+ channels-last, img/s and the bf16/fp32 ratios (``--precision-size``, default the demo's input sizes).

    .venv/bin/python benchmarks/training.py [--epochs 10] [--n 100] [--archs densenet201 resnet50v2 ...]
    .venv/bin/python benchmarks/training.py --only-precision [--batch 16] [--steps 4]
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
from evidrift.classifier.precision import Precision
from evidrift.classifier.training import train_stage
from evidrift.core.io import read_jsonl
from evidrift.core.paths import RunPaths
from evidrift.data.sources import load_manifest, prepare_data
from evidrift.studies.config import StudyConfig, parse_config
from evidrift.studies.drift.presets import demo_config

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


def step_rates(arch: str, size: int, batch: int, steps: int, precision: Precision) -> tuple[float, float]:
    """(training img/s, inference img/s) of ``arch`` at ``size`` px on a random batch, after one warm-up
    step (oneDNN plans its kernels on the first call of a shape)."""
    torch.manual_seed(0)
    model = precision.prepare_model(models.build_model(arch, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = precision.prepare_input(torch.randn(batch, 3, size, size))
    y = torch.randint(0, 5, (batch,))
    model.train()
    for i in range(steps + 1):
        if i == 1:
            started = time.perf_counter()
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train = steps * batch / (time.perf_counter() - started)
    model.eval()
    with torch.no_grad():
        for i in range(steps + 1):
            if i == 1:
                started = time.perf_counter()
            with precision.autocast():
                model(x)
    return train, steps * batch / (time.perf_counter() - started)


def precision_table(archs: list[str], size: int | None, batch: int, steps: int) -> Table:
    """bf16 autocast + channels-last vs fp32, measured side by side per architecture."""
    sizes = {m.arch: m.image_size for m in demo_config().models}
    title = f"train.precision: bf16 vs fp32 (CPU threads {torch.get_num_threads()}, batch {batch})"
    table = Table(title=title)
    for column in ["arch", "px", "fp32 train", "bf16 train", "train ratio", "fp32 infer", "bf16 infer"]:
        table.add_column(column, justify="left" if column == "arch" else "right")
    table.add_column("infer ratio", justify="right")
    for arch in archs:
        side = size or sizes.get(arch) or models.default_input_size(arch)
        fp32 = step_rates(arch, side, batch, steps, Precision("fp32"))
        bf16 = step_rates(arch, side, batch, steps, Precision("bf16"))
        table.add_row(
            arch, str(side), f"{fp32[0]:.1f}", f"{bf16[0]:.1f}", f"{bf16[0] / fp32[0]:.2f}x",
            f"{fp32[1]:.1f}", f"{bf16[1]:.1f}", f"{bf16[1] / fp32[1]:.2f}x",
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["densenet201", "resnet50v2", "inceptionv3"])
    parser.add_argument("--epochs", type=int, default=10, help="stage-1 epochs (the config default is 10)")
    parser.add_argument("--n", type=int, default=100, help="phantom images (70%% train, 20%% val)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (inception: at least 80)")
    parser.add_argument("--precision-size", type=int, default=None, help="px (default: the demo's sizes)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the precision comparison")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of the precision comparison")
    parser.add_argument("--only-precision", action="store_true", help="only the bf16 vs fp32 table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=150)
    if args.only_precision:
        console.print(precision_table(args.archs, args.precision_size, args.batch, args.steps))
        return
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
    console.print(precision_table(args.archs, args.precision_size, args.batch, args.steps))


if __name__ == "__main__":
    main()
