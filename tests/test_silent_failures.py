"""Issue 12, "nothing silent": what used to pass without a word now changes behaviour or says so.

One section per item: (1) the data step's hash covers the files it read, (2) per-stage defaults key by key,
(3) stage 2 keeps BatchNorm statistics by default and every stage stops on divergence, (4) DICOM by content
and ignored files listed, (5) CSV boxes in the localization metrics, (6) `validate` checks what `run` would
reject, (7) model names are safe folder names, (8) a run directory of another study is refused, (9) the
smaller warnings and messages."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import evidrift  # noqa: F401  (before timm)
from builders import write_checkpoint, write_dicom, write_manifest, write_maps
from evidrift.classifier.config import ModelConfig, StageConfig, TrainConfig
from evidrift.cli.app import app
from evidrift.core.config import ConfigError
from evidrift.core.distributed import Context
from evidrift.core.io import write_text_atomic
from evidrift.core.paths import RunPaths
from evidrift.data.readers import read_image
from evidrift.data.sources import ManifestError, load_manifest, prepare_data, scan_class_folders
from evidrift.studies.config import parse_config
from evidrift.studies.drift.study import STEPS, StudyError, run_study

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


def _png(path: Path, value: int = 100, size: tuple[int, int] = (16, 16), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    pixels = np.full(size[::-1], value, dtype=dtype)
    pixels[0, 0] = 0
    Image.fromarray(pixels).save(path)
    return path


def _class_folders(root: Path, per_class: int = 4) -> Path:
    for label in ("normal", "sick"):
        for k in range(per_class):
            _png(root / label / f"{label}{k}.png", value=60 + 10 * k)
    return root


class StubSteps:
    """Stub step functions for every step but ``data`` (the real one): they record their calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def runners(self) -> dict[str, Callable[..., None]]:
        def make(step: str) -> Callable[..., None]:
            def run(config: Any, paths: RunPaths, ctx: Context) -> None:
                self.calls.append(step)

            return run

        return {step: make(step) for step in STEPS if step != "data"}


def _folder_study(data: Path, out: Path, **extra: Any) -> Any:
    return parse_config(
        {
            "data": {"source": "folder", "path": str(data), "split": {"val": 0.25, "test": 0.25}},
            "models": [{"arch": "resnet18", "image_size": 32}],
            "output": {"dir": str(out)},
            **extra,
        }
    )


# --- 1. stale data ------------------------------------------------------------------------------------------
def test_folder_fingerprint_and_what_changed(tmp_path: Path) -> None:
    from evidrift.data.sources import data_fingerprint, fingerprint_changes

    data = _class_folders(tmp_path / "data")
    config = _folder_study(data, tmp_path / "run")
    before = data_fingerprint(config.data)
    assert sorted(before) == sorted(f"{c}/{c}{k}.png" for c in ("normal", "sick") for k in range(4))
    _png(data / "normal" / "new.png")
    (data / "sick" / "sick0.png").unlink()
    _png(data / "sick" / "sick1.png", value=200, size=(20, 20))
    after = data_fingerprint(config.data)
    assert fingerprint_changes(before, after) == (
        "1 added (normal/new.png), 1 removed (sick/sick0.png), 1 modified (sick/sick1.png)"
    )
    assert fingerprint_changes(after, after) == ""


def test_csv_fingerprint_sees_rows_and_their_files(tmp_path: Path) -> None:
    from evidrift.data.sources import data_fingerprint, fingerprint_changes

    for k in range(3):
        _png(tmp_path / f"i{k}.png")
    csv = tmp_path / "data.csv"
    csv.write_text("path,label\ni0.png,a\ni1.png,b\n")
    config = parse_config({"data": {"source": "csv", "path": str(csv)}})
    before = data_fingerprint(config.data)
    csv.write_text("path,label,x0,y0,x1,y1\ni0.png,a,1,1,4,4\ni1.png,b,,,,\ni2.png,unknown,,,,\n")
    assert (
        fingerprint_changes(before, data_fingerprint(config.data))
        == "1 added (i2.png), 0 removed, 1 modified (i0.png)"
    )


