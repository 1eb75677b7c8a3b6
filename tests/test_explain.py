"""The explain step: sample selection, maps store shards, resume, ranks' shares forming one store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evidrift  # noqa: F401
from builders import write_checkpoint, write_manifest
from evidrift.cam import CAMEngine
from evidrift.classifier.config import HeadConfig
from evidrift.classifier.models import build_model
from evidrift.core.distributed import Context
from evidrift.core.io import write_parquet_atomic
from evidrift.core.maps_store import maps_shards, read_maps, read_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.studies.config import parse_config
from evidrift.studies.drift.explain import explain_run, select_samples

CLASSES = ["a", "b", "c"]
N_TEST = 9


def make_run(root) -> tuple[object, RunPaths]:
    config = parse_config(
        {
            "models": [{"arch": "test_resnet", "cam_layers": ["layer3"]}],
            "explain": {
                "methods": ["gradcam", "layercam", "ms-gradcam"],
                "samples": "tp_any",
                "batch_size": 2,
                "shard_size": 4,
            },
            "train": {"device": "cpu"},
            "output": {"dir": str(root)},
        }
    )
    paths = RunPaths.at(root)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_TEST + 2):
        file = root / "images" / f"img{i}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(file)
        rows.append(
            {
                "id": f"id{i}",
                "path": str(file),
                "label": CLASSES[i % 3],
                "label_idx": i % 3,
                "split": "test" if i < N_TEST else "train",
                "status": "ok",
            }
        )
    write_manifest(paths, rows, CLASSES)
    for stage in (1, 2):
        torch.manual_seed(stage)
        model = build_model("test_resnet", 3, HeadConfig())
        checkpoint = paths.checkpoint("test_resnet", stage)
        meta = {"stage": stage, "mean": [0.5] * 3, "std": [0.25] * 3, "cam_layers": ["layer3"]}
        write_checkpoint(checkpoint, model, "test_resnet", CLASSES, **meta)
    labels = [i % 3 for i in range(N_TEST)]
    pred1 = [
        lab if i % 2 == 0 else (lab + 1) % 3 for i, lab in enumerate(labels)
    ]  # even ids right at stage 1
    pred2 = [lab if i % 3 == 0 else (lab + 1) % 3 for i, lab in enumerate(labels)]  # 0, 3, 6 right at stage 2
    table = pd.DataFrame(
        {"id": [f"id{i}" for i in range(N_TEST)], "label": labels, "pred_stage1": pred1, "pred_stage2": pred2}
    )
    write_parquet_atomic(paths.eval_table("test_resnet"), table)
    return config, paths


def test_select_samples_rules():
    test = pd.DataFrame({"id": ["x", "y", "z", "w"]})
    table = pd.DataFrame(
        {
            "id": ["w", "x", "y", "z"],
            "label": [0, 1, 2, 0],
            "pred_stage1": [0, 1, 0, 1],
            "pred_stage2": [1, 1, 2, 1],
        }
    )
    assert select_samples(test, table, "tp_both", None)["id"].tolist() == ["x"]
    assert select_samples(test, table, "tp_any", None)["id"].tolist() == ["x", "y", "w"]
    assert select_samples(test, table, "all", 2)["id"].tolist() == ["x", "y"]
    with pytest.raises(ValueError, match="evaluate"):
        select_samples(test, None, "tp_both", None)


def test_explain_run_writes_resumable_store(tmp_path):
    config, paths = make_run(tmp_path / "run")
    summary = explain_run(config, paths, "test_resnet", 1, ctx=Context(), progress=False)
    expected_ids = [f"id{i}" for i in range(N_TEST) if i % 2 == 0 or i % 3 == 0]  # tp_any: 0 2 3 4 6 8
    assert (summary.n_images, summary.n_shards, summary.written, summary.skipped) == (6, 2, 2, 0)
    maps, ids, meta = read_maps(paths, "test_resnet", 1, "gradcam")
    assert ids == expected_ids and maps.shape == (6, 4, 4) and maps.dtype == torch.float16
    assert meta["layer"] == "layer3" and json.loads(meta["input_size"]) == [64, 64]
    assert json.loads(meta["targets"]) == [int(i[2:]) % 3 for i in expected_ids[4:]]  # last shard: the labels
    # the stored maps are the engine's maps of the same preprocessed images
    from evidrift.classifier.checkpoint import load_checkpoint
    from evidrift.data.dataset import ManifestDataset

    model, ck = load_checkpoint(paths.checkpoint("test_resnet", 1))
    frame = pd.read_parquet(paths.manifest)
    frame = frame[frame["id"].isin(expected_ids)].reset_index(drop=True)
    ds = ManifestDataset(frame, CLASSES, 64, mean=ck.mean, std=ck.std)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with CAMEngine(model, ["layer3"]) as engine:
        want = engine(x, "label", labels=[ds[i]["label"] for i in range(len(ds))], methods=["gradcam"])
    scales = torch.tensor(json.loads(meta["scales"]))[:, None, None]
    # stored: each map / its maximum in float16 (11 significant bits): 2^-11 relative
    torch.testing.assert_close(maps.float() * scales, want.maps["gradcam"], rtol=2**-11, atol=0)
    assert read_maps(paths, "test_resnet", 1, "ms-gradcam")[0].shape == (6, 4, 4)

    # resume: nothing to redo; a lost shard is redone alone
    again = explain_run(config, paths, "test_resnet", 1, ctx=Context(), progress=False)
    assert (again.written, again.skipped) == (0, 2)
    maps_shards(paths, "test_resnet", 1, "layercam")[1].unlink()
    third = explain_run(config, paths, "test_resnet", 1, ctx=Context(), progress=False)
    assert (third.written, third.skipped) == (1, 1)
    assert read_maps(paths, "test_resnet", 1, "layercam")[1] == expected_ids


def test_ranks_shares_form_one_store(tmp_path):
    config, paths = make_run(tmp_path / "run")
    config.explain.shard_size = 2
    copy = RunPaths.at(tmp_path / "single")
    shutil.copytree(paths.root, copy.root)
    explain_run(config, copy, "test_resnet", 2, ctx=Context(), progress=False)
    shares = [
        explain_run(config, paths, "test_resnet", 2, ctx=Context(rank=r, world_size=2), progress=False)
        for r in (0, 1)
    ]
    assert [s.written for s in shares] == [2, 1]
    for method in ("gradcam", "layercam"):
        single, single_ids, _ = read_maps(copy, "test_resnet", 2, method)
        joined, joined_ids, _ = read_maps(paths, "test_resnet", 2, method)
        assert joined_ids == single_ids
        torch.testing.assert_close(joined, single)
    # a smaller selection later removes the shards it no longer has
    config.explain.max_images = 2
    explain_run(config, paths, "test_resnet", 2, ctx=Context(), progress=False)
    assert len(maps_shards(paths, "test_resnet", 2, "gradcam")) == 1
    assert read_maps_shard(maps_shards(paths, "test_resnet", 2, "gradcam")[0])[1] == ["id0", "id2"]


def test_cli_explain(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from evidrift.cli.app import app

    config, paths = make_run(tmp_path / "run")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["explain", str(study), "--stage", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "test_resnet stage 1: 6 images, 2 shards (2 written" in result.output
    assert read_maps(paths, "test_resnet", 1, "layercam")[0].shape == (6, 4, 4)
    bad = CliRunner().invoke(app, ["explain", str(study), "--arch", "nope"])
    assert bad.exit_code == 2 and "not a model" in bad.output
