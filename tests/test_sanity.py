"""Parameter-randomization sanity checks and the metrics' self-test, on tiny models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evidrift  # noqa: F401  (before timm)
from builders import write_checkpoint
from evidrift.classifier import models
from evidrift.classifier.config import HeadConfig
from evidrift.core.paths import RunPaths
from evidrift.studies.sanity.study import (
    ROOT_BLOCK,
    SIMILARITY_METRICS,
    explain_model,
    hog_features,
    map_similarity,
    randomization_blocks,
    randomization_curves,
    randomize_blocks_,
    sanity_modes,
    self_test,
)

METHODS = ["gradcam", "layercam"]


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = models.build_model("test_resnet", 3, HeadConfig()).eval()
    images = torch.randn(3, 3, 64, 64)
    return model, images, torch.tensor([0, 1, 2])


def test_blocks_go_from_the_head_down_and_split_stage_containers() -> None:
    resnet = models.build_model("test_resnet", 3)
    assert randomization_blocks(resnet) == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 4))
            self.stem = nn.Conv2d(3, 4, 3)
            self.stages = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
            self.head = nn.Linear(4, 2)

    assert randomization_blocks(Staged()) == ["head", "stages.2", "stages.0", "stem", ROOT_BLOCK]


def test_randomize_changes_only_the_named_block_and_is_seeded(
    tiny: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model = tiny[0]
    a = randomize_blocks_(copy.deepcopy(model), ["layer4"], seed=3)
    b = randomize_blocks_(copy.deepcopy(model), ["layer4"], seed=3)
    before, after, again = model.state_dict(), a.state_dict(), b.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert all(torch.equal(after[k], again[k]) for k in after)
    state = torch.random.get_rng_state()
    randomize_blocks_(copy.deepcopy(model), ["fc"], seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_hog_features_and_similarity_of_identical_maps_is_one() -> None:
    torch.manual_seed(0)
    maps = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 64, 64), 9, 1, 4)[:, 0]
    signed = maps - 0.5
    feats = hog_features(maps, 16)
    assert feats.shape == (4, 9 * 3 * 3 * 2 * 2) and torch.isfinite(feats).all()
    sims = map_similarity(maps, maps * 3.0, signed, signed, 16)
    assert set(sims) == set(SIMILARITY_METRICS)
    for name, values in sims.items():
        assert torch.allclose(values, torch.ones(4, dtype=values.dtype), atol=1e-6), name
    flipped = map_similarity(maps, maps, signed, -signed, 16)["spearman_signed"]
    assert torch.allclose(flipped, -torch.ones(4, dtype=flipped.dtype), atol=1e-6)  # signs are kept
    with pytest.raises(ValueError, match="HOG cell"):
        hog_features(torch.rand(1, 8, 8), 16)


def test_signed_maps_are_the_maps_before_the_relu(tiny: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, images, targets = tiny
    maps = explain_model(model, "layer4", images, targets, ["gradcam"], batch_size=2)
    positive, signed = maps.positive["gradcam"], maps.signed["gradcam"]
    assert torch.allclose(signed.clamp_min(0), positive, atol=1e-6 * positive.abs().max())
    assert (signed < 0).any()  # the negative part a ReLU would hide


def test_randomization_curves_start_at_one_and_fall(
    tiny: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, images, targets = tiny
    original = copy.deepcopy(model.state_dict())
    blocks = randomization_blocks(model)[:3]  # fc, layer4, layer3: enough to see the curves fall
    curves = randomization_curves(
        model,
        "layer4",
        images,
        targets,
        METHODS,
        sanity_modes("both"),
        seed=0,
        hog_cell=16,
        batch_size=4,
        progress=False,
        blocks=blocks,
    )
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # model untouched
    assert sorted(curves["mode"].unique()) == ["cascading", "independent"]
    assert curves.groupby("mode")["step"].nunique().tolist() == [len(blocks) + 1] * 2
    assert curves[curves["step"] == 0]["block"].eq("original").all()
    start = curves[curves["step"] == 0]
    for metric in SIMILARITY_METRICS:
        values = start[metric].to_numpy()
        finite = values[np.isfinite(values)]  # NaN only where the untrained net's map is all zero
        assert finite.size >= values.size // 2 and np.allclose(finite, 1.0, atol=1e-6), metric
    last = curves[(curves["mode"] == "cascading") & (curves["step"] == len(blocks))]
    assert last["spearman_abs"].mean() < 0.9 and last["topk_iou@0.2"].mean() < 0.9
    head_only = curves[(curves["mode"] == "independent") & (curves["block"] == "fc")]
    cascade_head = curves[(curves["mode"] == "cascading") & (curves["block"] == "fc")]
    assert np.allclose(head_only["spearman_abs"], cascade_head["spearman_abs"], equal_nan=True)  # same draw


def test_self_test_identical_checkpoints_give_zero_drift(
    tiny: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    model, images, targets = tiny
    saved = write_checkpoint(
        tmp_path / "stage1.safetensors", model, "test_resnet", ["a", "b", "c"], stage=1, cam_layers=["layer4"]
    )
    records = self_test(saved, images, targets, METHODS, tmp_path, seed=0, batch_size=4)
    assert {r["method"] for r in records} == set(METHODS)
    identical = [r for r in records if r["check"] == "identical checkpoints"]
    assert {r["kind"] for r in identical} == {"metrics"}
    assert identical and all(r["passed"] for r in identical), identical
    randomized = {(r["method"], r["metric"]): r["value"] for r in records if r["check"] == "randomized model"}
    assert all(np.isfinite(v) for v in randomized.values())
    assert randomized[("gradcam", "spearman")] < 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1.json", "stage1.safetensors"]  # copy removed


def test_sanity_summary_figures_and_report_section(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from evidrift.studies.probe.report import probe_report_section, write_sanity_figures
    from evidrift.studies.sanity.study import summarize_curves

    rows = []
    for step, block in enumerate(["original", "fc", "layer4"]):
        for image in range(4):
            values = {m: 1.0 - 0.4 * step + 0.01 * image for m in SIMILARITY_METRICS}
            rows.append(
                {
                    "arch": "a<i>",
                    "mode": "cascading",
                    "step": step,
                    "block": block,
                    "method": "gradcam",
                    "image": str(image),
                    **values,
                }
            )
    summary = summarize_curves(pd.DataFrame(rows), n_boot=200)
    first = summary[(summary["step"] == 0) & (summary["metric"] == "ssim")].iloc[0]
    assert first["mean"] == pytest.approx(1.015) and first["n"] == 4 and first["ci_low"] <= first["ci_high"]
    summary.to_csv(RunPaths.at(tmp_path).sanity_summary, index=False)
    checks = [
        {
            "arch": "a<i>",
            "check": "identical checkpoints",
            "method": "gradcam",
            "metric": "js",
            "value": 0.0,
            "expected": "= 0",
            "passed": True,
        }
    ]
    (RunPaths.at(tmp_path).sanity_selftest).write_text(json.dumps({"passed": True, "checks": checks}))
    figures = write_sanity_figures(summary, tmp_path / "figures")
    assert [f.name for f in figures] == ["sanity_a_i__cascading.png"] and figures[0].stat().st_size > 1000
    html = probe_report_section(tmp_path)
    assert "Sanity checks" in html and "a&lt;i&gt;" in html and "<i>" not in html and "base64," in html