def test_changed_data_reruns_the_data_step_and_everything_after(tmp_path: Path) -> None:
    data = _class_folders(tmp_path / "data")
    config = _folder_study(data, tmp_path / "run")
    stubs, lines = StubSteps(), []
    run_study(config, runners=stubs.runners(), echo=lines.append, ctx=Context())
    assert len(pd.read_parquet(RunPaths.at(tmp_path / "run").manifest)) == 8
    stubs.calls.clear()
    lines.clear()
    results = run_study(config, runners=stubs.runners(), echo=lines.append, ctx=Context())
    assert {r.status for r in results} == {"skipped"} and stubs.calls == []

    _png(data / "normal" / "added.png")
    _png(data / "sick" / "added2.png")
    results = run_study(config, runners=stubs.runners(), echo=lines.append, ctx=Context())
    assert [r.status for r in results] == ["ran"] * len(STEPS)
    assert stubs.calls == list(STEPS[1:])
    changed = [line for line in lines if "changed" in line]
    assert changed and "2 added" in changed[0] and "0 removed" in changed[0]
    assert "redoing data and every step after it" in changed[0]
    manifest = pd.read_parquet(RunPaths.at(tmp_path / "run").manifest)
    assert len(manifest) == 10 and manifest["path"].str.endswith("added.png").any()


def test_a_file_deleted_after_the_data_step_is_named_with_the_fix(tmp_path: Path) -> None:
    data = _class_folders(tmp_path / "data")
    config = _folder_study(data, tmp_path / "run")
    paths = RunPaths.at(tmp_path / "run")
    prepare_data(config, paths)
    gone = data / "sick" / "sick2.png"
    gone.unlink()
    with pytest.raises(ManifestError, match=r"(?s)no longer exist.*sick2\.png.*--force data"):
        load_manifest(paths)


# --- 2. per-stage defaults, key by key ----------------------------------------------------------------------
_OTHER_VALUES: dict[str, Any] = {
    "epochs": 7,
    "lr": 0.0123,
    "weight_decay": 0.05,
    "batch_size": 3,
    "optimizer": "sgd",
    "momentum": 0.5,
    "warmup_epochs": 0.25,
    "patience": 2,
    "monitor": "val_loss",
    "grad_clip": 2.5,
    "cache_features": False,
    "standardize_features": False,
    "freeze_batchnorm": False,
    "image_size": 48,
    "image_scale": 0.5,
    "max_steps_per_epoch": 4,
    "divergence_factor": 3.0,
    "augment": False,
    "final_lr_ratio": 0.3,
    "feature_scale": "per_feature",
}
_STAGE_ONLY = {
    "cache_features": "stage1",
    "standardize_features": "stage1",
    "feature_scale": "stage1",
    "freeze_batchnorm": "stage2",
}
_CASES = [
    (stage, key)
    for stage in ("stage0", "stage1", "stage2")
    for key in StageConfig.model_fields
    if _STAGE_ONLY.get(key, stage) == stage
]


def test_every_stage_key_has_a_probe_value() -> None:
    assert set(_OTHER_VALUES) == set(StageConfig.model_fields)


@pytest.mark.parametrize(("stage", "key"), _CASES, ids=[f"{s}.{k}" for s, k in _CASES])
def test_setting_one_stage_key_keeps_the_others(stage: str, key: str) -> None:
    defaults = getattr(TrainConfig(), stage).model_dump()
    config = parse_config({"train": {stage: {key: _OTHER_VALUES[key]}}})
    resolved = getattr(config.train, stage).model_dump()
    assert resolved[key] == _OTHER_VALUES[key]
    assert {k: v for k, v in resolved.items() if k != key} == {k: v for k, v in defaults.items() if k != key}
    for other in {"stage0", "stage1", "stage2"} - {stage}:  # the other stages are untouched too
        assert getattr(config.train, other) == getattr(TrainConfig(), other)


