"""The noise band of ``evidrift compare``: how far A's maps move when nothing that matters has changed.

Two estimates, each written as ``OUT/band/drift.parquet`` (the drift table's format: one row per (id, arch,
method), every drift metric) on the images of the comparison, so the gate pairs them with A → B per image:

- ``baseline``: drift(A, A2) for a second checkpoint A2 of A's recipe (another seed, or the previous
  release's retrain). ``OUT/band`` is a small run directory: A is linked as stage 1 (its maps copied from the
  comparison, not recomputed), A2 as stage 2, explained on the same images with the same methods; then the
  drift step's own table. This is the band that calibrates a gate: it contains the seed-to-seed variation of
  the training recipe.
- ``input-noise``: A's maps of x against A's maps of x perturbed — Gaussian noise of standard deviation
  ``sigma`` in image-intensity units ([0, 1], before normalization; one field shared by the channels) and an
  integer translation (dy, dx) drawn uniformly from [−shift, shift]² (edge pixels replicated). The map of the
  shifted image is upsampled to the input size and shifted back by (−dy, −dx), so the band measures how the
  evidence moves, not the translation itself. Image i's perturbation comes from its own generator, seeded by
  (``seed``, i): the same images give the same band at any batch size. A weaker floor: it needs no second
  checkpoint but knows nothing of training randomness, so any retrain usually lies beyond it. It is only a
  floor if the perturbation is irrelevant to the model: ``band.json`` records the share of images whose
  predicted class it left unchanged (``prediction_agreement``), and the command warns when that is low.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from evidrift import stats
from evidrift.core.errors import UsageError
from evidrift.core.io import write_json_atomic, write_parquet_atomic
from evidrift.core.maps_store import read_maps
from evidrift.core.paths import RunPaths
from evidrift.studies.config import StudyConfig
from evidrift.studies.drift.analysis import DriftSettings, drift_jobs, drift_table, study_analysis_size


@dataclass(frozen=True)
class Perturbation:
    """The input-noise band's perturbation: noise std in intensity units, max shift in pixels, seed."""

    sigma: float = 0.02
    shift: int = 2
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the option when a parameter is out of range."""
        if not (np.isfinite(self.sigma) and self.sigma >= 0):
            raise UsageError(f"--noise-sigma {self.sigma}: must be a finite number ≥ 0 (intensity units)")
        if self.shift < 0:
            raise UsageError(f"--noise-shift {self.shift}: must be ≥ 0 pixels")
        if self.sigma == 0 and self.shift == 0:
            raise UsageError("--noise-sigma 0 and --noise-shift 0: the perturbation does nothing; raise one")


# --- pure tensor functions ----------------------------------------------------------------------------------
def shift_images(x: Tensor, shifts: Tensor) -> Tensor:
    """Translate each image of ``x`` [B, C, H, W] by ``shifts`` [B, 2] (int: dy, dx; content moves down /
    right for positive values), replicating the edge pixels into the uncovered border. Same dtype."""
    if x.ndim != 4 or shifts.shape != (x.shape[0], 2):
        raise ValueError(
            f"x must be [B, C, H, W] and shifts [B, 2]; got {tuple(x.shape)}, {tuple(shifts.shape)}"
        )
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for b, (dy, dx) in enumerate(shifts.tolist()):
        r = (rows - int(dy)).clamp(0, h - 1)
        c = (cols - int(dx)).clamp(0, w - 1)
        out[b] = x[b][:, r][:, :, c]
    return out


def draw_perturbation(
    index: int, shape: tuple[int, int], perturbation: Perturbation
) -> tuple[Tensor, tuple[int, int]]:
    """Image ``index``'s noise field float32 [H, W] (std ``sigma``) and shift (dy, dx), from a generator
    seeded by (seed, index)."""
    state = np.random.SeedSequence([perturbation.seed, index]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    noise = torch.randn(shape, generator=generator) * perturbation.sigma
    s = perturbation.shift
    dy, dx = torch.randint(-s, s + 1, (2,), generator=generator).tolist()
    return noise, (int(dy), int(dx))


def perturb(
    x: Tensor, indices: Sequence[int], std: Sequence[float], perturbation: Perturbation
) -> tuple[Tensor, Tensor]:
    """Perturbed copies of normalized images ``x`` [B, C, H, W] (normalized with per-channel ``std``): noise
    of ``sigma`` intensity units (÷ std per channel), then the shift. Returns (x', shifts int64 [B, 2])."""
    h, w = x.shape[-2:]
    draws = [draw_perturbation(int(i), (h, w), perturbation) for i in indices]
    noise = torch.stack([n for n, _ in draws]).to(x.device, x.dtype)[:, None]
    scale = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    shifts = torch.tensor([s for _, s in draws], dtype=torch.int64)
    return shift_images(x + noise / scale, shifts), shifts


# --- the two bands ------------------------------------------------------------------------------------------
def _fresh_band_dir(paths: RunPaths) -> RunPaths:
    band = RunPaths.at(paths.band_dir)
    if band.root.exists():
        shutil.rmtree(band.root)
    band.root.mkdir(parents=True)
    return band


def baseline_drift(
    config: StudyConfig,
    paths: RunPaths,
    key: str,
    a: Path,
    baseline: Path,
    settings: DriftSettings,
    link: Callable[[Path, Path], None],
) -> pd.DataFrame:
    """drift(A, A2) on the comparison's images (module docstring); ``link(source, target)`` places a
    checkpoint file in the band run. Writes and returns ``OUT/band/drift.parquet``."""
    from evidrift.core import distributed
    from evidrift.studies.drift.explain import explain_run

    band = _fresh_band_dir(paths)
    shutil.copyfile(paths.config, band.config)
    shutil.copytree(paths.data_dir, band.data_dir)
    for stage, checkpoint in (("1", a), ("2", baseline)):
        target = band.checkpoint(key, stage)
        link(checkpoint, target)
        link(checkpoint.with_suffix(".json"), target.with_suffix(".json"))
    shutil.copytree(paths.maps_dir(key, 1), band.maps_dir(key, 1))
    explain_run(config, band, key, 2, ctx=distributed.setup(config.train.device), progress=False)
    drift = drift_table(band, settings, progress=False)
    drift = stats.keyed_by_map_set(drift)  # the compare gates key map sets (method[@layer])
    write_parquet_atomic(band.drift, drift)
    write_json_atomic(band.root / "band.json", {"kind": "baseline", "a": str(a), "baseline": str(baseline)})
    return drift


def input_noise_drift(
    config: StudyConfig,
    paths: RunPaths,
    key: str,
    perturbation: Perturbation,
    settings: DriftSettings,
    progress: bool = False,
) -> pd.DataFrame:
    """drift(A(x), A(x perturbed)) for every map set A has in the comparison's store (module docstring).
    Writes and returns ``OUT/band/drift.parquet``; memory holds one batch of maps at a time."""
    from torch.utils.data import DataLoader

    from evidrift.cam import CAMEngine, resolve_method
    from evidrift.cam.maps import upsample
    from evidrift.core import distributed
    from evidrift.data.dataset import ManifestDataset
    from evidrift.data.sources import load_manifest
    from evidrift.metrics.drift import compare, default_metric_names, resolve_metric
    from evidrift.studies.drift.explain import store_names

    perturbation.check()
    model_cfg = next(m for m in config.models if m.key == key)
    cfg = config.explain
    methods = [resolve_method(m) for m in cfg.methods]
    ctx = distributed.setup(config.train.device)
    from evidrift.classifier.checkpoint import load_checkpoint
    from evidrift.classifier.models import cam_layer_keys

    model, meta = load_checkpoint(paths.checkpoint(key, 1), map_location=ctx.device)
    layer_keys = cam_layer_keys(model, meta.arch or model_cfg.arch, model_cfg.cam_layers)
    layers = list(layer_keys)
    names = store_names(methods, layer_keys)
    reference = {name: read_maps(paths, key, 1, name) for name in names.values()}
    ids = next(iter(reference.values()))[1]
    frame, classes = load_manifest(paths)
    frame = frame.assign(id=frame["id"].astype(str)).set_index("id").loc[ids].reset_index()
    size, mean, std = meta.preprocessing(paths.checkpoint(key, 1))
    dataset = ManifestDataset(frame, classes, size, resize=config.data.resize, mean=mean, std=std)
    metric_names = (
        list(settings.metrics) if settings.metrics is not None else default_metric_names(settings.topk)
    )
    metric_names = list(dict.fromkeys(resolve_metric(n)[0] for n in metric_names))
    side = study_analysis_size(paths, drift_jobs(paths), settings)  # the A → B comparison's grid
    position = {image_id: i for i, image_id in enumerate(ids)}
    predicted = _predictions(paths, key)
    agree: list[bool] = []
    tables: dict[str, list[pd.DataFrame]] = {name: [] for name in names.values()}
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=config.train.num_workers
    )
    bar = tqdm(total=len(ids), desc="input-noise band", unit="img", disable=not progress, leave=False)
    with CAMEngine(model, layers, seed=config.seed) as engine:
        for batch in loader:
            batch_ids = [str(i) for i in batch["id"]]
            index = [position[i] for i in batch_ids]
            x, shifts = perturb(batch["image"].to(ctx.device), index, std, perturbation)
            out = engine(
                x, cfg.target, methods=methods, score=cfg.score, labels=batch["label"].to(ctx.device)
            )
            after = out.logits.argmax(dim=1).cpu().tolist()
            agree += [predicted.get(i, p) == p for i, p in zip(batch_ids, after, strict=True)]
            for engine_key, name in names.items():
                moved = upsample(out.maps[engine_key].detach().float().cpu(), size)
                back = shift_images(moved[:, None], -shifts)[:, 0]
                table = compare(
                    reference[name][0][index].float(),
                    back,
                    metrics=metric_names,
                    size=side,
                    zone_grid=settings.zone_grid,
                    chunk_size=settings.chunk_size,
                )
                table.insert(0, "layer", reference[name][2].get("layer", ""))
                table.insert(0, "method", name)
                table.insert(0, "arch", key)
                table.insert(0, "id", batch_ids)
                tables[name].append(table)
            bar.update(len(batch_ids))
    bar.close()
    drift = pd.concat([t for name in names.values() for t in tables[name]], ignore_index=True)
    band = _fresh_band_dir(paths)
    write_parquet_atomic(band.drift, drift)
    record = {
        "kind": "input-noise",
        "sigma": perturbation.sigma,
        "shift": perturbation.shift,
        "seed": perturbation.seed,
        "prediction_agreement": float(np.mean(agree)) if agree else float("nan"),
    }
    write_json_atomic(band.root / "band.json", record)
    return drift


def _predictions(paths: RunPaths, key: str) -> dict[str, int]:
    """A's predicted class per image id (the evaluate step's ``pred_stage1``); empty without the table."""
    table_path = paths.eval_table(key)
    if not table_path.is_file():
        return {}
    table = pd.read_parquet(table_path, columns=["id", "pred_stage1"])
    return dict(zip(table["id"].astype(str), table["pred_stage1"].astype(int), strict=True))


def band_record(paths: RunPaths) -> dict[str, object]:
    """``OUT/band/band.json``: the band's kind and parameters (and, for input-noise, the share of images
    whose predicted class the perturbation left unchanged); empty when there is no band."""
    file = paths.band_dir / "band.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
