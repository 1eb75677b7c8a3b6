"""train.precision (evidrift.precision), the relative weight change per stage, full-batch training."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import evidrift  # noqa: F401  (before timm)
from builders import BlobImages
from evidrift.classifier import models, precision
from evidrift.classifier.config import StageConfig
from evidrift.classifier.feeds import ImageFeed
from evidrift.classifier.loop import FitOptions, StageFiles, Trainee, fit, full_batches
from evidrift.classifier.precision import Precision, PrecisionError, resolve_precision
from evidrift.classifier.training import stage_hash
from evidrift.classifier.weight_change import relative_change, stage_weight_change
from evidrift.core.config import ConfigError
from evidrift.core.distributed import Context
from evidrift.core.io import read_jsonl
from evidrift.studies.config import parse_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- option parsing -----------------------------------------------------------------------------------------
def test_resolve_precision_explicit_values() -> None:
    fp32, bf16 = resolve_precision("fp32", "cpu"), resolve_precision("bf16", "cpu")
    assert (fp32.name, fp32.bf16, fp32.channels_last) == ("fp32", False, False)
    assert (bf16.name, bf16.bf16, bf16.channels_last, bf16.device_type) == ("bf16", True, True, "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "bf16_native", lambda device: native)
    assert resolve_precision("auto", torch.device("cpu")).name == ("bf16" if native else "fp32")


def test_unknown_precision_names_the_key() -> None:
    with pytest.raises(PrecisionError, match=r"train\.precision.*auto, fp32, bf16.*'fp16'"):
        resolve_precision("fp16", "cpu")


def test_config_precision_default_and_errors() -> None:
    base = {"models": [{"arch": "resnet18"}]}
    assert parse_config(base).train.precision == "auto"
    assert parse_config({**base, "train": {"precision": "fp32"}}).train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        parse_config({**base, "train": {"precision": "fp16"}})


def test_precision_is_part_of_the_stage_hash() -> None:
    configs = [
        parse_config({"models": [{"arch": "resnet18"}], "train": {"precision": p}}) for p in ("fp32", "bf16")
    ]
    hashes = [stage_hash(c, c.models[0], "0") for c in configs]
    assert hashes[0] != hashes[1]


def test_bf16_autocast_and_channels_last_are_scoped() -> None:
    bf16, fp32 = Precision("bf16"), Precision("fp32")
    layer = torch.nn.Linear(4, 2)
    x = torch.ones(3, 4)
    with bf16.autocast():
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32  # outside the block: fp32 again
    with fp32.autocast():
        assert layer(x).dtype == torch.float32
    image = torch.zeros(2, 3, 5, 5)
    assert bf16.prepare_input(image).is_contiguous(memory_format=torch.channels_last)
    assert fp32.prepare_input(image).is_contiguous()
    conv = bf16.prepare_model(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dtype == torch.float32


# --- the bf16 path on a tiny model --------------------------------------------------------------------------
def _fit(folder: Path, mode: str) -> tuple[torch.nn.Module, list[dict], list[int]]:
    torch.manual_seed(0)
    model = models.build_model("test_resnet", 3)
    chosen = resolve_precision(mode, "cpu")
    chosen.prepare_model(model)
    cfg = StageConfig(
        epochs=4, lr=1e-2, batch_size=8, warmup_epochs=0.0, patience=None, monitor="val_accuracy"
    )
    files = StageFiles(
        folder / "s.safetensors", folder / "s.last.pt", folder / "s.best.safetensors", folder / "m.jsonl"
    )
    train, val = ImageFeed(BlobImages(44, seed=0)), ImageFeed(BlobImages(24, seed=1))
    steps: list[int] = []
    options = FitOptions(
        cfg, "ce", "t", 0, label="t", progress=False, on_step=lambda label, step: steps.append(step),
        precision=chosen,
    )  # fmt: skip
    fit(Trainee(model, model, model, model), train, val, Context(), files, options)
    return model, read_jsonl(files.metrics), steps


def test_bf16_training_learns_keeps_fp32_weights_and_drops_the_partial_batch(tmp_path: Path) -> None:
    model, records, steps = _fit(tmp_path, "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert max(r["val_accuracy"] for r in records) > 0.6  # chance is 1/3
    assert records[0]["train_loss"] > records[-1]["train_loss"]
    # 44 train images, batch 8: 5 full batches per epoch, the trailing 4 images dropped
    assert steps == list(range(1, 4 * 5 + 1))


def test_full_batches() -> None:
    assert full_batches([[0, 1, 2], [3, 4, 5], [6]], 3) == [[0, 1, 2], [3, 4, 5]]
    assert full_batches([[0, 1]], 3) == [[0, 1]]  # no full batch: keep what there is


# --- relative weight change ---------------------------------------------------------------------------------
def test_relative_change_exact() -> None:
    start = {"body.w": torch.tensor([3.0, 4.0]), "head.fc.weight": torch.tensor([1.0, 0.0])}
    end = {"body.w": torch.tensor([0.0, 4.0]), "head.fc.weight": torch.tensor([1.0, 0.0])}
    assert relative_change(start, end) == pytest.approx(3 / math.sqrt(26), abs=1e-12)
    assert relative_change(start, end, lambda n: n.startswith("body")) == pytest.approx(0.6, abs=1e-12)
    assert relative_change(start, end, lambda n: n.startswith("head")) == 0.0
    # other shapes, integer tensors and missing names are left out; nothing left: NaN
    assert math.isnan(relative_change({"a": torch.ones(2)}, {"a": torch.ones(3)}))
    assert math.isnan(relative_change({"n": torch.tensor([2])}, {"n": torch.tensor([5])}))
    assert math.isnan(relative_change({"z": torch.zeros(2)}, {"z": torch.ones(2)}))


def test_stage_weight_change_splits_backbone_and_head() -> None:
    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Linear(2, 1, bias=False))
    net.add_module("head", torch.nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net.body.weight.copy_(torch.tensor([[3.0, 4.0]]))
        net.head.weight.fill_(2.0)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net.body.weight.copy_(torch.tensor([[3.0, 5.0]]))  # moved by 1 of norm 5
        net.head.weight.fill_(3.0)  # moved by 1 of norm 2
    change = stage_weight_change(start, net, "head")
    assert change["backbone"] == pytest.approx(0.2, abs=1e-12)
    assert change["head"] == pytest.approx(0.5, abs=1e-12)
    assert change["all"] == pytest.approx(math.sqrt(2) / math.sqrt(29), abs=1e-12)