def _readme_stage_defaults() -> dict[str, dict[str, str]]:
    """{row key: {config key: value text}} of the README's `train.stage*` rows."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `train\.(stage\{0,1,2\}|stage[012])\.\*`[^|]*\| ([^|]+) \|", line)
        if match:
            pairs = [item.strip().split(" ", 1) for item in match.group(2).split(",")]
            if all(len(pair) == 2 for pair in pairs):  # the reference table, not the "you change" one
                rows[match.group(1)] = {k: v.strip() for k, v in pairs}
    return rows


def _text_value(text: str, like: Any) -> Any:
    parsed = yaml.safe_load(text)
    if isinstance(like, float) and isinstance(parsed, str | int):
        return float(parsed)
    return parsed


def test_readme_table_equals_the_resolved_defaults_printed_by_validate(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("train:\n  stage2:\n    epochs: 2\n  stage0:\n    batch_size: 4\n")
    result = runner.invoke(app, ["validate", str(study)])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)["train"]
    assert printed["stage2"]["epochs"] == 2 and printed["stage2"]["lr"] == 3e-4
    assert printed["stage0"]["lr"] == 2e-3 and printed["stage0"]["monitor"] == "val_accuracy"
    readme = _readme_stage_defaults()
    assert set(readme) == {"stage{0,1,2}", "stage0", "stage1", "stage2"}
    listed = set().union(*readme.values())
    assert listed == set(StageConfig.model_fields)  # every key is in the table
    set_in_the_study = {("stage2", "epochs"), ("stage0", "batch_size")}
    for stage in ("stage0", "stage1", "stage2"):
        expected = {**readme["stage{0,1,2}"], **readme[stage]}
        defaults = TrainConfig().model_dump(mode="json")[stage]
        for key, text in expected.items():
            assert _text_value(text, defaults[key]) == defaults[key], f"README {stage}.{key}"
            if (stage, key) not in set_in_the_study:
                assert printed[stage][key] == defaults[key], f"validate {stage}.{key}"


# --- 3. stage 2 safe by default, and the divergence guard ---------------------------------------------------
def test_stage2_keeps_batchnorm_statistics_by_default() -> None:
    assert TrainConfig().stage2.freeze_batchnorm is True
    assert parse_config({"train": {"stage2": {"lr": 3e-4}}}).train.stage2.freeze_batchnorm is True
    from evidrift.classifier.config import STAGE_DEFAULTS

    assert STAGE_DEFAULTS["stage2"]["freeze_batchnorm"] is True


def test_divergence_rule() -> None:
    from evidrift.classifier.loop import TrainState, divergence

    def record(train: float, val: float, auroc: list[float] | None = None) -> dict[str, Any]:
        return {"train_loss": train, "val_loss": val, "val_auroc": [0.5] if auroc is None else auroc}

    state = TrainState()
    assert divergence(record(2.0, 2.0), state, 10.0) is None
    assert divergence(record(float("nan"), 2.0), state, 10.0) == "train_loss is nan"
    assert divergence(record(2.0, float("inf")), state, None) == "val_loss is inf"
    assert divergence(record(2.0, float("nan"), auroc=[]), state, 10.0) is None  # no val split: not a loss
    start = {"train_loss": 0.5, "val_loss": 1.0}
    # vs the starting checkpoint: the val loss only (its train loss came from other inputs)
    assert divergence(record(10.9, 1.2), state, 10.0, start) is None
    assert divergence(record(1.0, 11.0), state, 10.0, start) == (
        "val_loss 11 is 11.0x the starting checkpoint's 1 (divergence_factor 10)"
    )
    state.first_train_loss, state.first_val_loss = 2.0, 1.5
    assert divergence(record(19.0, 1.5), state, 10.0, start) is None  # later epochs: vs the first epoch
    assert divergence(record(1.0, 16.0), state, 10.0) == (
        "val_loss 16 is 10.7x the first epoch's 1.5 (divergence_factor 10)"
    )
    assert divergence(record(1000.0, 1000.0), state, None) is None


class _Exploding(torch.nn.Module):
    """A linear classifier whose logits are scaled by ``scale`` (set from outside: 1, then huge)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_a_diverging_stage_stops_naming_epoch_loss_and_settings_keeping_the_last_good_epoch(
    tmp_path: Path,
) -> None:
    from evidrift.classifier.feeds import TensorFeed
    from evidrift.classifier.loop import (
        FitOptions,
        StageFiles,
        Trainee,
        TrainingDivergedError,
        fit,
        load_resume_state,
    )

    torch.manual_seed(0)
    model = _Exploding()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    cfg = StageConfig(epochs=4, lr=1e-3, batch_size=8, warmup_epochs=0, patience=None, freeze_batchnorm=False)
    files = StageFiles(
        final=tmp_path / "stage2.safetensors",
        last=tmp_path / "stage2.last.pt",
        best=tmp_path / "stage2.best.safetensors",
        metrics=tmp_path / "metrics.jsonl",
    )

    def blow_up(label: str, step: int) -> None:
        model.scale = 1.0 if step <= 4 else 1e4  # 4 steps per epoch: from the 2nd step of epoch 2 on

    with pytest.raises(TrainingDivergedError) as caught:
        options = FitOptions(
            cfg, "ce", "tag", 0, label="m stage 2", stage="2", progress=False, on_step=blow_up
        )
        fit(
            Trainee(model, model, model, model),
            TensorFeed(x, y),
            TensorFeed(x[:8], y[:8]),
            Context(),
            files,
            options,
        )
    message = str(caught.value)
    assert "m stage 2 diverged at epoch 2" in message
    assert re.search(r"train_loss [\d.e+]+ is [\d.]+x the first epoch's", message)
    assert "train.stage2.lr (now 0.001; try 0.0001)" in message
    assert "train.stage2.freeze_batchnorm: true" in message and "divergence_factor" in message
    assert files.best.is_file() and not files.final.exists()
    optimizer = torch.optim.AdamW(model.parameters())
    kept = load_resume_state(files.last, model, optimizer, "tag")
    assert kept is not None and kept.epoch == 0  # the last good epoch's state, not the diverged one's
    records = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "diverged" in records[1]


