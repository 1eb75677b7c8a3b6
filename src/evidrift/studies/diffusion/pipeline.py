"""The diffusion study as a list of steps (ARCHITECTURE §11). Run directory (under ``out``):

```
data/{base,finetune,test}.npz       the image sets (images, masks, markers, labels, reports, ids, twins)
models/text_encoder/                the contrastively pretrained CLIPTextModel
models/{base,frozen,learnable,cross_attention}/   unet/, text_encoder/, scheduler/ (save_pretrained)
models/losses.json                  training losses per model
steps/{step}.json                   markers of ``evidrift.core.steps`` (hash, wall and CPU seconds)
maps/diffusion/stage{model}/{kind}  attention maps in the maps store (kind: query, marker, start, twin,
                                    floor (base only), query@t{t}, query@{layer})
samples/{model}.npz                 generated images and their prompt classes
localization_images.csv, localization.csv, localization_timestep.csv, localization_layer.csv,
fidelity.csv, fidelity_classes.csv, drift.csv, gates.csv, verdict.json, report.html, figures/
```
Models scored: ``base`` (pretrained, before fine-tuning), the variants, and ``random_unet`` (a random-init
UNet with the pretrained text encoder: a baseline). Every step resumes (``evidrift.core.steps``).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from evidrift.core import distributed
from evidrift.core.distributed import Context
from evidrift.core.io import write_bytes_atomic, write_csv_atomic, write_json_atomic
from evidrift.core.maps_store import read_maps, write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.core.steps import Step, run_steps
from evidrift.data.phantom import CLASSES
from evidrift.data.reports import MARKER_WORD, QUERY_WORDS, WordTokenizer
from evidrift.metrics.drift import compare
from evidrift.studies.diffusion import attention as att
from evidrift.studies.diffusion import fidelity as fid
from evidrift.studies.diffusion import gates as gt
from evidrift.studies.diffusion import scores
from evidrift.studies.diffusion.config import DiffusionConfig, config_dict
from evidrift.studies.diffusion.data import SET_NAMES, ImageSet, render_set
from evidrift.studies.diffusion.models import (
    build_schedulers,
    build_text_encoder,
    build_unet,
    load_model_folder,
    quiet_hub_logging,
    save_model_folder,
    text_states,
    to_device,
)
from evidrift.studies.diffusion.sampling import sample_images
from evidrift.studies.diffusion.training import mean_loss, pretrain_text_encoder, train_diffusion

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel

ARCH = "diffusion"  # the maps store's "arch" level for this study
RANDOM = "random_unet"
DRIFT_METRICS = ("topk_iou@0.1", "pearson", "spearman", "centroid_shift", "js", "ssim")


# --- helpers ------------------------------------------------------------------------------------------------
def tokenizer_for(config: DiffusionConfig) -> WordTokenizer:
    return WordTokenizer(max_length=config.text.max_length)


def load_set(paths: RunPaths, name: str, ctx: dict[str, Any]) -> ImageSet:
    key = f"set:{name}"
    if key not in ctx:
        with np.load(paths.root / "data" / f"{name}.npz", allow_pickle=False) as arrays:
            ctx[key] = ImageSet.from_arrays({k: arrays[k] for k in arrays.files})
    return ctx[key]


def model_dir(paths: RunPaths, name: str) -> Path:
    return paths.root / "models" / name


def save_folder_atomic(
    folder: Path, unet: UNet2DConditionModel, text: CLIPTextModel, scheduler: DDPMScheduler
) -> None:
    """save_pretrained into a temporary sibling folder, then rename it onto ``folder``."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, unet, text, scheduler)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def device_of(config: DiffusionConfig) -> torch.device:
    """``diffusion.device``: ``auto`` is CUDA when available, else the CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def models_scored(config: DiffusionConfig) -> list[str]:
    return ["base", *config.train.variants]


def _record_losses(paths: RunPaths, name: str, losses: list[float]) -> None:
    path = paths.root / "models" / "losses.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[name] = {"final": mean_loss(losses), "steps": len(losses), "first": losses[0] if losses else None}
    write_json_atomic(path, record)


# --- steps --------------------------------------------------------------------------------------------------
def step_data(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    for name in SET_NAMES:
        image_set = render_set(config.data, name)
        buffer = io.BytesIO()
        # allow_pickle: numpy's default, spelled out so that the **arrays cannot be taken for it (numpy stubs)
        np.savez_compressed(buffer, allow_pickle=True, **image_set.arrays())
        write_bytes_atomic(paths.root / "data" / f"{name}.npz", buffer.getvalue())
        ctx[f"set:{name}"] = image_set


def step_text_encoder(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    tokenizer = tokenizer_for(config)
    folder = model_dir(paths, "text_encoder")
    if config.model is not None:
        _, text, _ = load_model_folder(config.model)
    else:
        torch.manual_seed(config.train.seed)
        text = build_text_encoder(config, tokenizer)
        base = load_set(paths, "base", ctx)
        losses = pretrain_text_encoder(
            text,
            base.tensor(),
            torch.from_numpy(tokenizer.encode_batch(base.reports)),
            steps=config.text.pretrain_steps,
            lr=config.text.pretrain_lr,
            batch_size=max(config.train.batch_size, 32),
            seed=config.train.seed,
        )
        _record_losses(paths, "text_encoder", losses)
    tmp = folder.with_name(".tmp-text_encoder")
    shutil.rmtree(tmp, ignore_errors=True)
    text.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_text(paths: RunPaths, name: str = "text_encoder") -> CLIPTextModel:
    from transformers import CLIPTextModel

    folder = model_dir(paths, name) if name == "text_encoder" else model_dir(paths, name) / "text_encoder"
    quiet_hub_logging()
    model = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    return model.eval()


def step_base(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    text = _load_text(paths)
    if config.model is not None:
        unet, _, scheduler = load_model_folder(config.model)
    else:
        torch.manual_seed(config.train.seed)
        unet = build_unet(config)
        scheduler, _ = build_schedulers(config)
        base = load_set(paths, "base", ctx)
        unet, text = to_device(unet, device_of(config)), to_device(text, device_of(config))
        losses = train_diffusion(
            unet,
            text,
            scheduler,
            base.tensor(),
            torch.from_numpy(tokenizer_for(config).encode_batch(base.reports)),
            variant="base",
            steps=config.train.base_steps,
            lr=config.train.lr,
            text_lr=config.train.text_lr or config.train.lr,
            batch_size=config.train.batch_size,
            ucg=config.train.ucg,
            seed=config.train.seed,
        )
        _record_losses(paths, "base", losses)
    save_folder_atomic(model_dir(paths, "base"), unet, text, scheduler)


def step_finetune(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    finetune = load_set(paths, "finetune", ctx)
    images = finetune.tensor()
    ids = torch.from_numpy(tokenizer_for(config).encode_batch(finetune.reports))
    for variant in config.train.variants:
        folder = model_dir(paths, variant)
        if (folder / "unet").is_dir() and (folder / ".complete").is_file():
            continue  # resumed: this variant finished before an interruption
        unet, text, scheduler = load_model_folder(model_dir(paths, "base"))
        unet, text = to_device(unet, device_of(config)), to_device(text, device_of(config))
        losses = train_diffusion(
            unet,
            text,
            scheduler,
            images,
            ids,
            variant=variant,
            steps=config.train.finetune_steps,
            lr=config.train.finetune_lr,
            text_lr=config.train.text_lr or config.train.finetune_lr,
            batch_size=config.train.batch_size,
            ucg=config.train.ucg,
            seed=config.train.seed + 1,
        )
        _record_losses(paths, variant, losses)
        save_folder_atomic(folder, unet, text, scheduler)
        (folder / ".complete").write_text("ok\n")


def _load_model(
    config: DiffusionConfig, paths: RunPaths, name: str
) -> tuple[UNet2DConditionModel, CLIPTextModel, DDPMScheduler]:
    if name == RANDOM:
        torch.manual_seed(config.train.seed + 12345)
        unet = build_unet(config).eval()
        scheduler, _ = build_schedulers(config)
        return to_device(unet, device_of(config)), to_device(_load_text(paths), device_of(config)), scheduler
    unet, text, scheduler = load_model_folder(model_dir(paths, name))
    return to_device(unet.eval(), device_of(config)), to_device(text.eval(), device_of(config)), scheduler


def _short_layer(name: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``down1.0.0``; ``mid_block...`` →
    ``mid.0.0``."""
    parts = name.split(".")
    block = parts[0].replace("_blocks", "").replace("_block", "")
    numbers = [p for p in parts[1:] if p.isdigit()]
    if block == "mid":
        return "mid." + ".".join(numbers)
    return f"{block}{numbers[0]}." + ".".join(numbers[1:])


