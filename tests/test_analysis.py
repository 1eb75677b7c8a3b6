"""The drift step end to end on a synthetic run directory written with ``write_maps_shard``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from typer.testing import CliRunner

import evidrift  # noqa: F401
from builders import write_maps
from evidrift.cli.app import app
from evidrift.core.maps_store import write_maps_shard
from evidrift.core.paths import RunPaths
from evidrift.studies.drift.analysis import DriftSettings, run_drift

METRICS = ["spearman", "ssim", "topk_iou@0.1", "centroid_shift", "js", "gini_change"]


def _write_run(root) -> RunPaths:
    """Maps of 12 images at two stages for a stable and a drifty arch, a one-image all-zero method."""
    paths = RunPaths.at(root)
    g = torch.Generator().manual_seed(0)
    n = 12
    ids = [f"img{i:02d}" for i in range(n)]
    base = torch.rand(n, 7, 7, generator=g)
    for arch, noise in (("stable", 0.02), ("drifty", 0.6)):
        for method in ("gradcam", "layercam"):
            s2 = (base + noise * torch.rand(n, 7, 7, generator=g)).clamp_min(0)
            # stage 1 in two shards; stage 2 in another order and missing one image (inner join)
            extra = {"input_size": "32"}
            write_maps(paths, arch, 1, method, base, ids, "features.norm5", split_at=(5,), extra=extra)
            order = list(reversed(range(1, n)))
            write_maps(paths, arch, 2, method, s2[order], [ids[i] for i in order], "features.norm5")
    zero = torch.zeros(1, 7, 7)
    write_maps_shard(
        paths, "stable", 1, "xgradcam", 0, zero, ["img00"], layer="l", extra={"input_size": "[32, 32]"}
    )
    write_maps_shard(paths, "stable", 2, "xgradcam", 0, base[:1], ["img00"], layer="l")
    return paths


def test_run_drift_writes_every_table(tmp_path) -> None:
    paths = _write_run(tmp_path)
    out = run_drift(tmp_path, DriftSettings(metrics=METRICS, n_boot=200), progress=False)
    drift = pd.read_parquet(paths.drift)
    assert list(drift.columns) == [
        "id",
        "arch",
        "method",
        "layer",
        "module",
        "map_set",
        *METRICS,
        "degenerate",
        "degenerate_reason",
        "analysis_size",
    ]
    assert set(drift["analysis_size"]) == {32}  # one grid for the study
    assert len(drift) == 2 * 2 * 11 + 1  # img00 missing at stage 2 for the two-stage methods; + xgradcam
    assert set(drift["layer"]) == {"features.norm5", "l"}
    degenerate = drift[drift["method"] == "xgradcam"].iloc[0]
    assert degenerate["degenerate"] and degenerate["degenerate_reason"] == "a: all zero"
    assert np.isnan(degenerate["spearman"])
    # pairing by id: compare one row by hand
    row = drift[(drift.arch == "stable") & (drift.method == "gradcam") & (drift.id == "img03")].iloc[0]
    assert 0.9 < row["spearman"] <= 1.0
    summary = pd.read_csv(paths.summary)
    assert {"arch", "method", "metric", "n", "mean", "median", "std", "ci_low", "ci_high"} <= set(
        summary.columns
    )
    ranked = pd.read_csv(paths.rankings)
    top = ranked[(ranked.metric == "spearman") & (ranked.method == "gradcam") & (ranked["rank"] == 1)]
    assert top["arch"].item() == "stable"
    assert set(summary["analysis_size"]) == {32}
    equivalence = pd.read_csv(tmp_path / "equivalence.csv")
    pair = equivalence[(equivalence.arch == "stable") & (equivalence.layer == "features.norm5")].iloc[0]
    assert (pair.method_a, pair.method_b, pair.n) == ("gradcam", "layercam", 12 + 11)
    # stage-1 maps are equal, stage-2 maps differ by small noise: the lower agreement (stage 2) decides
    assert pair.equivalent and pair.reason.startswith("median Spearman 0.99")
    drifty = equivalence[(equivalence.arch == "drifty") & (equivalence.layer == "features.norm5")].iloc[0]
    assert not drifty.equivalent and drifty.median_spearman < 0.9
    # equivalent for one architecture only: no class, both methods are ranked
    assert set(summary["equivalence_class"]) == {"gradcam", "layercam", "xgradcam"}
    assert set(ranked["method"]) == {"gradcam", "layercam", "xgradcam"}
    assert (tmp_path / "reversals_summary.csv").exists()
    assert list(pd.read_csv(paths.reversals).columns)[:6] == [
        "layer",
        "metric",
        "method_a",
        "method_b",
        "arch_x",
        "arch_y",
    ]
    assert (tmp_path / "tests.csv").exists() and (tmp_path / "kendall.csv").exists()
    assert out.tests["significant"].any()


def test_cli_drift_prints_summary_and_errors_clearly(tmp_path) -> None:
    _write_run(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app, ["drift", str(tmp_path), "-m", "spearman", "-m", "iou@0.1", "--n-boot", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "stable" in result.output and "spearman" in result.output
    bad = runner.invoke(app, ["drift", str(tmp_path), "-m", "nope"])
    assert bad.exit_code == 2 and "unknown drift metric 'nope'" in bad.output
    empty = runner.invoke(app, ["drift", str(tmp_path / "missing")])
    assert empty.exit_code == 2 and "does not exist" in empty.output
    write_maps_shard(
        RunPaths.at(tmp_path), "stable", 1, "hirescam", 0, torch.rand(1, 7, 7), ["img00"], layer="l"
    )
    write_maps_shard(
        RunPaths.at(tmp_path), "stable", 2, "hirescam", 0, torch.rand(1, 7, 7), ["img00"], layer="l"
    )
    unknown = runner.invoke(app, ["drift", str(tmp_path)])
    assert unknown.exit_code == 2 and "cannot tell the analysis size for arch 'stable'" in unknown.output