# --- 4. DICOM by content, ignored files listed --------------------------------------------------------------
def _dicom_without_suffix(path: Path) -> Path:
    """An 8 x 8 DICOM, 12 of 16 bits stored (values 0-3780), at ``path`` (whatever its suffix)."""
    return write_dicom(path, (np.arange(64, dtype=np.uint16) * 60).reshape(8, 8))


def test_class_folders_read_dicom_by_content_and_list_ignored_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _class_folders(tmp_path / "data", per_class=2)
    _dicom_without_suffix(data / "normal" / "IM000001")
    _dicom_without_suffix(data / "normal" / "series" / "IM000002")
    (data / "normal" / "notes.txt").write_text("not an image")
    (data / "sick" / ".DS_Store").write_bytes(b"\0" * 200)
    (data / "README").write_text("top-level file")
    config = _folder_study(data, tmp_path / "run")
    paths = RunPaths.at(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="evidrift.data.sources"):
        manifest = prepare_data(config, paths)
    assert (manifest["label"] == "normal").sum() == 4 and (manifest["status"] == "ok").all()
    assert len(manifest) == 6 and manifest["path"].str.endswith("IM000002").any()
    assert "3 files ignored" in caplog.text and "normal/notes.txt" in caplog.text
    ignored: list[str] = []
    frame = scan_class_folders(data, None, ignored)
    assert {"normal/IM000001", "normal/series/IM000002"} <= set(frame["path"])
    assert ignored == ["README", "normal/notes.txt", "sick/.DS_Store"]
    assert json.loads((paths.data_dir / "ignored.json").read_text()) == ignored
    from evidrift.studies.drift.report import dataset_section

    notes = " ".join(dataset_section(paths).notes)
    assert "3 files ignored (neither images nor DICOM): README, normal/notes.txt, sick/.DS_Store" in notes


