"""The run directory's atomic writes and the maps store (ARCHITECTURE §3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from evidrift.core.io import (
    append_jsonl,
    atomic_path,
    config_hash,
    read_jsonl,
    write_json_atomic,
    write_parquet_atomic,
)
from evidrift.core.maps_store import maps_shards, read_maps, stored_methods, write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.metrics.drift import topk_iou


def test_atomic_path_leaves_nothing_behind_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_parquet_round_trip_and_jsonl_append(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["x", "y"], "value": [1.5, 2.5]})
    write_parquet_atomic(tmp_path / "t.parquet", frame)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame)
    append_jsonl(tmp_path / "m.jsonl", {"epoch": 0})
    append_jsonl(tmp_path / "m.jsonl", {"epoch": 1})
    assert read_jsonl(tmp_path / "m.jsonl") == [{"epoch": 0}, {"epoch": 1}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_config_hash_ignores_key_order_and_sees_values() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16


def test_maps_store_concatenates_shards_in_order_and_clips_negatives(tmp_path: Path) -> None:
    paths = RunPaths.at(tmp_path)
    first = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])
    second = torch.full((2, 2, 2), 3.0)
    write_maps_shard(paths, "resnet50v2", 1, "gradcam++", 1, second, ["b", "c"], layer="norm")
    write_maps_shard(paths, "resnet50v2", 1, "gradcam++", 0, first, ["a"], layer="norm")
    maps, ids, meta = read_maps(paths, "resnet50v2", 1, "gradcam++")
    assert ids == ["a", "b", "c"]
    assert maps.dtype == torch.float16 and maps.shape == (3, 2, 2)
    assert maps[0].tolist() == [[1.0, 0.0], [0.5, 0.0]]
    assert maps[1:].eq(1.0).all() and json.loads(meta["scales"]) == [1.0, 3.0, 3.0]  # each map / its max
    assert meta["layer"] == "norm" and meta["method"] == "gradcam++" and meta["stage"] == "1"
    assert [p.name for p in maps_shards(paths, "resnet50v2", 1, "gradcam++")] == [
        "gradcam++.part00000.safetensors",
        "gradcam++.part00001.safetensors",
    ]
    assert stored_methods(paths, "resnet50v2", 1) == ["gradcam++"]


def test_maps_store_keeps_tiny_maps_exactly_as_their_shape(tmp_path: Path) -> None:
    """``score: softmax`` maps are ~1e-6, float16 subnormals: stored unscaled they lost their shape (top-10%
    IoU 0.975 with their own copy). Scaled by their maximum first, the stored copy keeps 3 decimal digits."""
    paths = RunPaths.at(tmp_path)
    raw = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(0)) * 1e-6
    write_maps_shard(paths, "a", 1, "gradcam", 0, raw, list("wxyz"), layer="l")
    stored, _, meta = read_maps(paths, "a", 1, "gradcam")
    restored = stored.float() * torch.tensor(json.loads(meta["scales"]))[:, None, None]
    torch.testing.assert_close(restored, raw, rtol=1e-3, atol=0)
    assert topk_iou(stored.float(), raw, 0.1).min().item() == 1.0


def test_maps_store_errors_name_what_is_wrong(tmp_path: Path) -> None:
    paths = RunPaths.at(tmp_path)
    with pytest.raises(FileNotFoundError, match="evidrift explain"):
        read_maps(paths, "densenet201", 2, "layercam")
    with pytest.raises(ValueError, match="2 ids for 1 maps"):
        write_maps_shard(paths, "densenet201", 2, "layercam", 0, torch.zeros(1, 4, 4), ["a", "b"], layer="x")
    with pytest.raises(ValueError, match=r"\[n, h, w\]"):
        write_maps_shard(paths, "densenet201", 2, "layercam", 0, torch.zeros(4, 4), ["a"], layer="x")


def test_atomic_writes_get_ordinary_file_permissions(tmp_path: Path) -> None:
    target = write_json_atomic(tmp_path / "shared.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