def capture_model(
    config: DiffusionConfig,
    unet: UNet2DConditionModel,
    text: CLIPTextModel,
    scheduler: DDPMScheduler,
    test: ImageSet,
    twins: bool,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Word maps of one model on the test set: (``query``/``marker``/``start`` float32 [N, L, T, S, S], and
    ``twin`` (query word on the twins) when ``twins``; the layers' short names, in the maps' L order)."""
    tokenizer = tokenizer_for(config)
    ids = torch.from_numpy(tokenizer.encode_batch(test.reports))
    positions = {
        "query": [
            tokenizer.word_positions(r, QUERY_WORDS.get(lab, ()))
            for r, lab in zip(test.reports, test.labels, strict=True)
        ],
        "marker": [tokenizer.word_positions(r, (MARKER_WORD,)) for r in test.reports],
        "start": [[0] for _ in test.reports],
    }
    weights = {k: att.token_weights(v, tokenizer.max_length) for k, v in positions.items()}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in [*weights, *(["twin"] if twins else [])]}
    layers: tuple[str, ...] = ()
    batch = 16
    device = next(unet.parameters()).device
    images = test.tensor().to(device)
    ids = ids.to(device)
    twin_images = test.tensor(test.twins).to(device) if twins and test.twins is not None else None
    for start in range(0, len(test), batch):
        sl = slice(start, start + batch)
        with torch.no_grad():
            states = text_states(text, ids[sl])
        captured = att.capture_maps(
            unet,
            scheduler,
            images[sl],
            states,
            test.ids[sl],
            config.attention.timesteps,
            seed,
            config.attention.map_size,
        )
        layers = captured.layers
        for kind, w in weights.items():
            out[kind].append(att.word_maps(captured, w[sl]))
        if twin_images is not None:
            twin_captured = att.capture_maps(
                unet,
                scheduler,
                twin_images[sl],
                states,
                test.ids[sl],
                config.attention.timesteps,
                seed,
                config.attention.map_size,
            )
            out["twin"].append(att.word_maps(twin_captured, weights["query"][sl]))
    return {k: torch.cat(v) for k, v in out.items()}, [_short_layer(name) for name in layers]


def step_attention(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    test = load_set(paths, "test", ctx)
    seed = config.attention.noise_seed
    for name in [*models_scored(config), RANDOM]:
        unet, text, scheduler = _load_model(config, paths, name)
        maps, layers = capture_model(config, unet, text, scheduler, test, twins=name != RANDOM, seed=seed)
        extra = {"layers": json.dumps(layers), "timesteps": json.dumps(config.attention.timesteps)}
        for kind, value in maps.items():
            write_maps_shard(
                paths, ARCH, name, kind, 0, value.mean(dim=(1, 2)), test.ids, "cross_attention", extra
            )
        query = maps["query"]
        for j, t in enumerate(config.attention.timesteps):
            write_maps_shard(
                paths,
                ARCH,
                name,
                f"query@t{t}",
                0,
                query[:, :, j].mean(dim=1),
                test.ids,
                "cross_attention",
                extra,
            )
        for j, layer in enumerate(layers):
            write_maps_shard(
                paths, ARCH, name, f"query@{layer}", 0, query[:, j].mean(dim=1), test.ids, layer, extra
            )
        if name == "base":  # the noise floor: the same model, another noise seed
            floor, _ = capture_model(
                config, unet, text, scheduler, test, twins=False, seed=config.attention.floor_seed
            )
            write_maps_shard(
                paths,
                ARCH,
                name,
                "floor",
                0,
                floor["query"].mean(dim=(1, 2)),
                test.ids,
                "cross_attention",
                extra,
            )


def read_scaled(paths: RunPaths, model: str, kind: str) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """Maps of the store at their original scale (the store keeps each map divided by its maximum)."""
    maps, ids, meta = read_maps(paths, ARCH, model, kind)
    maps = maps.float()
    if "scales" in meta:
        maps = maps * torch.tensor(json.loads(meta["scales"]), dtype=torch.float32)[:, None, None]
    return maps, ids, meta


def _lesion_rows(test: ImageSet) -> list[int]:
    return [i for i, label in enumerate(test.labels) if label != "normal" and test.masks[i].any()]


def step_localization(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    test = load_set(paths, "test", ctx)
    finetune = load_set(paths, "finetune", ctx)
    keep = _lesion_rows(test)
    masks = torch.from_numpy(test.masks[keep])
    ids = [test.ids[i] for i in keep]
    labels = [test.labels[i] for i in keep]
    rows, per_t, per_layer = [], [], []
    table = scores.TABLE_COLUMNS
    for name in [*models_scored(config), RANDOM]:
        maps, _, meta = read_scaled(paths, name, "query")
        rows.append(scores.localization_rows(maps[keep], masks, ids, labels, model=name, kind="query"))
        if name != RANDOM:
            start, _, _ = read_scaled(paths, name, "start")
            rows.append(
                scores.localization_rows(start[keep], masks, ids, labels, model=name, kind="start_token")
            )
        for t in config.attention.timesteps:
            m, _, _ = read_scaled(paths, name, f"query@t{t}")
            per_t.append(scores.localization_rows(m[keep], masks, ids, labels, table, model=name, timestep=t))
        for layer in json.loads(meta["layers"]):
            m, _, _ = read_scaled(paths, name, f"query@{layer}")
            per_layer.append(
                scores.localization_rows(m[keep], masks, ids, labels, table, model=name, layer=layer)
            )
    prior = scores.mean_mask_prior(finetune.masks, finetune.labels, labels)
    rows.append(scores.localization_rows(prior, masks, ids, labels, model="mean_mask_prior", kind="prior"))
    images = pd.concat(rows, ignore_index=True)
    write_csv_atomic(paths.root / "localization_images.csv", images)
    metrics = list(scores.LOCALIZATION_COLUMNS)
    n_boot, seed = config.stats.n_boot, config.stats.seed
    write_csv_atomic(
        paths.root / "localization.csv", scores.summary(images, ["model", "kind"], metrics, n_boot, seed)
    )
    summary_metrics = list(table)
    write_csv_atomic(
        paths.root / "localization_timestep.csv",
        scores.summary(
            pd.concat(per_t, ignore_index=True), ["model", "timestep"], summary_metrics, n_boot, seed
        ),
    )
    write_csv_atomic(
        paths.root / "localization_layer.csv",
        scores.summary(
            pd.concat(per_layer, ignore_index=True), ["model", "layer"], summary_metrics, n_boot, seed
        ),
    )


def _prompts(config: DiffusionConfig, finetune: ImageSet) -> tuple[list[str], list[str]]:
    """n_samples reports per class drawn (seeded) from the fine-tune set's reports of that class."""
    rng = np.random.default_rng(config.stats.seed)
    texts: list[str] = []
    labels: list[str] = []
    for label in CLASSES:
        pool = [r for r, lab in zip(finetune.reports, finetune.labels, strict=True) if lab == label]
        texts.extend(str(v) for v in rng.choice(pool, size=config.fidelity.n_samples, replace=True))
        labels.extend([label] * config.fidelity.n_samples)
    return texts, labels


def step_fidelity(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    from evidrift.stats import bootstrap_ci

    finetune, base, test = (load_set(paths, n, ctx) for n in ("finetune", "base", "test"))
    class_index = {c: i for i, c in enumerate(CLASSES)}
    classifier = fid.train_feature_classifier(
        finetune.tensor(),
        torch.tensor([class_index[c] for c in finetune.labels]),
        len(CLASSES),
        steps=config.fidelity.classifier_steps,
        seed=config.train.seed,
        dim=32,
    )
    real = fid.features(classifier, base.tensor())  # the base set: real phantoms the classifier never saw
    real_accuracy = float(
        (fid.predictions(classifier, test.tensor()) == np.array([class_index[c] for c in test.labels])).mean()
    )
    texts, labels = _prompts(config, finetune)
    tokenizer = tokenizer_for(config)
    prompt_ids = torch.from_numpy(tokenizer.encode_batch(texts))
    n_gen = len(texts)
    floor = fid.real_floor(real, n_gen, config.fidelity.kid_subset, seed=config.stats.seed)
    inception_weights = config.fidelity.inception_weights
    inception_real = None
    if inception_weights is not None:
        inception_real = fid.inception_features(inception_weights, torch.from_numpy(base.images[: 2 * n_gen]))
    rows, class_rows = [], []
    for name in models_scored(config):
        unet, text, _ = _load_model(config, paths, name)
        _, ddim = build_schedulers(config)
        generated = sample_images(
            unet,
            text,
            ddim,
            prompt_ids,
            config.data.size,
            config.fidelity.sample_steps,
            config.fidelity.guidance,
            seed=config.stats.seed,
        )
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, images=generated.numpy(), labels=np.asarray(labels), prompts=np.asarray(texts)
        )
        write_bytes_atomic(paths.root / "samples" / f"{name}.npz", buffer.getvalue())
        gen_tensor = (generated * 2 - 1)[:, None]
        feats = fid.features(classifier, gen_tensor)
        predicted = fid.predictions(classifier, gen_tensor)
        truth = np.array([class_index[c] for c in labels])
        kid, kid_std = fid.kernel_inception_distance(
            feats, real, config.fidelity.kid_subset, seed=config.stats.seed
        )
        row = {
            "model": name,
            "n_generated": n_gen,
            "fd": fid.frechet_distance(feats, real),
            **dict(
                zip(
                    ("fd_ci_low", "fd_ci_high"),
                    fid.frechet_bootstrap_ci(feats, real, config.stats.n_boot // 5, seed=config.stats.seed),
                    strict=True,
                )
            ),
            "fd_floor": floor["fd"],
            "kid": kid,
            "kid_std": kid_std,
            "kid_floor": floor["kid"],
            "accuracy": float((predicted == truth).mean()),
            **dict(
                zip(
                    ("accuracy_ci_low", "accuracy_ci_high"),
                    bootstrap_ci(
                        (predicted == truth).astype(float), config.stats.n_boot, seed=config.stats.seed
                    ),
                    strict=True,
                )
            ),
            "real_accuracy": real_accuracy,
        }
        diversity = []
        for label in CLASSES:
            chosen = [i for i, lab in enumerate(labels) if lab == label]
            div = fid.ssim_diversity(generated[chosen])
            diversity.append(div)
            class_rows.append(
                {
                    "model": name,
                    "label": label,
                    "accuracy": float((predicted[chosen] == truth[chosen]).mean()),
                    "ssim_diversity": div,
                }
            )
        row["ssim_diversity"] = float(np.nanmean(diversity))
        if inception_weights is not None and inception_real is not None:
            row["fid_inception"] = fid.frechet_distance(
                fid.inception_features(inception_weights, generated), inception_real
            )
        rows.append(row)
    real_div = [
        fid.ssim_diversity(
            torch.from_numpy(test.images[[i for i, lab in enumerate(test.labels) if lab == c]])
        )
        for c in CLASSES
    ]
    rows.append(
        {
            "model": "real",
            "n_generated": 0,
            "fd": floor["fd"],
            "fd_floor": floor["fd"],
            "kid": floor["kid"],
            "kid_std": floor["kid_std"],
            "kid_floor": floor["kid"],
            "accuracy": real_accuracy,
            "real_accuracy": real_accuracy,
            "ssim_diversity": float(np.nanmean(real_div)),
        }
    )
    write_csv_atomic(paths.root / "fidelity.csv", pd.DataFrame(rows))
    write_csv_atomic(paths.root / "fidelity_classes.csv", pd.DataFrame(class_rows))


def step_drift(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    from evidrift.stats import describe

    test = load_set(paths, "test", ctx)
    keep = _lesion_rows(test)
    base, _, _ = read_scaled(paths, "base", "query")
    floor, _, _ = read_scaled(paths, "base", "floor")
    floor_frame = compare(base[keep], floor[keep], metrics=list(DRIFT_METRICS))
    rows = []
    for name in config.train.variants:
        variant, _, _ = read_scaled(paths, name, "query")
        frame = compare(base[keep], variant[keep], metrics=list(DRIFT_METRICS))
        for metric in [c for c in frame.columns if c not in ("degenerate", "degenerate_reason")]:
            stats = describe(frame[metric].to_numpy(), n_boot=config.stats.n_boot, seed=config.stats.seed)
            fl = describe(floor_frame[metric].to_numpy(), n_boot=config.stats.n_boot, seed=config.stats.seed)
            rows.append(
                {
                    "model": name,
                    "metric": metric,
                    "n": stats["n"],
                    "mean": stats["mean"],
                    "ci_low": stats["ci_low"],
                    "ci_high": stats["ci_high"],
                    "floor_mean": fl["mean"],
                    "floor_ci_low": fl["ci_low"],
                    "floor_ci_high": fl["ci_high"],
                    "n_degenerate": int(frame["degenerate"].sum()),
                }
            )
    write_csv_atomic(paths.root / "drift.csv", pd.DataFrame(rows))


def step_gates(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    test = load_set(paths, "test", ctx)
    images = pd.read_csv(paths.root / "localization_images.csv")
    n_boot, seed = config.stats.n_boot, config.stats.seed
    marked = [i for i in range(len(test)) if test.markers[i].any()]
    lesions = _lesion_rows(test)
    metric = scores.PRIMARY_METRIC
    rows = []
    prior = images[images["model"] == "mean_mask_prior"]
    random_rows = images[(images["model"] == RANDOM) & (images["kind"] == "query")]
    for name in models_scored(config):
        marker_maps, _, _ = read_scaled(paths, name, "marker")
        rows.append(
            {
                "model": name,
                "gate": "marker",
                **gt.marker_gate(marker_maps[marked], gt.as_masks(test.markers[marked]), n_boot, seed),
            }
        )
        query, _, _ = read_scaled(paths, name, "query")
        twin, _, _ = read_scaled(paths, name, "twin")
        rows.append(
            {
                "model": name,
                "gate": "twin",
                **gt.twin_gate(query[lesions], twin[lesions], gt.as_masks(test.masks[lesions]), n_boot, seed),
            }
        )
        mine = images[(images["model"] == name) & (images["kind"] == "query")]
        start = images[(images["model"] == name) & (images["kind"] == "start_token")]
        for baseline, frame in (
            ("random_unet", random_rows),
            ("start_token", start),
            ("mean_mask_prior", prior),
        ):
            diff = scores.paired_difference(mine, frame, metric, n_boot, seed)
            rows.append(
                {"model": name, "gate": f"baseline:{baseline}", "metric": metric, **gt.baseline_gate(diff)}
            )
    table = pd.DataFrame(rows)
    write_csv_atomic(paths.root / "gates.csv", table)
    verdict, failed = gt.verdict(table, models_scored(config))
    write_json_atomic(paths.root / "verdict.json", {"verdict": verdict, "failed": failed})


def step_report(config: DiffusionConfig, paths: RunPaths, ctx: dict[str, Any]) -> None:
    from evidrift.studies.diffusion.report_section import write_report

    write_report(config, paths, ctx)


def _files(*relative: str) -> Callable[[DiffusionConfig, RunPaths], list[Path]]:
    return lambda _config, paths: [paths.root / r for r in relative]


def _variant_folders(config: DiffusionConfig, paths: RunPaths) -> list[Path]:
    return [model_dir(paths, v) for v in config.train.variants]


def _sample_files(config: DiffusionConfig, paths: RunPaths) -> list[Path]:
    return [paths.root / "fidelity.csv", paths.root / "fidelity_classes.csv", paths.root / "samples"]


class DiffusionJob:
    """One run of the study: the steps (``evidrift.core.steps``) over a shared in-memory cache of the image
    sets. Every step is rank 0's work (other ranks of a torchrun launch return at once)."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def _bind(self, fn: Callable[[DiffusionConfig, RunPaths, dict[str, Any]], None]) -> Callable[..., None]:
        def run(config: DiffusionConfig, paths: RunPaths, ctx: Context) -> None:
            if ctx.is_main:
                fn(config, paths, self.cache)

        return run

    def steps(self) -> list[Step[DiffusionConfig]]:
        """The steps in order: name, run, the steps each reads, the config keys its hash covers, outputs."""
        model_keys = ("model", "unet", "text", "train")
        b = self._bind
        return [
            Step("data", b(step_data), (), ("data",), outputs=_files(*(f"data/{n}.npz" for n in SET_NAMES))),
            Step(
                "text_encoder",
                b(step_text_encoder),
                ("data",),
                ("model", "text", "train.seed", "train.batch_size"),
                outputs=_files("models/text_encoder", "models/losses.json"),
            ),
            Step("base", b(step_base), ("text_encoder",), model_keys, outputs=_files("models/base")),
            Step(
                "finetune",
                b(step_finetune),
                ("base",),
                model_keys,
                outputs=_variant_folders,
                clear_on_change=True,  # a variant finished under another config must not be resumed
            ),
            Step(
                "fidelity",
                b(step_fidelity),
                ("finetune",),
                ("fidelity", "stats"),
                outputs=_sample_files,
                clear_on_change=True,  # sampling is the costliest step after training: before the cheap ones
            ),
            Step(
                "attention",
                b(step_attention),
                ("finetune",),
                ("attention",),
                outputs=_files(f"maps/{ARCH}"),
                clear_on_change=True,
            ),
            Step(
                "localization",
                b(step_localization),
                ("attention",),
                ("stats",),
                outputs=_files(
                    "localization_images.csv",
                    "localization.csv",
                    "localization_timestep.csv",
                    "localization_layer.csv",
                ),
            ),
            Step("drift", b(step_drift), ("attention",), ("stats",), outputs=_files("drift.csv")),
            Step(
                "gates",
                b(step_gates),
                ("localization",),
                ("stats",),
                outputs=_files("gates.csv", "verdict.json"),
            ),
            Step(
                "report",
                b(step_report),
                ("localization", "fidelity", "drift", "gates"),
                (),
                outputs=_files("report.html", "figures"),
            ),
        ]


def study_steps() -> list[Step[DiffusionConfig]]:
    """The study's steps (of a fresh ``DiffusionJob``)."""
    return DiffusionJob().steps()


def run_study(
    config: DiffusionConfig,
    out: str | Path,
    force: Sequence[str] = (),
    until: str | None = None,
    log: Callable[[str], None] | None = print,
) -> RunPaths:
    """Run (or resume) the study into ``out`` on ``evidrift.core.steps.run_steps`` (``--force STEP`` redoes
    it and every later step, ``--until STEP`` stops after it); writes ``diffusion_config.json``."""
    paths = RunPaths.at(out)
    ctx = distributed.setup(config.device)
    if ctx.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(paths.root / "diffusion_config.json", config_dict(config))
    quiet_hub_logging()
    run_steps(DiffusionJob().steps(), config, paths, ctx, force=force, until=until, echo=log)
    return paths
