"""Why a phantom run's maps do or do not sit on the lesions: the energy pointing game of gradcam, gradcam++
and layercam at several layers of one stage's models, beside the uniform-map baseline, and the same for the
part of each map the lesion causes (the map of the image minus the map of its lesion-free twin: the same
phantom patient rendered without the lesion, ``evidrift.data.phantom.lesion_free_twin``).

Reads a finished phantom run (``evidrift demo`` / ``evidrift run`` with ``data.source: phantom``); scores
the test images with a lesion, each explained for its label, at the analysis size of the drift step (64 px).
Not a timing: it prints ratios to the baseline (the mean mask fraction, a uniform map's score).

    python benchmarks/localization_diagnosis.py runs/demo --stage 2 \
        --layers resnet50v2=norm,stages.3,stages.2 --layers densenet201=features.norm5,features.denseblock4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch

import evidrift.core.compat  # noqa: F401  (before torchvision/timm)
from evidrift.cam import CAMEngine
from evidrift.classifier.checkpoint import load_checkpoint
from evidrift.core.paths import RunPaths
from evidrift.data.dataset import ManifestDataset
from evidrift.data.phantom import lesion_free_twin, to_png_bytes
from evidrift.data.sources import load_manifest
from evidrift.metrics.localization import energy_pointing_game
from evidrift.studies.drift.localization import _ground_truth_at

METHODS = ("gradcam", "gradcam++", "layercam")
ANALYSIS_SIZE = 64


def lesion_test_images(paths: RunPaths) -> tuple[pd.DataFrame, list[str], torch.Tensor]:
    """The run's test images that have a lesion (manifest rows), the class names and the masks bool
    [N, 64, 64] at the analysis size, with the drift step's geometry (``_ground_truth_at``)."""
    frame, classes = load_manifest(paths)
    test = frame[(frame["split"] == "test") & (frame["status"] == "ok")].reset_index(drop=True)
    truth = _ground_truth_at(test, ANALYSIS_SIZE, "pad")
    chosen = test[test["id"].astype(str).isin(truth)].reset_index(drop=True)
    return chosen, classes, torch.stack([truth[str(i)].mask for i in chosen["id"]])


def lesion_free_twins(run: Path, frame: pd.DataFrame, out: Path) -> pd.DataFrame:
    """``frame`` with each image replaced by its lesion-free twin, rendered into ``out`` (PNG, 8-bit)."""
    params = json.loads((run / "data" / "phantoms" / "params.json").read_text())  # generate_phantom_set
    paths = []
    for row in frame.itertuples():
        index = int(str(row.id).rsplit("_", 1)[1])
        image = lesion_free_twin(str(row.label), index, params["n"], params["size"], params["seed"])
        path = out / f"{index:05d}.png"
        path.write_bytes(to_png_bytes(image))
        paths.append(str(path))
    return frame.assign(path=paths)


def maps_of(
    model: torch.nn.Module, dataset: ManifestDataset, layers: list[str]
) -> dict[tuple[str, str], torch.Tensor]:
    """{(layer, method): min-max maps float32 [N, h, w]} for each image's label."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {}
    with CAMEngine(model, layers) as engine:
        for batch in loader:
            out = engine(batch["image"], "label", methods=list(METHODS), labels=batch["label"])
            for key, value in out.maps.items():
                named = key if isinstance(key, tuple) else (layers[0], key)
                parts.setdefault(named, []).append(value.detach().float())
    return {key: torch.cat(value) for key, value in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a finished phantom run directory")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument(
        "--layers", action="append", default=[], help="ARCH=dotted.layer,dotted.layer (repeatable)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    paths = RunPaths.at(args.run)
    frame, classes, at_size = lesion_test_images(paths)
    baseline = at_size.float().mean().item()
    print(f"{len(frame)} test images with a lesion; uniform-map baseline (mean mask fraction) {baseline:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        twins = lesion_free_twins(args.run, frame, Path(tmp))
        for spec in args.layers:
            arch, _, names = spec.partition("=")
            layers = names.split(",")
            checkpoint = paths.checkpoint(arch, args.stage)
            model, meta = load_checkpoint(checkpoint, map_location="cpu")
            model.eval()
            size, mean, std = meta.preprocessing(checkpoint)
            image_maps = maps_of(model, ManifestDataset(frame, classes, size, mean=mean, std=std), layers)
            twin_maps = maps_of(model, ManifestDataset(twins, classes, size, mean=mean, std=std), layers)
            print(f"\n{arch} stage {args.stage}: energy pointing game / baseline (map; lesion-caused part)")
            for (layer, method), maps in image_maps.items():
                shape = "x".join(str(s) for s in maps.shape[-2:])
                whole = energy_pointing_game(maps, at_size, size=ANALYSIS_SIZE)
                caused = (maps - twin_maps[(layer, method)]).clamp(min=0)
                part = energy_pointing_game(caused, at_size, size=ANALYSIS_SIZE)
                print(
                    f"  {layer:24s} {shape:5s} {method:10s} {whole.nanmean().item() / baseline:5.2f}x  "
                    f"{part.nanmean().item() / baseline:5.2f}x  (degenerate {int(whole.isnan().sum())})"
                )


if __name__ == "__main__":
    main()
