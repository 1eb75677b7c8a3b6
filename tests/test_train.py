"""train.py / evaluate.py: schedule, losses, batching, the epoch loop, resume after an interruption."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

import evidrift  # noqa: F401  (before timm)
from builders import BlobImages
from evidrift.classifier import checkpoint, models
from evidrift.classifier.config import HeadConfig, StageConfig
from evidrift.classifier.evaluate import evaluate_study
from evidrift.classifier.feeds import ImageFeed, TensorFeed
from evidrift.classifier.freezing import freeze_backbone
from evidrift.classifier.loop import FitOptions, StageFiles, Trainee, fit
from evidrift.classifier.schedule import compute_loss, improved, lr_at
from evidrift.classifier.training import train_study
from evidrift.core.distributed import Context, epoch_batches
from evidrift.core.io import read_jsonl
from evidrift.core.paths import RunPaths
from evidrift.data.sources import load_manifest
from evidrift.stats import classification_metrics
from evidrift.studies.config import parse_config


def _files(folder: Path) -> StageFiles:
    return StageFiles(
        final=folder / "stage2.safetensors",
        last=folder / "stage2.last.pt",
        best=folder / "stage2.best.safetensors",
        metrics=folder / "metrics.jsonl",
    )


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.01)
    assert lr_at(0, 10, 0, 2.0) == pytest.approx(2.0)
    values = [lr_at(s, 50, 5, 1.0) for s in range(5, 50)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_losses() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    expected_ce = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 2]) / 2
    assert compute_loss(logits, labels, "ce").item() == pytest.approx(expected_ce.item(), abs=1e-6)
    targets = torch.tensor([[1, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1]])
    p = torch.sigmoid(logits)
    expected_bce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert compute_loss(logits, labels, "bce").item() == pytest.approx(expected_bce.item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"train\.loss"):
        compute_loss(logits, labels, "mse")


def test_improved_direction_and_nan() -> None:
    assert (
        improved(0.5, None, "val_loss")
        and improved(0.4, 0.5, "val_loss")
        and not improved(0.6, 0.5, "val_loss")
    )
    assert improved(0.6, 0.5, "val_accuracy") and not improved(0.5, 0.5, "val_accuracy")
    assert not improved(float("nan"), 0.5, "val_macro_auroc") and improved(
        0.1, float("nan"), "val_macro_auroc"
    )


def test_epoch_batches_seeded_sharded_and_no_single_sample_batch() -> None:
    one = Context()
    a, b = epoch_batches(11, 4, one, 3, 0, True, True), epoch_batches(11, 4, one, 3, 0, True, True)
    assert a == b and [len(x) for x in a] == [4, 4, 3]
    assert epoch_batches(11, 4, one, 3, 1, True, True) != a
    assert [len(x) for x in epoch_batches(9, 4, one, 0, 0, True, True)] == [4, 4]  # trailing 1 dropped
    assert [len(x) for x in epoch_batches(9, 4, one, 0, 0, True, False)] == [4, 4, 1]  # kept for eval
    ranks = [epoch_batches(10, 2, Context(rank=r, world_size=2), 5, 2, True, False) for r in range(2)]
    seen = sorted(i for r in ranks for batch in r for i in batch)
    assert seen == list(range(10))


def test_classification_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    probs[np.arange(60), labels] += rng.random(60) * 0.5
    got = classification_metrics(labels, probs)
    assert got["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert got["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    aurocs = [roc_auc_score(labels == c, probs[:, c]) for c in range(4)]
    assert got["auroc"] == pytest.approx(aurocs, abs=1e-9)
    assert got["macro_auroc"] == pytest.approx(np.mean(aurocs))
    # a class absent from the labels: NaN AUROC, excluded from the macro mean
    missing = classification_metrics(np.array([0, 1, 0, 1]), np.array([[0.9, 0.1, 0], [0.2, 0.7, 0.1]] * 2))
    assert math.isnan(missing["auroc"][2]) and missing["macro_auroc"] == pytest.approx(1.0)


def _run_fit(folder: Path, stop_at: int | None = None, cached: bool = False) -> nn.Module:
    """Stage-2-like training of a tiny timm model (or stage-1-like on cached features)."""
    torch.manual_seed(0)
    model = models.build_model("test_resnet", 3, HeadConfig(type="mlp2", hidden=8))
    cfg = StageConfig(epochs=3, lr=3e-3, batch_size=8, warmup_epochs=0.5, patience=None, monitor="val_loss")
    train_set, val_set = BlobImages(40, seed=0, augment=True), BlobImages(16, seed=1)
    ctx = Context()

    def interrupt(label: str, step: int) -> None:
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt(f"simulated kill at step {step}")

    if cached:
        freeze_backbone(model)
        head = models.get_head(model)
        with torch.no_grad():
            feats = [
                models.pooled_features(model.eval(), torch.stack([s["image"] for s in d]))
                for d in (train_set, val_set)
            ]
        train_feed = TensorFeed(feats[0], torch.as_tensor(train_set.labels))
        val_feed = TensorFeed(feats[1], torch.as_tensor(val_set.labels))
        nets, loss = (head, head, head), "bce"
    else:
        train_feed, val_feed = ImageFeed(train_set), ImageFeed(val_set)
        nets, loss = (model, model, model), "ce"
    files = _files(folder)
    options = FitOptions(cfg, loss, "tag", 7, label="t", stage="2", progress=False, on_step=interrupt)
    fit(Trainee(model, *nets), train_feed, val_feed, ctx, files, options)
    return model


@pytest.mark.parametrize("cached", [False, True])
def test_resume_after_interruption_gives_identical_weights(tmp_path: Path, cached: bool) -> None:
    reference = _run_fit(tmp_path / "a", cached=cached)
    with pytest.raises(KeyboardInterrupt):
        _run_fit(tmp_path / "b", stop_at=8, cached=cached)  # 5 steps per epoch: killed inside epoch 2
    assert (tmp_path / "b" / "stage2.last.pt").is_file()
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [0]
    resumed = _run_fit(tmp_path / "b", cached=cached)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    records = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records == [
        {**r, "seconds": records[i]["seconds"], "images_per_s": records[i]["images_per_s"]}
        for i, r in enumerate(read_jsonl(tmp_path / "a" / "metrics.jsonl"))
    ]


def test_fit_learns_and_keeps_best(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build_model("test_resnet", 3)
    cfg = StageConfig(epochs=6, lr=1e-2, batch_size=8, warmup_epochs=0.0, patience=2, monitor="val_accuracy")
    files = _files(tmp_path)
    train, val = ImageFeed(BlobImages(48, seed=0)), ImageFeed(BlobImages(24, seed=1))
    options = FitOptions(cfg, "ce", "x", 0, label="t", progress=False)
    state = fit(Trainee(model, model, model, model), train, val, Context(), files, options)
    records = read_jsonl(files.metrics)
    assert state.best == max(r["val_accuracy"] for r in records)
    assert state.best > 0.6  # 3 classes: chance is 1/3
    assert records[0]["train_loss"] > records[-1]["train_loss"]
    assert set(records[0]) >= {
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "val_auroc",
        "val_macro_auroc",
    }
    assert files.best.is_file()
    # early stopping: stopped only after `patience` epochs without improvement
    if state.stopped:
        assert state.epoch - state.best_epoch == cfg.patience


def _tiny_study_dict(out: Path) -> dict:
    return {
        "data": {"phantom": {"n": 60, "size": 32, "n_source": 48}, "split": {"val": 0.2, "test": 0.25}},
        "models": [{"arch": "test_resnet", "image_size": 32, "head": {"type": "mlp2", "hidden": 8}}],
        "train": {
            "stage0": {"epochs": 1, "batch_size": 8},
            "stage1": {"epochs": 2, "batch_size": 8, "cache_features": True},
            "stage2": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 3},
        },
        "stats": {"n_boot": 200},
        "output": {"dir": str(out)},
    }


#: Runs the tiny study in a child process that SIGKILLs itself after optimizer step 5 of stage 2.
KILLED_RUN = """
import json, os, signal, sys, torch
import evidrift
from evidrift.core.paths import RunPaths
from evidrift.studies.config import parse_config
from evidrift.classifier.training import train_study
torch.set_num_threads(1)
config = parse_config(json.loads(sys.argv[1]))