# --- 5. CSV boxes feed the localization metrics ------------------------------------------------------------
def test_csv_boxes_give_box_iou_and_box_derived_masks(tmp_path: Path) -> None:
    from evidrift.studies.drift.localization import localization_table, write_localization
    from evidrift.studies.drift.study import drift_settings

    paths = RunPaths.at(tmp_path / "run")
    rows = []
    for k in range(3):
        image = _png(tmp_path / f"img{k}.png", size=(32, 32))
        rows.append({"id": f"img{k}", "path": str(image), "label": "a", "label_idx": 0, "split": "test",
                     "patient_id": None, "mask_path": None, "status": "ok",
                     "bbox": json.dumps([[8, 8, 16, 16]]) if k < 2 else None})  # fmt: skip
    write_manifest(paths, rows)
    config = parse_config({"models": [{"arch": "resnet18", "image_size": 32}], "drift": {"size": 32}})
    write_text_atomic(paths.config, yaml.safe_dump({"models": [{"arch": "resnet18", "image_size": 32}]}))
    inside = torch.zeros(3, 8, 8)
    inside[:, 2:4, 2:4] = 1.0  # exactly the box's 8 x 8 pixels at 32 px
    outside = torch.zeros(3, 8, 8)
    outside[:, 6, 6] = 1.0
    for stage, maps in ((1, inside), (2, outside)):
        write_maps(paths, "resnet18", stage, "gradcam", maps, ["img0", "img1", "img2"], "layer4")
    table = localization_table(config, paths, drift_settings(config))
    assert table is not None
    assert set(table["id"]) == {"img0", "img1"} and table["box_derived"].all()
    stage1, stage2 = table[table["stage"] == 1], table[table["stage"] == 2]
    assert stage1["pointing_game"].tolist() == [1.0, 1.0] and stage2["pointing_game"].tolist() == [0.0, 0.0]
    # stage 1: {q >= 0.5} is the box plus a bilinear rim; IoU well above stage 2's far-away peak
    assert (stage1["box_iou@0.5"] > 0.4).all() and (stage2["box_iou@0.5"] == 0.0).all()
    write_localization(config, paths, drift_settings(config))
    summary = pd.read_csv(paths.root / "localization_summary.csv")
    assert "box_iou@0.5" in set(summary["metric"]) and (summary["box_derived"] == 2).all()


# --- 6. validate checks what run would reject --------------------------------------------------------------
@pytest.mark.parametrize(
    ("models", "explain", "message"),
    [
        ([{"arch": "resnet18"}], {"methods": ["gradkam"]}, r"explain\.methods: .*gradkam"),
        ([{"arch": "resnet181"}], {}, r"models\[0\] \(resnet181\): unknown architecture 'resnet181'"),
        ([{"arch": "resnet18", "weights": "/no/such/weights.safetensors"}], {},
         r"models\[0\] \(resnet18\): weights file /no/such/weights\.safetensors does not exist"),
        ([{"arch": "resnet18", "cam_layers": ["layer4.nope"]}], {},
         r"models\[0\] \(resnet18\): cam layer 'layer4\.nope' is not a module of resnet18; candidates"),
    ],
    ids=["method", "arch", "weights", "cam-layer"],
)  # fmt: skip
def test_validate_and_run_reject_before_any_work(
    tmp_path: Path, models: list[dict[str, Any]], explain: dict[str, Any], message: str
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"models": models, "explain": explain, "output": {"dir": "run"}}))
    result = runner.invoke(app, ["validate", str(study)])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    stubs = StubSteps()
    with pytest.raises(ConfigError, match=message):
        run_study(parse_config(yaml.safe_load(study.read_text())), RunPaths.at(tmp_path / "run"),
                  runners={**stubs.runners(), "data": stubs.runners()["stage0"]}, ctx=Context())  # fmt: skip
    assert stubs.calls == [] and not (tmp_path / "run").exists()


