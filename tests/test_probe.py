"""The head probing study: variants, grids, GridPG scoring, explaining heads on cached activations, and one
tiny end-to-end run (every variant trains and is explained)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import evidrift  # noqa: F401  (before timm)
from evidrift import models
from evidrift.artifacts import RunPaths
from evidrift.cam import CAMEngine, upsample
from evidrift.config import ConfigError, HeadConfig, parse_config
from evidrift.distributed import Context
from evidrift.metrics.localization import gridpg
from evidrift.probe import (
    PROBE_FILES,
    CachedSplit,
    HeadOnFeatures,
    ProbeVariant,
    cam_layer_is_backbone_output,
    confident_correct,
    probe_variants,
    probing_config,
    run_probe,
    train_probe_head,
)
from evidrift.probe_grids import cell_edges, cell_masks, sample_grids, smooth_maps, tile_grid
from evidrift.probe_stats import best_variants, metric_order, paired_variant_tests


# --- variants -----------------------------------------------------------------------------------------------
def test_variants_cover_losses_times_heads_and_map_to_head_configs() -> None:
    variants = probe_variants(["ce", "bce"], ["linear", "linear_nobias", "mlp2", "mlp3"])
    assert [v.name for v in variants] == [
        "ce-linear",
        "ce-linear_nobias",
        "ce-mlp2",
        "ce-mlp3",
        "bce-linear",
        "bce-linear_nobias",
        "bce-mlp2",
        "bce-mlp3",
    ]
    assert ProbeVariant("ce", "linear_nobias").head_config(8) == HeadConfig(
        type="linear", bias=False, hidden=8
    )
    assert ProbeVariant("bce", "mlp3").head_config(8) == HeadConfig(type="mlp3", bias=True, hidden=8)
    with pytest.raises(ValueError, match="probe head 'mlp4'"):
        ProbeVariant("ce", "mlp4")


def test_config_rejects_even_smoothing_and_unknown_heads() -> None:
    with pytest.raises(ConfigError, match="smoothing"):
        parse_config({"probe": {"smoothing": 4}})
    with pytest.raises(ConfigError, match=r"probe\.heads"):
        parse_config({"probe": {"heads": ["linear", "mlp4"]}})


def test_confident_correct_needs_every_variant() -> None:
    labels = torch.tensor([0, 1, 1])
    ce = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 1.0]])  # third: softmax 0.73 < 0.95
    bce = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [-10.0, 10.0]])  # sigmoid: all confident
    assert confident_correct([ce, bce], ["ce", "bce"], labels, 0.95).tolist() == [True, True, False]
    assert confident_correct([bce], ["bce"], labels, 0.95).tolist() == [True, True, True]
    wrong = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])
    assert confident_correct([wrong], ["ce"], labels, 0.5).tolist() == [False, True, True]


# --- grids --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "n"), [(64, 2), (64, 3), (100, 3), (150, 4)])
def test_cells_match_gridpg_cells(size: int, n: int) -> None:
    edges = cell_edges(size, n)
    assert edges[0] == 0 and edges[-1] == size
    masks = cell_masks(size, size, n)
    assert masks.sum(0).eq(1).all()  # a partition
    cells = torch.arange(n * n)
    maps = masks.float()  # map k: all its mass in cell k
    ones = torch.ones(n * n, dtype=torch.float64)
    assert torch.allclose(gridpg(maps, cells, n), ones, atol=1e-6)  # GridPG 1 in its own cell
    assert torch.allclose(gridpg(maps, (cells + 1) % (n * n), n), 0 * ones, atol=1e-6)  # 0 in any other


@pytest.mark.parametrize("n", [2, 3])
def test_gridpg_uniform_map_is_one_over_n_squared_before_and_after_smoothing(n: int) -> None:
    uniform = torch.ones(1, 60, 60)
    for maps in (uniform, smooth_maps(uniform, 5)):
        values = gridpg(maps.expand(n * n, -1, -1), torch.arange(n * n), n)
        assert torch.allclose(values, torch.full((n * n,), 1.0 / n**2, dtype=torch.float64), atol=1e-6)


def test_smoothing_is_a_valid_pixel_average() -> None:
    maps = torch.zeros(1, 7, 7)
    maps[0, 3, 3] = 25.0
    smoothed = smooth_maps(maps, 5)
    assert smoothed[0, 3, 3].item() == pytest.approx(1.0)  # 25 / 25 pixels
    assert smoothed[0, 0, 0].item() == 0.0  # 3 px away: outside the 5 × 5 window
    assert smoothed[0, 1, 1].item() == pytest.approx(25.0 / 16)  # window clipped to 4 × 4 valid pixels
    assert torch.equal(smooth_maps(maps, 1), maps)
    with pytest.raises(ValueError, match="odd"):
        smooth_maps(maps, 4)


def test_tile_grid_places_each_image_in_its_cell() -> None:
    images = torch.stack([torch.full((3, 30, 30), float(v)) for v in (1, 2, 3)])
    grid = tile_grid(images, [3, 0, 4], n=3, fill=-1.0)
    masks = cell_masks(30, 30, 3)
    for value, cell in zip((1, 2, 3), (3, 0, 4), strict=True):
        assert torch.allclose(grid[:, masks[cell]], torch.tensor(float(value)), atol=1e-5)
    blank = masks[[1, 2, 5, 6, 7, 8]].any(0)
    assert grid[:, blank].eq(-1.0).all()
    with pytest.raises(ValueError, match="distinct"):
        tile_grid(images, [0, 0, 1], n=3)


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


# --- explaining a head on cached activations ----------------------------------------------------------------
def test_maps_from_cached_activations_equal_the_full_models() -> None:
    torch.manual_seed(0)
    model = models.build_model("test_resnet", 3, HeadConfig(type="mlp2", hidden=16)).eval()
    layer = models.resolve_cam_layers(model, "test_resnet")[0]
    x = torch.randn(3, 3, 64, 64)
    assert cam_layer_is_backbone_output(model, layer, x)
    assert not cam_layer_is_backbone_output(model, "layer3", x)
    targets = torch.tensor([0, 2, 1])
    methods = ["gradcam", "gradcam++", "layercam", "xgradcam"]
    with CAMEngine(model, [layer]) as engine:
        full = engine(x, targets, methods=methods)
    with torch.no_grad():
        acts = model.forward_features(x)
    with CAMEngine(HeadOnFeatures(model), ["features"]) as engine:
        cached = engine(acts, targets, methods=methods)
    assert torch.allclose(full.logits, cached.logits, atol=1e-5)
    for method in methods:
        scale = full.maps[method].abs().max().clamp_min(1e-12)
        assert torch.allclose(full.maps[method] / scale, cached.maps[method] / scale, atol=1e-5), method
        assert upsample(cached.maps[method], 64).shape == (3, 64, 64)


def test_every_head_variant_trains_on_cached_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    features = torch.randn(48, 12)
    labels = features[:, :3].argmax(1)  # 3 classes, linearly separable through the origin
    train = CachedSplit(features[:36], labels[:36])
    val = CachedSplit(features[36:], labels[36:])
    config = parse_config({"probe": {"epochs": 4, "lr": 0.1, "batch_size": 12, "hidden": 8}})
    for variant in probe_variants(config.probe.losses, config.probe.heads):
        work = tmp_path / variant.name
        head = train_probe_head(
            variant, train, val, 3, config.probe, work, "tag", Context(), variant.name, False
        )
        assert not head.training
        has_bias = head[-1].bias is not None
        assert has_bias == (variant.head != "linear_nobias")
        with torch.no_grad():
            accuracy = (head(features).argmax(1) == labels).float().mean().item()
        assert accuracy > 0.6, variant.name
        assert (work / "head.safetensors").is_file() and not (work / "head.last.pt").exists()
        again = train_probe_head(
            variant, train, val, 3, config.probe, work, "tag", Context(), variant.name, False
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


def test_metric_order_groups_families() -> None:
    assert metric_order(["gini", "gridpg@3", "correct", "pointing_game", "gridpg@2", "entropy"]) == [
        "correct",
        "gridpg@2",
        "gridpg@3",
        "pointing_game",
        "entropy",
        "gini",
    ]


def test_probing_config_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="or --quick"):
        probing_config(None, False, None)
    with pytest.raises(ConfigError, match="not both"):
        probing_config(tmp_path / "study.yaml", True, None)
    assert probing_config(None, True, tmp_path).output.dir == tmp_path.resolve()


# --- end to end ---------------------------------------------------------------------------------------------
def test_run_probe_end_to_end_on_tiny_phantoms(tmp_path: Path) -> None:
    from evidrift.report.probe_section import probe_report_section, write_probe_figures

    config = parse_config(
        {
            "data": {
                "phantom": {"n": 20, "size": 64, "n_source": 10},
                "split": {"val": 0.2, "test": 0.4},
                "augment": False,
            },
            "models": [{"arch": "test_resnet", "image_size": 64, "name": "tiny"}],
            "train": {"stage0": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}},
            "probe": {
                "epochs": 1,
                "batch_size": 8,
                "hidden": 8,
                "methods": ["gradcam", "layercam"],
                "grids": [2, 3],
                "n_grids": 1,
                "grid_pool": "all",  # untrained heads: any test image may enter a grid
            },
            "stats": {"n_boot": 100},
            "output": {"dir": str(tmp_path)},
        }
    )
    summary, pairs = run_probe(config, RunPaths.at(tmp_path), progress=False)
    table = pd.read_parquet(tmp_path / PROBE_FILES["table"])
    variants = set(table["variant"])
    assert len(variants) == 8
    explained = table[table["method"] != "-"]
    for variant in variants:  # every variant is explained with every method and scored on every metric
        part = explained[explained["variant"] == variant]
        assert set(part["method"]) == {"gradcam", "layercam"}
        assert {"gridpg@2", "gridpg@3", "entropy", "gini", "pointing_game", "energy_pointing_game"} <= set(
            part["metric"]
        )
    grid = table[table["metric"].str.startswith("gridpg")]["value"].dropna()
    assert grid.between(0, 1).all()
    assert (tmp_path / PROBE_FILES["summary"]).is_file() and (tmp_path / PROBE_FILES["pairs"]).is_file()
    assert set(summary["metric"]) >= {"correct", "gridpg@2"} and len(pairs) > 0
    figures = write_probe_figures(summary, tmp_path / "figures")
    assert figures and all(f.stat().st_size > 1000 for f in figures)
    html = probe_report_section(tmp_path)
    assert "Head probing" in html and "tiny" in html  # model names cannot hold markup (config: safe names)