def kill(label, step):
    if label.endswith("stage 2") and step == 5:  # inside stage 2's second epoch
        os.kill(os.getpid(), signal.SIGKILL)

train_study(config, RunPaths.at(config.output.dir), progress=False, on_step=kill)
"""


@pytest.mark.slow  # SIGKILL in a subprocess, two tiny studies
def test_study_killed_with_sigkill_resumes_to_identical_weights_and_evaluates(tmp_path: Path) -> None:
    reference_cfg = parse_config(_tiny_study_dict(tmp_path / "a"))
    reference = train_study(reference_cfg, RunPaths.at(tmp_path / "a"), progress=False)
    assert set(reference["test_resnet"]) == {"0", "1", "2"}

    raw = _tiny_study_dict(tmp_path / "b")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(raw)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    config = parse_config(raw)
    paths = RunPaths.at(tmp_path / "b")
    assert not paths.checkpoint("test_resnet", 2).exists()
    steps: list[tuple[str, int]] = []
    train_study(config, paths, progress=False, on_step=lambda label, step: steps.append((label, step)))
    assert steps == [("test_resnet stage 2", 4), ("test_resnet stage 2", 5), ("test_resnet stage 2", 6)]
    for stage in ("0", "1", "2"):
        a, meta_a = checkpoint.load_checkpoint(paths.checkpoint("test_resnet", stage))
        b, _ = checkpoint.load_checkpoint(RunPaths.at(tmp_path / "a").checkpoint("test_resnet", stage))
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), (stage, name)
    assert meta_a.stage == 2 and meta_a.cam_layers == ["layer4"] and meta_a.image_size == 32
    leftovers = sorted(p.name for p in paths.model_dir("test_resnet").iterdir())
    assert leftovers == [
        "metrics.jsonl", "stage0.json", "stage0.safetensors", "stage1.json", "stage1.safetensors",
        "stage2.json", "stage2.safetensors",
    ]  # fmt: skip
    records = read_jsonl(paths.train_metrics("test_resnet"))
    assert [(r["stage"], r["epoch"]) for r in records] == [("0", 0), ("1", 0), ("1", 1), ("2", 0), ("2", 1)]

    table = evaluate_study(config, paths)
    frame = pd.read_parquet(paths.eval_table("test_resnet"))
    manifest, _ = load_manifest(paths)
    assert list(frame.columns) == ["id", "label", "pred_stage1", "pred_stage2", "prob_stage1", "prob_stage2"]
    assert sorted(frame["id"]) == sorted(manifest.loc[manifest["split"] == "test", "id"])
    assert all(len(p) == 5 and abs(sum(p) - 1) < 1e-5 for p in frame["prob_stage2"])
    assert list(table["stage"]) == [1, 2] and (table["accuracy_ci_low"] <= table["accuracy"]).all()
    assert paths.eval_table("classification").with_suffix(".csv").is_file()


def test_fit_without_validation_keeps_the_last_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    x = torch.randn(20, 4)
    train, empty = TensorFeed(x, (x[:, 0] > 0).long()), TensorFeed(torch.zeros(0, 4), torch.zeros(0))
    cfg = StageConfig(epochs=4, batch_size=5, patience=1, monitor="val_accuracy")
    files = _files(tmp_path)
    options = FitOptions(cfg, "ce", "t", 0, label="t", progress=False)
    state = fit(Trainee(head, head, head, head), train, empty, Context(), files, options)
    assert state.best_epoch == 3 and not state.stopped
    assert math.isnan(read_jsonl(files.metrics)[-1]["val_accuracy"])


def test_stage_image_scale_multiplies_each_models_side() -> None:
    from evidrift.classifier.config import ModelConfig
    from evidrift.classifier.training import image_size_for

    assert image_size_for(ModelConfig(arch="test_resnet", image_size=128), StageConfig(image_scale=0.5)) == 64
    assert image_size_for(ModelConfig(arch="inceptionv3", image_size=192), StageConfig(image_scale=0.5)) == 96
    assert image_size_for(ModelConfig(arch="inceptionv3"), StageConfig(image_scale=0.5)) == 150  # 299 / 2
    assert image_size_for(ModelConfig(arch="test_resnet", image_size=128), StageConfig(image_size=40)) == 40
    assert image_size_for(ModelConfig(arch="test_resnet", image_size=128), StageConfig()) == 128


@pytest.mark.parametrize(
    ("head", "cached", "kind"),
    [({"type": "linear"}, False, "center+scale"), ({"type": "linear", "bias": False}, True, "scale")],
)
def test_stage1_standardized_head_is_folded_into_a_plain_checkpoint(
    tmp_path: Path, head: dict, cached: bool, kind: str
) -> None:
    """Stage 1 trains on standardized features; the checkpoint is a plain model whose predictions on the val
    split reproduce the val accuracy and loss logged for its best epoch."""
    from evidrift.classifier.feeds import predict_logits
    from evidrift.data.dataset import ManifestDataset

    raw = _tiny_study_dict(tmp_path)
    raw["models"][0]["head"] = head
    raw["train"]["stage0"]["image_scale"] = 0.75  # pretrains at 24 px
    raw["train"]["stage1"]["cache_features"] = cached
    raw["train"]["precision"] = "fp32"  # the logged val figures are re-computed in fp32 below
    config = parse_config(raw)
    paths = RunPaths.at(tmp_path)
    train_study(config, paths, stages=("0", "1"), progress=False)
    meta = checkpoint.read_checkpoint_meta(paths.checkpoint("test_resnet", "1"))
    assert meta.standardized_features == kind
    assert checkpoint.read_checkpoint_meta(paths.checkpoint("test_resnet", "0")).image_size == 24
    model, meta = checkpoint.load_checkpoint(paths.checkpoint("test_resnet", "1"))
    assert not any(isinstance(m, models.StandardizedHead) for m in model.modules())
    assert set(model.state_dict()) == set(
        models.build_model("test_resnet", 5, HeadConfig(**head)).state_dict()
    )
    frame, classes = load_manifest(paths)
    val = frame[(frame["split"] == "val") & (frame["status"] == "ok")].reset_index(drop=True)
    dataset = ManifestDataset(val, classes, 32, mean=meta.mean, std=meta.std)
    labels, logits = predict_logits(model, ImageFeed(dataset), Context(), 8)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(meta.metrics["val_accuracy"], abs=1e-6)
    assert compute_loss(logits, labels, "ce").item() == pytest.approx(meta.metrics["val_loss"], rel=1e-4)


def test_stage1_without_standardization_keeps_raw_features(tmp_path: Path) -> None:
    raw = _tiny_study_dict(tmp_path)
    raw["train"]["stage1"]["standardize_features"] = False
    config = parse_config(raw)
    paths = RunPaths.at(tmp_path)
    train_study(config, paths, stages=("0", "1"), progress=False)
    assert "standardized_features" not in (
        checkpoint.read_checkpoint_meta(paths.checkpoint("test_resnet", "1")).model_extra or {}
    )


def test_fit_ends_the_cosine_at_final_lr_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    train = TensorFeed(x, (x[:, 0] > 0).long())
    last_lr = {}
    for ratio in (0.01, 0.5):
        head = nn.Linear(4, 2)
        cfg = StageConfig(epochs=3, batch_size=5, lr=0.1, warmup_epochs=0, final_lr_ratio=ratio)
        files = _files(tmp_path / str(ratio))
        options = FitOptions(cfg, "ce", "t", 0, label="t", progress=False)
        fit(Trainee(head, head, head, head), train, train, Context(), files, options)
        last_lr[ratio] = read_jsonl(files.metrics)[-1]["lr"]
    # the logged lr is the last step's: 23 of 24 steps into the cosine
    expected = {r: lr_at(23, 24, 0, 0.1, r) for r in last_lr}
    assert last_lr == pytest.approx(expected)
    assert last_lr[0.5] > 0.05 > 0.01 > last_lr[0.01]


def test_new_stage_keys_enter_the_stage_hash_only_when_set(tmp_path: Path) -> None:
    from evidrift.classifier.training import stage_hash

    raw = _tiny_study_dict(tmp_path)
    base = parse_config(raw)
    model = base.models[0]
    hashes = {stage: stage_hash(base, model, stage) for stage in ("0", "1", "2")}
    explicit = json.loads(json.dumps(raw))
    explicit["train"]["stage2"]["final_lr_ratio"] = 0.01  # the value before the key existed
    explicit["train"]["stage2"]["augment"] = None
    same = parse_config(explicit)
    assert {stage: stage_hash(same, same.models[0], stage) for stage in hashes} == hashes
    changed = json.loads(json.dumps(raw))
    changed["train"]["stage2"]["augment"] = False
    other = parse_config(changed)
    assert stage_hash(other, other.models[0], "1") == hashes["1"]
    assert stage_hash(other, other.models[0], "2") != hashes["2"]


def test_a_stages_augment_overrides_data_augment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evidrift.classifier import training

    built: list[bool] = []
    dataset = training._dataset

    def recording(*args: object, **kwargs: object) -> object:
        built.append(bool(args[6]))  # (frame, classes, size, config, mean, std, augment, seed)
        return dataset(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "_dataset", recording)
    raw = _tiny_study_dict(tmp_path)
    raw["train"]["stage0"].update(augment=False, max_steps_per_epoch=1)
    config = parse_config(raw)
    assert config.data.augment
    train_study(config, RunPaths.at(tmp_path), stages=("0",), progress=False)
    assert built == [False, False]  # train and val datasets: the stage's False wins over data.augment