def test_validate_with_data_runs_the_data_checks_without_writing(tmp_path: Path) -> None:
    data = _class_folders(tmp_path / "data")
    study = tmp_path / "study.yaml"
    raw = {"data": {"source": "folder", "path": str(data)}, "models": [{"arch": "resnet18"}],
           "output": {"dir": str(tmp_path / "run")}}  # fmt: skip
    study.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", "--data", str(study)])
    assert result.exit_code == 0, result.stderr
    assert "checked: data: 8 images" in result.stderr and "CAM layers ['layer4']" in result.stderr
    assert not (tmp_path / "run").exists()
    (data / "sick" / "sick1.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["validate", "--data", str(study)])
    assert result.exit_code == 2 and "sick1.png" in result.stderr and "unreadable" in result.stderr
    raw["data"]["path"] = str(tmp_path / "nowhere")
    study.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(study)])
    assert result.exit_code == 2 and "nowhere is not a folder" in " ".join(result.stderr.split())


# --- 7. model names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["<b>r18</b>", "../../../escaped", ".hidden", "a/b", "a b", "a\\b"])
def test_unsafe_model_names_are_errors(name: str) -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.name: .*cannot name the model's folder"):
        parse_config({"models": [{"arch": "resnet18", "name": name}]})


def test_safe_model_names_and_the_path_guard(tmp_path: Path) -> None:
    from evidrift.studies.drift.study import check_paths_inside

    assert (
        parse_config({"models": [{"arch": "resnet18", "name": "r18-v2.b_1"}]}).models[0].key == "r18-v2.b_1"
    )
    config = parse_config({"models": [{"arch": "resnet18"}]})
    check_paths_inside(config, RunPaths.at(tmp_path))
    config.models[0] = ModelConfig.model_construct(**{**config.models[0].model_dump(), "name": "../../out"})
    with pytest.raises(StudyError, match=r"model '\.\./\.\./out' would write .* outside the run directory"):
        check_paths_inside(config, RunPaths.at(tmp_path / "run"))


# --- 8. another study's run directory -----------------------------------------------------------------------
def test_a_run_directory_of_another_study_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _folder_study(_class_folders(tmp_path / "data1"), out)
    run_study(first, runners=StubSteps().runners(), ctx=Context(), until="stage1")
    other = _folder_study(_class_folders(tmp_path / "data2"), out)
    stubs = StubSteps()
    with pytest.raises(StudyError) as caught:
        run_study(other, runners=stubs.runners(), ctx=Context(), until="stage1")
    message = " ".join(str(caught.value).split())
    assert (
        f"holds another study (data.path: {tmp_path / 'data1'} there, {tmp_path / 'data2'} here)" in message
    )
    assert "--out DIR" in message and "--force all" in message and stubs.calls == []
    renamed = parse_config(
        {**json.loads(first.model_dump_json()), "models": [{"arch": "resnet18", "name": "x"}]}
    )
    with pytest.raises(StudyError, match=r"models \(name, arch, weights\)"):
        run_study(renamed, runners=stubs.runners(), ctx=Context())
    edited = _folder_study(tmp_path / "data1", out, explain={"methods": ["gradcam"]})
    run_study(edited, runners=stubs.runners(), ctx=Context(), until="stage0")  # an edit of the same study
    lines: list[str] = []
    results = run_study(other, runners=stubs.runners(), ctx=Context(), force=["all"], echo=lines.append)
    assert [r.status for r in results] == ["ran"] * len(STEPS) and any("replacing it" in s for s in lines)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["path"] == str(tmp_path / "data2")


