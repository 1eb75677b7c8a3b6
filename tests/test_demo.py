"""`evidrift demo --quick` end to end: phantom data, stage 0/1/2, evaluation, four CAMs, every drift metric,
statistics, localization against the phantom lesion masks, the report; a rerun skips every step."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import evidrift  # noqa: F401  (before timm)
from evidrift.cli.app import app
from evidrift.core.paths import RunPaths
from evidrift.core.steps import read_marker
from evidrift.metrics.drift import default_metric_names
from evidrift.studies.drift.presets import DEMO_LAYERS, DEMO_METHODS, demo_config
from evidrift.studies.drift.study import STEPS, step_hashes


@pytest.mark.slow  # the whole demo
@pytest.mark.integration
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "explanation drift, stage 1 → stage 2" in text
    assert f"report: {(out / 'report.html').resolve()}" in text
    assert all(f"[{step}] done in" in text for step in STEPS)

    paths = RunPaths.at(out)
    hashes = step_hashes(demo_config(quick=True, out=out))
    assert {s: read_marker(paths.step_marker(s))["hash"] for s in STEPS} == hashes
    for stage in ("0", "1", "2"):
        assert paths.checkpoint("resnet18", stage).is_file()

    drift = pd.read_parquet(paths.drift)
    metrics = default_metric_names()
    assert set(metrics) <= set(drift.columns)
    assert sorted(drift["method"].unique()) == sorted(DEMO_METHODS)
    assert set(drift["layer"]) == set(DEMO_LAYERS) == {"default", "spatial"}
    assert set(drift["module"]) == {"layer4", "layer4.1.bn2"}
    test_ids = pd.read_parquet(paths.eval_table("resnet18"))["id"]
    assert len(drift) == len(test_ids) * len(DEMO_METHODS) * len(DEMO_LAYERS)  # samples: all
    assert drift.groupby("map_set")["id"].apply(set).map(lambda ids: ids == set(test_ids)).all()
    summary = pd.read_csv(paths.summary)
    assert len(summary) == len(metrics) * len(DEMO_METHODS) * len(DEMO_LAYERS)
    assert summary["analysis_size"].nunique() == 1 and summary["analysis_size"].iloc[0] == 32
    # the GAP-fed layer makes gradcam ≡ xgradcam (and gradcam++ ≈ layercam); the spatial layer does not
    equivalence = pd.read_csv(out / "equivalence.csv")
    at = equivalence.set_index(["layer", "method_a", "method_b"])["equivalent"]
    assert at[("default", "gradcam", "xgradcam")]
    assert not at.loc["spatial"].all()
    classes = dict(
        zip(summary["method"] + "@" + summary["layer"], summary["equivalence_class"], strict=False)
    )
    assert classes["xgradcam@default"] == "gradcam ≡ xgradcam" and classes["xgradcam@spatial"] == "xgradcam"
    assert "Equivalent at layer default: gradcam ≡ xgradcam" in text
    assert "rank reversals (0 significant); expected under no interaction" in text
    ranked = pd.read_csv(paths.rankings)
    assert "xgradcam" not in set(ranked[ranked["layer"] == "default"]["method"])
    assert (
        summary["ci_low"].le(summary["mean"] + 1e-12).all()
        and summary["mean"].le(summary["ci_high"] + 1e-12).all()
    )
    localization = pd.read_csv(out / "localization_summary.csv")
    assert set(localization["stage"]) == {1, 2} and "pointing_game" in set(localization["metric"])

    evaluation = pd.read_parquet(paths.eval_table("resnet18"))
    change = (
        pd.read_csv(paths.eval_table("accuracy_change").with_suffix(".csv")).set_index("arch").loc["resnet18"]
    )
    right1 = evaluation["pred_stage1"] == evaluation["label"]
    right2 = evaluation["pred_stage2"] == evaluation["label"]
    assert (change["only_stage1"], change["only_stage2"]) == (
        (right1 & ~right2).sum(),
        (~right1 & right2).sum(),
    )
    assert change["change"] == pytest.approx(right2.mean() - right1.mean())
    assert 0.0 < change["p_mcnemar"] <= 1.0
    assert "exact McNemar p =" in text

    html = paths.report.read_text(encoding="utf-8")
    assert "evidrift demo (quick)" in html
    assert "exact McNemar p" in html and "paired McNemar p =" in html
    embedded = re.findall(r'src="data:image/png;base64,', html)
    assert len(embedded) == len(list(paths.figures_dir.glob("*.png"))) >= 8

    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert all(f"[{step}] done before" in again.output for step in STEPS)
