"""The head probing study ("How to Probe"): variants, losses, confident images, full-resolution grids,
per-position heads, the signed reference attributions, training and the study end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import evidrift  # noqa: F401  (before timm)
from evidrift.cam import CAMEngine
from evidrift.classifier import models
from evidrift.classifier.freezing import freeze_backbone
from evidrift.core.config import ConfigError
from evidrift.core.paths import RunPaths
from evidrift.metrics.localization import gridpg
from evidrift.studies.config import parse_config
from evidrift.studies.probe.attributions import input_x_gradient, integrated_gradients, signed_gradcam
from evidrift.studies.probe.grids import (
    cell_edges,
    cell_masks,
    reference_postprocess,
    sample_grids,
    smooth_maps,
    tile_grid,
)
from evidrift.studies.probe.heads import ProbeNet, build_probe_head, channel_scale
from evidrift.studies.probe.stats import best_variants, metric_order, paired_variant_tests, versus_baseline
from evidrift.studies.probe.study import (
    CachedSplit,
    ProbeVariant,
    confident_correct,
    probe_loss,
    probe_variants,
    probing_config,
    reference_layer,
    resolve_probe_layer,
    resolve_probe_method,
    run_probe,
    runs_on_features,
    signed_maps,
    trained_head,
)


# --- variants, config, losses -------------------------------------------------------------------------------
def test_variants_cover_losses_times_heads() -> None:
    variants = probe_variants(["ce", "bce"], ["linear", "mlp2", "bcos2"])
    assert [v.name for v in variants] == [
        "ce-linear",
        "ce-mlp2",
        "ce-bcos2",
        "bce-linear",
        "bce-mlp2",
        "bce-bcos2",
    ]
    assert [v.is_bcos for v in variants] == [False, False, True] * 2
    with pytest.raises(ValueError, match="probe head 'mlp4'"):
        ProbeVariant("ce", "mlp4")


def test_config_validates_the_probe_section() -> None:
    config = parse_config({})
    assert config.probe.hidden == 2048 and config.probe.bce_off_label is None
    assert parse_config({"probe": {"bce_off_label": 0.05}}).probe.bce_off_label == 0.05
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"probe\.bce_off_label"):
            parse_config({"probe": {"bce_off_label": bad}})
    with pytest.raises(ConfigError, match="smoothing"):
        parse_config({"probe": {"smoothing": 4}})
    with pytest.raises(ConfigError, match=r"probe\.heads"):
        parse_config({"probe": {"heads": ["linear", "mlp4"]}})
    with pytest.raises(ConfigError, match=r"probe\.methods"):
        resolve_probe_method("gradcamm")
    assert resolve_probe_method("Grad-CAM++") == "gradcam++" and resolve_probe_method("bcos") == "bcos"


def test_bce_loss_uses_uniform_off_labels() -> None:
    # BCE with logits: log(1 + e^x) − t·x per entry, mean over entries
    logits, labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([0])
    soft = math.log(1 + math.e)
    default = (math.log(2) + (soft - 0.25) + 2 * math.log(2)) / 4  # off = 1/C = 0.25
    assert probe_loss(logits, labels, "bce", None).item() == pytest.approx(default, abs=1e-6)
    custom = (math.log(2) + (soft - 0.1) + 2 * math.log(2)) / 4
    assert probe_loss(logits, labels, "bce", 0.1).item() == pytest.approx(custom, abs=1e-6)
    ce = -math.log(1 / (3 + math.e))
    assert probe_loss(logits, labels, "ce", 0.1).item() == pytest.approx(ce, abs=1e-6)


def test_confident_correct_uses_softmax_for_standard_and_sigmoid_for_bcos_heads() -> None:
    labels = torch.tensor([0, 1, 1])
    strong = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 1.0]])  # third: softmax 0.73, sigmoid 0.73
    sig = torch.tensor([[4.0, 3.5], [3.5, 4.0], [3.5, 4.0]])  # softmax 0.62; sigmoid of 4 = 0.982
    standard, bcos = ProbeVariant("bce", "linear"), ProbeVariant("bce", "bcos1")
    assert confident_correct([strong], [standard], labels, 0.95).tolist() == [True, True, False]
    assert confident_correct([sig], [standard], labels, 0.95).tolist() == [False, False, False]
    assert confident_correct([sig], [bcos], labels, 0.95).tolist() == [True, True, True]
    assert confident_correct([strong, sig], [standard, bcos], labels, 0.95).tolist() == [True, True, False]
    wrong = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    assert confident_correct([wrong], [standard], labels, 0.5).tolist() == [False, True, True]


# --- grids --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "n"), [(64, 2), (64, 3), (100, 3), (150, 4)])
def test_cells_match_gridpg_cells(size: int, n: int) -> None:
    edges = cell_edges(size, n)
    assert edges[0] == 0 and edges[-1] == size
    masks = cell_masks(size, size, n)
    assert masks.sum(0).eq(1).all()  # a partition
    for k in range(n * n):
        assert gridpg(masks[k : k + 1].float(), torch.tensor([k]), n).item() == pytest.approx(1.0)


def test_full_resolution_grid_holds_each_image_unchanged() -> None:
    images = torch.stack([torch.full((3, 8, 8), float(v)) for v in (1, 2, 3)])
    images[0, :, 0, 0] = 7.0  # a detail that downscaling would blur
    grid = tile_grid(images, [3, 0, 4], n=3, fill=-1.0)
    assert grid.shape == (3, 24, 24)
    assert torch.equal(grid[:, 8:16, 0:8], images[0]) and torch.equal(grid[:, 0:8, 0:8], images[1])
    assert torch.equal(grid[:, 8:16, 8:16], images[2])
    blank = cell_masks(24, 24, 3)[[1, 2, 5, 6, 7, 8]].any(0)
    assert grid[:, blank].eq(-1.0).all()
    with pytest.raises(ValueError, match="distinct"):
        tile_grid(images, [0, 0, 1], n=3)


@pytest.mark.parametrize("n", [2, 3])
def test_a_perfect_single_cell_map_scores_gridpg_one_on_a_full_resolution_grid(n: int) -> None:
    side = 32  # one image of S = 32 px per cell: the model input is n·S px
    for cell in range(n * n):
        r, c = divmod(cell, n)
        exact = torch.zeros(1, n * side, n * side)
        exact[0, r * side : (r + 1) * side, c * side : (c + 1) * side] = 1.0
        assert gridpg(reference_postprocess(exact, 1), torch.tensor([cell]), n).item() == 1.0
        inner = torch.zeros(1, n * side, n * side)  # smoothing moves mass by 2 px: keep 2 px from the edges
        inner[0, r * side + 2 : (r + 1) * side - 2, c * side + 2 : (c + 1) * side - 2] = 1.0
        assert gridpg(reference_postprocess(inner, 5), torch.tensor([cell]), n).item() == pytest.approx(1.0)


def test_smoothing_counts_the_zero_padding_like_the_reference() -> None:
    maps = torch.ones(1, 7, 7)
    smoothed = smooth_maps(maps, 5)  # F.avg_pool2d(map, 5, padding=2, stride=1)
    assert smoothed[0, 3, 3].item() == pytest.approx(1.0)
    assert smoothed[0, 0, 0].item() == pytest.approx(9 / 25)  # 3 × 3 valid pixels of 25
    assert smoothed[0, 0, 3].item() == pytest.approx(15 / 25)
    assert torch.equal(smooth_maps(maps, 1), maps)
    with pytest.raises(ValueError, match="odd"):
        smooth_maps(maps, 4)
    signed = torch.tensor([[[-1.0, 1.0, 1.0]]])  # smoothing before clipping: the negative pixel counts
    assert reference_postprocess(signed, 3)[0, 0].tolist() == pytest.approx([0.0, 1 / 9, 2 / 9])


def test_sample_grids_one_image_per_class_from_eligible_images() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    eligible = torch.tensor([True, False, True, True, True, False, True, False])  # class 4 never eligible
    grids = sample_grids(labels, eligible, n=2, n_grids=10, seed=1)
    assert len(grids) == 10
    for spec in grids:
        assert len(spec.images) == 4 and len(set(spec.classes)) == 4 and len(set(spec.cells)) == 4
        assert all(
            eligible[i] and int(labels[i]) == c for i, c in zip(spec.images, spec.classes, strict=True)
        )
    grids3 = sample_grids(labels, eligible, n=3, n_grids=3, seed=1)
    assert all(len(g.images) == 4 and max(g.cells) < 9 for g in grids3)  # 4 eligible classes < 9 cells
    assert sample_grids(labels, eligible, n=2, n_grids=10, seed=1) == grids  # seeded
    assert sample_grids(labels, labels == 0, n=2, n_grids=5, seed=0) == []  # one class: no competitor


# --- heads and layers ---------------------------------------------------------------------------------------
def test_reference_heads_follow_the_reference_structure() -> None:
    scale = torch.full((6,), 2.0)
    linear = build_probe_head("linear_nobias", 6, 3, 16, scale)
    assert [type(m).__name__ for m in linear.body] == ["Conv2d"] and linear.body[0].bias is None
    mlp3 = build_probe_head("mlp3", 6, 3, 16)
    kinds = [type(m).__name__ for m in mlp3.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert mlp3.body[0].out_channels == 16 and mlp3.body[-1].out_channels == 3
    bcos3 = build_probe_head("bcos3", 6, 5, 16)
    kinds = [type(m).__name__ for m in bcos3.body]
    assert kinds == ["BcosConv2d1x1", "UncenteredBatchNorm2d"] * 2 + ["BcosConv2d1x1"]
    assert bcos3.logit_bias == pytest.approx(-math.log(4))
    x = torch.rand(2, 6, 3, 3)  # a linear position-wise head = global average pooling + linear layer
    pooled = linear.body[0].weight[:, :, 0, 0] @ (x / 2.0).mean(dim=(2, 3)).T
    assert torch.allclose(linear(x), pooled.T, atol=1e-6)
    acts = torch.rand(10, 1, 3, 3) * torch.tensor([1.0, 2.0, 0.0, 5.0])[None, :, None, None]
    std = channel_scale(acts)
    assert std[2] == 1.0 and std[3] == pytest.approx(5 * std[0].item(), rel=1e-5)


def test_bcos_unit_and_its_explanation_are_exact() -> None:
    from evidrift.studies.probe.attributions import bcos_map
    from evidrift.studies.probe.bcos import BcosConv2d1x1

    unit = BcosConv2d1x1(2, 1)
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([[2.0, 0.0]]))  # ŵ = (1, 0)
    x = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)  # ‖x‖ = 5: out = (3 / 5) · 3
    assert unit(x).item() == pytest.approx(9 / 5, abs=1e-5)
    torch.manual_seed(0)
    head = build_probe_head("bcos2", 6, 4, 8)
    head.train()
    head(torch.rand(16, 6, 3, 3))  # running variances move away from 1
    net = ProbeNet(None, head).eval()
    acts, targets = torch.rand(3, 6, 3, 3), torch.tensor([0, 3, 1])
    maps = bcos_map(net, acts, targets)
    logits = net(acts).gather(1, targets[:, None])[:, 0]
    assert maps.shape == (3, 3, 3)
    assert torch.allclose(maps.sum(dim=(1, 2)), logits - head.logit_bias, atol=1e-5)  # completeness
    assert not head.training and not any(getattr(m, "detach", False) for m in head.modules())


def test_reference_layer_is_the_last_blocks_final_convolution() -> None:
    import timm

    assert reference_layer(timm.create_model("test_resnet"), "test_resnet") == "layer4.0.conv2"
    assert reference_layer(timm.create_model("resnet50"), "resnet50") == "layer4.2.conv3"
    backbone = timm.create_model("test_resnet")
    assert resolve_probe_layer(backbone, "test_resnet", "reference") == "backbone.layer4.0.conv2"
    assert resolve_probe_layer(backbone, "test_resnet", "features") == "features"
    with pytest.raises(ConfigError, match=r"probe\.layer 'layer9'"):
        resolve_probe_layer(backbone, "test_resnet", "layer9")


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = torch.maximum(a.abs().amax(), b.abs().amax()).clamp_min(1e-12)
    return float(((a - b).abs().amax() / scale).item())


def test_per_position_heads_make_gradcam_and_xgradcam_differ_and_gap_fed_heads_do_not() -> None:
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(4, 8, 5, 5))
    targets = torch.tensor([0, 1, 2, 0])
    gaps = {}
    for name in ("linear", "linear_nobias", "mlp2", "mlp3"):
        net = ProbeNet(None, build_probe_head(name, 8, 3, 32)).eval()
        with CAMEngine(net, ["features"]) as engine:
            out = engine(acts, targets, methods=["gradcam", "xgradcam", "hirescam"])
        gaps[name] = _relative_gap(out.maps["gradcam"], out.maps["xgradcam"])
        if name.startswith("linear"):  # G constant over space: gradcam ≡ xgradcam ≡ hirescam
            assert gaps[name] < 1e-5 and _relative_gap(out.maps["gradcam"], out.maps["hirescam"]) < 1e-5
    assert gaps["mlp2"] > 0.05 and gaps["mlp3"] > 0.05, gaps


# --- the attribution paths ----------------------------------------------------------------------------------
def _tiny_probe_net(head: str = "mlp2") -> tuple[ProbeNet, torch.Tensor]:
    torch.manual_seed(0)
    backbone = models.build_model("test_resnet", 3).eval()
    freeze_backbone(backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        k = backbone.forward_features(x).shape[1]
    return ProbeNet(backbone, build_probe_head(head, k, 3, 16)).eval(), x


def test_input_space_methods_on_the_probe_path_equal_the_whole_models() -> None:
    net, x = _tiny_probe_net()
    targets = torch.tensor([2, 0])
    with CAMEngine(net, ["features"], ig_steps=4) as engine:
        whole = engine(x, targets, methods=["input_x_gradient", "integrated_gradients", "lrp"]).maps
    for method in ("input_x_gradient", "integrated_gradients", "lrp"):
        assert not runs_on_features(method, "features")  # never on cached features
        probe = torch.relu(signed_maps(method, net, "features", x, targets, ig_steps=4, chunk_size=3))
        assert probe.shape == (2, 32, 32)
        # two execution paths of the same float32 computation: CPU kernels differ at ~1e-6
        assert _relative_gap(probe, whole[method]) < 1e-4, method
    ixg = input_x_gradient(net, x, targets)
    assert (ixg < 0).any() and (ixg > 0).any()  # signed until the reference clips it after smoothing
    # IG is exact for the integral: Σ attribution ≈ logit(x) − logit(0) with enough steps
    ig = integrated_gradients(net, x, targets, steps=64)
    with torch.no_grad():
        gain = (net(x) - net(torch.zeros_like(x))).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(ig.sum(dim=(1, 2)), gain, rtol=0.05, atol=0.05 * gain.abs().max().item())


def test_layer_maps_on_cached_activations_equal_the_whole_models() -> None:
    net, x = _tiny_probe_net()
    targets = torch.tensor([1, 2])
    with torch.no_grad():
        acts = net.backbone.forward_features(x)
    cached = ProbeNet(None, net.head).eval()
    assert runs_on_features("gradcam", "features") and runs_on_features("layercam", "features")
    assert not runs_on_features("gradcam", "backbone.layer4.0.conv2")
    for method in ("gradcam", "layercam", "gradcam++"):
        full = signed_maps(method, net, "features", x, targets, 4, 8)
        fast = signed_maps(method, cached, "features", acts, targets, 4, 8)
        assert _relative_gap(full, fast) < 1e-5, method
    signed = signed_gradcam(net, "features", x, targets)  # Grad-CAM before its ReLU
    with CAMEngine(net, ["features"]) as engine:
        relu = engine(x, targets, methods=["gradcam"]).maps["gradcam"]
    assert _relative_gap(torch.relu(signed), relu) < 1e-5
    at_reference = signed_gradcam(net, "backbone.layer4.0.conv2", x, targets)  # inside the last block
    assert at_reference.shape == acts.shape[:1] + acts.shape[2:]
    with CAMEngine(net, ["backbone.layer4.0.conv2"]) as engine:
        engine_map = engine(x, targets, methods=["gradcam"]).maps["gradcam"]
    assert _relative_gap(torch.relu(at_reference), engine_map) < 1e-5


# --- training -----------------------------------------------------------------------------------------------
def test_every_head_variant_trains_on_cached_activations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(48, 6, 2, 2))
    labels = acts.mean(dim=(2, 3))[:, :3].argmax(1)  # 3 classes, separable from the pooled features
    train = CachedSplit(acts[:36], labels[:36])
    val = CachedSplit(acts[36:], labels[36:])
    config = parse_config({"probe": {"epochs": 20, "lr": 0.1, "batch_size": 12, "hidden": 16}})
    heads = ["linear", "linear_nobias", "mlp2", "mlp3", "bcos1", "bcos2"]
    scale = channel_scale(train.activations)
    for variant in probe_variants(["ce", "bce"], heads):
        work = tmp_path / variant.name
        head = trained_head(
            variant, train, val, 3, scale, config.probe, work, "tag", torch.device("cpu"), False
        )
        assert not head.training and torch.equal(head.standardize.scale, scale)
        with torch.no_grad():
            accuracy = (head(acts).argmax(1) == labels).float().mean().item()
        assert accuracy > 0.6, (variant.name, accuracy)
        assert (work / "head.safetensors").is_file()
        again = trained_head(
            variant, train, val, 3, scale, config.probe, work, "tag", torch.device("cpu"), False
        )
        for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b)  # reused, not retrained


# --- tables -------------------------------------------------------------------------------------------------
def _toy_table() -> pd.DataFrame:
    rows = []
    for i in range(12):
        for variant, shift in (("ce-linear", 0.0), ("bce-linear", 0.3)):
            rows.append(
                dict(
                    arch="a",
                    variant=variant,
                    loss=variant[:-7],
                    head="linear",
                    method="gradcam",
                    unit="grid2",
                    unit_id=f"g{i}",
                    target="x",
                    metric="gridpg@2",
                    value=0.3 + shift + 0.01 * i,
                )
            )
    return pd.DataFrame(rows)


def test_paired_tests_find_a_planted_difference_and_best_variant() -> None:
    table = _toy_table()
    pairs = paired_variant_tests(table)
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert row["n"] == 12 and row["mean_diff"] == pytest.approx(-0.3) and bool(row["significant"])
    summary = table.groupby(["arch", "variant", "method", "metric"], as_index=False)["value"].mean()
    summary = summary.rename(columns={"value": "mean"}).assign(ci_low=0.0, ci_high=1.0)
    best = best_variants(summary)
    assert best.iloc[0]["variant"] == "bce-linear" and best.iloc[0]["runner_up"] == "ce-linear"
    degenerate = table[table["variant"] == "ce-linear"].assign(variant="ce-mlp2", value=float("nan"))
    pairs = paired_variant_tests(pd.concat([table, degenerate]))  # a variant whose maps are all degenerate
    assert len(pairs) == 3 and pairs[pairs["variant_b"] == "ce-mlp2"]["n"].eq(0).all()


def test_versus_baseline_pairs_every_variant_with_ce_linear() -> None:
    table = _toy_table()
    same = table[table["variant"] == "ce-linear"].assign(variant="ce-mlp2")  # identical to the baseline
    result = versus_baseline(pd.concat([table, same]), "ce-linear", n_boot=200)
    assert list(result["variant"]) == ["bce-linear", "ce-mlp2"]
    better = result.iloc[0]
    assert better["mean_diff"] == pytest.approx(0.3) and better["ci_low"] == pytest.approx(0.3)
    assert bool(better["significant"]) and better["n"] == 12
    tie = result.iloc[1]
    assert tie["mean_diff"] == 0.0 and not bool(tie["significant"])
    assert versus_baseline(table, "ce-mlp3").empty


def test_metric_order_groups_families() -> None:
    names = ["grid_gini@2", "gini", "gridpg@3", "correct", "pointing_game", "gridpg@2", "entropy"]
    assert metric_order(names) == [
        "correct",
        "gridpg@2",
        "gridpg@3",
        "pointing_game",
        "entropy",
        "gini",
        "grid_gini@2",
    ]


def test_probing_config_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="or --quick"):
        probing_config(None, False, None)
    with pytest.raises(ConfigError, match="not both"):
        probing_config(tmp_path / "study.yaml", True, None)
    assert probing_config(None, True, tmp_path).output.dir == tmp_path.resolve()


# --- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # the probe study end to end
def test_run_probe_end_to_end_on_tiny_phantoms(tmp_path: Path) -> None:
    from evidrift.studies.probe.report import probe_report_section, write_probe_figures

    config = parse_config(
        {
            "data": {
                "phantom": {"n": 20, "size": 32, "n_source": 10},
                "split": {"val": 0.2, "test": 0.4},
                "augment": False,
            },
            "models": [{"arch": "test_resnet", "image_size": 32, "name": "tiny"}],
            "train": {"stage0": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
            "probe": {
                "epochs": 1,
                "batch_size": 8,
                "hidden": 8,
                "heads": ["linear", "mlp2", "bcos1"],
                "ig_steps": 2,
                "grids": [2, 3],
                "n_grids": 1,
                "grid_pool": "all",  # untrained heads: any test image may enter a grid
            },
            "stats": {"n_boot": 100},
            "output": {"dir": str(tmp_path)},
        }
    )
    summary, pairs = run_probe(config, RunPaths.at(tmp_path), progress=False)
    table = pd.read_parquet(RunPaths.at(tmp_path).probe_table)
    assert set(table["variant"]) == {
        f"{loss}-{h}" for loss in ("ce", "bce") for h in ("linear", "mlp2", "bcos1")
    }
    explained = table[table["method"] != "-"]
    for variant in set(table["variant"]):  # every variant with the reference set and every metric
        part = explained[explained["variant"] == variant]
        native = "bcos" if variant.endswith("bcos1") else "lrp"
        assert set(part["method"]) == {"gradcam", "input_x_gradient", "integrated_gradients", native}
        assert {
            "gridpg@2",
            "gridpg@3",
            "grid_entropy@3",
            "grid_gini@2",
            "entropy",
            "gini",
            "pointing_game",
            "energy_pointing_game",
        } <= set(part["metric"])
    grid = table[table["metric"].str.startswith("gridpg")]["value"].dropna()
    assert grid.between(0, 1).all() and len(grid) > 0
    pool = pd.read_csv(RunPaths.at(tmp_path).probe_pool)
    assert (
        set(pool.columns) == {"arch", "class", "n_test", "n_pool"}
        and (pool["n_pool"] <= pool["n_test"]).all()
    )
    assert set(summary["metric"]) >= {"correct", "gridpg@2"} and len(pairs) > 0
    figures = write_probe_figures(summary, tmp_path / "figures")
    assert figures and all(f.stat().st_size > 1000 for f in figures)
    html = probe_report_section(tmp_path)
    # model names cannot hold markup (config: safe names); class names are escaped (test_report)
    assert "Head probing" in html and "Grid pool" in html and "tiny" in html