# --- 9. smaller warnings and messages -----------------------------------------------------------------------
def test_sixteen_bit_image_using_twelve_bits_is_flagged(tmp_path: Path) -> None:
    notes: list[str] = []
    image = read_image(_png(tmp_path / "twelve.png", value=3540, mode="I;16"), notes)
    assert math.isclose(float(image.max()), 3540 / 65535, rel_tol=1e-6)
    assert len(notes) == 1 and "maximum 3540 fits in 12 bits, read as 0-0.054" in notes[0]
    notes.clear()
    read_image(_png(tmp_path / "full.png", value=40000, mode="I;16"), notes)
    read_image(_png(tmp_path / "eight.png", value=30), notes)
    read_image(_dicom_without_suffix(tmp_path / "im.dcm"), notes)  # BitsStored 12: declared, not flagged
    assert notes == []


def test_tiny_images_warn_about_upscaling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _class_folders(tmp_path / "data")
    _png(data / "normal" / "tiny.png", size=(10, 10))
    config = _folder_study(data, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="evidrift.data.sources"):
        prepare_data(config, RunPaths.at(tmp_path / "run"), input_size=64)
    assert "tiny.png: 10x10 px image is upscaled 6.4x to the 64 px model input" in caplog.text
    assert "normal0.png" not in caplog.text  # 16 px: 4x, not more


def test_skip_log_names_a_folder_image_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _class_folders(tmp_path / "data")
    bad = data / "sick" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = _folder_study(data, tmp_path / "run")
    config.data.on_bad_image = "skip"
    with caplog.at_level(logging.WARNING, logger="evidrift.data.sources"):
        prepare_data(config, RunPaths.at(tmp_path / "run"))
    line = next(r.getMessage() for r in caplog.records if "broken.png" in r.getMessage())
    assert line.count(str(bad)) == 1


def test_compare_messages(tmp_path: Path) -> None:
    plain = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    data = _class_folders(tmp_path / "data")
    result = runner.invoke(app, ["compare", str(plain), str(plain), "--data", str(data)])
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "is not an evidrift checkpoint" in text and "interrupted" not in text
    result = runner.invoke(app, ["compare", str(plain), str(plain), "--data", str(data),
                                 "--fail-below", "topk_iou@0.2=high"])  # fmt: skip
    assert result.exit_code == 2 and "the value 'high' is not a number" in " ".join(result.stderr.split())


@pytest.mark.slow  # `evidrift compare` end to end
def test_compare_uses_csv_boxes_and_names_its_images_right(tiny_phantom_set: Path, tmp_path: Path) -> None:
    from evidrift.classifier.config import HeadConfig
    from evidrift.classifier.models import build_model
    from evidrift.data.phantom import CLASSES

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), HeadConfig(), "none").eval()
    checkpoint = write_checkpoint(tmp_path / "a.safetensors", model, "resnet18", CLASSES, config_hash="t")
    phantoms = pd.read_csv(tiny_phantom_set)
    csv = tmp_path / "boxes.csv"  # boxes only (none on normal images), no mask column
    pd.DataFrame(
        {"path": [str(tiny_phantom_set.parent / p) for p in phantoms["path"]], "label": phantoms["label"],
         **{c: phantoms[c].astype("Int64") for c in ("x0", "y0", "x1", "y1")}}
    ).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(checkpoint), str(checkpoint), "--data", str(csv), "--out",
                                 str(out), "--methods", "gradcam", "--max-images", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "A → B on 8 images" in text and "classification of every usable image of --data" in text
    assert "test-split" not in text
    summary = pd.read_csv(out / "localization_summary.csv")
    local = pd.read_parquet(out / "localization.parquet")
    assert len(local) > 0 and local["box_derived"].all() and local["box_iou@0.5"].notna().all()
    assert "box_iou@0.5" in set(summary["metric"]) and (summary["box_derived"] == len(local) // 2).all()
    assert "lesion boxes available" in (out / "report.html").read_text(encoding="utf-8")
