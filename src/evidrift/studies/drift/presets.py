"""The demo studies (`evidrift demo`, `make demo`): the whole protocol on the embedded phantom set, offline.

``demo_config(quick=False)``: densenet201, resnet50v2 and inceptionv3 trained from scratch on the phantom
``source`` task (stage 0), then transfer (stage 1, frozen backbone, cached features) and fine-tuning (stage 2)
on phantom chest X-rays; four gradient CAMs at two layers (``DEMO_LAYERS``); every drift metric;
statistics; the report. Sized for <= 10 minutes and <= 4 GB on 2 CPU cores by CPU time, with bf16
autocast where the CPU has it (``train.precision: auto``): small inputs (4 x 4 last-stage maps), 600
phantoms, stage 0 at half resolution. The numbers are a budget, not a benchmark: results are far from what
ImageNet weights and thousands of radiographs would give, but every step and artifact is the real one.

``demo_config(full=True)``: the same study at the paper's sizes (224 / 299 px, thousands of phantoms), for
a GPU (``evidrift demo --full`` prints its estimated CPU time first).

``demo_config(quick=True)``: one small architecture (resnet18) at 64 px on a tiny set, one or two epochs per
stage, every image of the test split explained — the whole pipeline in well under 2 minutes (what the tests
run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evidrift.core.errors import UsageError
from evidrift.studies.config import StudyConfig, parse_config

DEMO_ARCHS = ("densenet201", "resnet50v2", "inceptionv3")
DEMO_METHODS = ["gradcam++", "layercam", "gradcam", "xgradcam"]
#: The paper's layer (post-activation last stage, feeding global average pooling: there gradcam ≡ xgradcam
#: and gradcam++ ≈ layercam) and the layer before it, where the CAM gradient varies over space and the
#: four methods differ.
DEMO_LAYERS = ["default", "spatial"]


def _default_preset() -> dict[str, Any]:
    # Sized for <= 10 min on 2 CPU cores with bf16 training (README: the fresh-clone measurement). Input sizes
    # give every architecture a 4 x 4 last-stage map (inception_v3 needs 192 px); 5 x 5 (160 / 160 / 208 px)
    # costs 1.2-1.6x per image in every stage, which the budget does not hold. 600 phantoms: a 150-image test
    # split (95% CI of an accuracy near 0.85: about +-0.06). Stage 0 at half the input sides on 1,000 source
    # images for 3 epochs, its cosine ending at 0.3 x lr (an annealed backbone is too sharp to fine-tune);
    # stage 1 on cached features with one shared scale; stage 2 for 5 epochs at lr 4e-4 on un-augmented
    # images (stage 1's head never saw augmented ones) with BatchNorm's statistics kept. README, "How a study
    # runs": each of these measured against its alternative.
    sizes = {"densenet201": 128, "resnet50v2": 128, "inceptionv3": 192}
    return {
        "seed": 0,
        "data": {
            "source": "phantom",
            "phantom": {"n": 600, "size": 192, "seed": 0, "n_source": 1000},
            "split": {"val": 0.1, "test": 0.25, "seed": 0},
        },
        "models": [
            {"arch": arch, "weights": "none", "image_size": size, "cam_layers": DEMO_LAYERS}
            for arch, size in sizes.items()
        ],
        "train": {
            "loss": "ce",
            "device": "auto",
            "precision": "auto",
            "stage0": {
                "epochs": 3,
                "lr": 1.5e-3,
                "batch_size": 16,
                "monitor": "val_accuracy",
                "warmup_epochs": 0.5,
                "image_scale": 0.5,
                "final_lr_ratio": 0.3,
            },
            "stage1": {
                "epochs": 30,
                "lr": 3e-3,
                "batch_size": 32,
                "cache_features": True,
                "feature_scale": "shared",
                "patience": 10,
            },
            "stage2": {
                "epochs": 5,
                "lr": 4e-4,
                "batch_size": 16,
                "warmup_epochs": 0.5,
                "freeze_batchnorm": True,
                "augment": False,
                # the first epoch's transient (measured: densenet201's val loss 0.74 -> 6.7, 9x, then 0.27
                # after epoch 4) is not a divergence; a non-finite loss or a 100x growth still stops the stage
                "divergence_factor": 100.0,
            },
        },
        "explain": {"methods": DEMO_METHODS, "samples": "tp_any", "batch_size": 16},
        "drift": {"metrics": "all", "size": 64},
        "stats": {"n_boot": 1000},
        "report": {
            "title": "evidrift demo: phantom chest X-rays, transfer learning vs fine-tuning",
            "examples": 3,
        },
    }


def _quick_preset() -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {
            "source": "phantom",
            "phantom": {"n": 60, "size": 64, "seed": 0, "n_source": 60},
            "split": {"val": 0.2, "test": 0.3, "seed": 0},
            "augment": False,
        },
        "models": [{"arch": "resnet18", "weights": "none", "image_size": 64, "cam_layers": DEMO_LAYERS}],
        "train": {
            "stage0": {
                "epochs": 1,
                "lr": 2e-3,
                "batch_size": 16,
                "warmup_epochs": 0,
                "monitor": "val_accuracy",
            },
            "stage1": {"epochs": 3, "lr": 5e-3, "batch_size": 16, "cache_features": True, "warmup_epochs": 0},
            "stage2": {"epochs": 1, "lr": 5e-4, "batch_size": 16, "warmup_epochs": 0},
        },
        "explain": {"methods": DEMO_METHODS, "samples": "all", "batch_size": 16},
        "drift": {"metrics": "all", "size": 32},
        "stats": {"n_boot": 200},
        "report": {"title": "evidrift demo (quick)", "examples": 2},
    }


def _full_preset() -> dict[str, Any]:
    # The paper's sizes (224 px densenet201 / resnet50v2: 7 x 7 last-stage maps; 299 px inceptionv3: 8 x 8)
    # and thousands of phantoms, for a GPU: the default preset's recipe with more images and epochs.
    raw = _default_preset()
    sizes = {"densenet201": 224, "resnet50v2": 224, "inceptionv3": 299}
    raw["data"]["phantom"] = {"n": 3000, "size": 320, "seed": 0, "n_source": 6000}
    raw["data"]["split"] = {"val": 0.1, "test": 0.2, "seed": 0}
    for model in raw["models"]:
        model["image_size"] = sizes[model["arch"]]
    train = raw["train"]
    train["stage0"] = {**train["stage0"], "epochs": 15, "batch_size": 32, "image_scale": 0.5}
    train["stage1"] = {**train["stage1"], "epochs": 30, "batch_size": 64}
    train["stage2"] = {**train["stage2"], "epochs": 8, "batch_size": 32}
    raw["explain"] = {**raw["explain"], "batch_size": 32}
    raw["drift"] = {**raw["drift"], "size": 112}
    raw["report"] = {**raw["report"], "title": raw["report"]["title"] + " (full size)"}
    return raw


PRESETS = {"default": _default_preset, "quick": _quick_preset, "full": _full_preset}


def demo_config(
    quick: bool = False, out: str | os.PathLike[str] | None = None, full: bool = False
) -> StudyConfig:
    """The demo study (``quick``: the tiny one; ``full``: the paper's sizes, for a GPU), writing into ``out``
    (default ``runs/demo``, ``runs/demo-quick``, ``runs/demo-full``)."""
    if quick and full:
        raise UsageError("--quick and --full exclude each other; choose one")
    name = "quick" if quick else "full" if full else "default"
    raw = PRESETS[name]()
    folder = {"default": "demo", "quick": "demo-quick", "full": "demo-full"}[name]
    raw["output"] = {"dir": str(Path(out) if out is not None else Path("runs") / folder)}
    return parse_config(raw, "the demo preset" + ("" if name == "default" else f" (--{name})"))
