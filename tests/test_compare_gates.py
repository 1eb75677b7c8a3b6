"""The pieces of `evidrift compare`'s gate on tiny hand-built tables: band gate statistics (exact p-values,
Holm, direction handling, tolerance), METRIC@METHOD parsing, the JSON/JUnit documents, the input-noise
perturbation, and the where-tables."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from evidrift import stats
from evidrift.studies.compare.band import Perturbation, draw_perturbation, perturb, shift_images
from evidrift.studies.compare.gates import (
    BandGate,
    GateSpec,
    band_verdicts,
    dissimilarity,
    one_sided_wilcoxon,
    parse_band_gate,
    threshold_verdicts,
)
from evidrift.studies.compare.study import CompareError
from evidrift.studies.compare.verdicts import exit_code, junit_xml, verdicts_document
from evidrift.studies.compare.where import drift_by_class, most_drifted

METHODS = ["gradcam++", "layercam", "gradcam", "xgradcam"]


def _table(values: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """{method: {metric: per-image values}} → a drift table (id, arch, method, metrics)."""
    frames = []
    for method, metrics in values.items():
        n = len(next(iter(metrics.values())))
        frames.append(
            pd.DataFrame({"id": [f"i{k}" for k in range(n)], "arch": "m", "method": method, **metrics})
        )
    return pd.concat(frames, ignore_index=True)


def test_dissimilarity_follows_the_metric_direction() -> None:
    assert dissimilarity(np.array([1.0, 0.25]), "topk_iou@0.2").tolist() == [0.0, 0.75]
    assert dissimilarity(np.array([0.0, 0.3]), "centroid_shift").tolist() == [0.0, 0.3]
    assert dissimilarity(np.array([-0.2, 0.1]), "entropy_change").tolist() == [0.2, 0.1]


def test_one_sided_wilcoxon_exact_values() -> None:
    # all five differences positive: the exact one-sided p is 1 / 2^5
    assert one_sided_wilcoxon(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(1 / 32, abs=1e-12)
    assert one_sided_wilcoxon(np.array([-1.0, -2, -3, -4, -5])) == pytest.approx(1.0, abs=1e-12)
    assert one_sided_wilcoxon(np.zeros(4)) == 1.0 and one_sided_wilcoxon(np.array([])) == 1.0
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.7, -0.05, 0.4])
    assert one_sided_wilcoxon(d) == sps.wilcoxon(d, alternative="greater").pvalue


def test_band_verdicts_direction_tolerance_and_holm() -> None:
    band_iou = [0.9, 0.8, 0.9, 0.85, 0.95, 0.9]
    drift = _table(
        {
            "gradcam": {"topk_iou@0.2": [0.3, 0.2, 0.4, 0.1, 0.35, 0.3], "centroid_shift": [0.02] * 6},
            "layercam": {"topk_iou@0.2": band_iou, "centroid_shift": [0.01, 0.02, 0.01, 0.03, 0.02, 0.01]},
        }
    )
    band = _table(
        {
            "gradcam": {"topk_iou@0.2": band_iou, "centroid_shift": [0.05] * 6},
            "layercam": {"topk_iou@0.2": band_iou, "centroid_shift": [0.02] * 6},
        }
    )
    gates = [
        BandGate("topk_iou@0.2", "topk_iou@0.2"),
        BandGate("centroid_shift@gradcam", "centroid_shift", "gradcam"),
    ]
    verdicts = band_verdicts(drift, band, gates, "baseline", alpha=0.05, tolerance=1.0, n_boot=200)
    assert [(v.metric, v.method) for v in verdicts] == [
        ("topk_iou@0.2", "gradcam"),
        ("topk_iou@0.2", "layercam"),
        ("centroid_shift", "gradcam"),
    ]
    iou_gc, iou_lc, shift_gc = verdicts
    # gradcam: u(A,B) − 2·u(band) = (0.7 − 0.2, 0.8 − 0.4, ...) all > 0 → exact p = 1/64
    assert iou_gc.p == pytest.approx(1 / 64, abs=1e-12)
    assert iou_lc.p == 1.0  # equal to the band: every d = −u(band) < 0
    assert shift_gc.p == 1.0  # 0.02 − 2·0.05 < 0 everywhere
    assert [v.p_holm for v in verdicts] == pytest.approx(list(stats.holm([v.p for v in verdicts])))
    assert iou_gc.p_holm == pytest.approx(3 / 64) and not iou_gc.passed and iou_lc.passed and shift_gc.passed
    assert iou_gc.value == pytest.approx(np.mean([0.3, 0.2, 0.4, 0.1, 0.35, 0.3]))
    assert iou_gc.band_mean == pytest.approx(np.mean(band_iou))
    assert iou_gc.threshold == pytest.approx(1 - 2 * (1 - np.mean(band_iou)))  # the band's edge
    assert iou_gc.ci_low <= iou_gc.value <= iou_gc.ci_high and iou_gc.n == 6
    assert "Holm p = 0.0469 < α = 0.05" in iou_gc.message and "A → A2" in iou_gc.message
    # with no tolerance the layercam gate still passes (identical to the band), the shift gate too
    strict = band_verdicts(drift, band, gates, "baseline", tolerance=0.0, n_boot=200)
    assert strict[1].p == 1.0 and strict[2].p == 1.0


def test_band_verdicts_signed_metric_nan_and_missing() -> None:
    drift = _table({"gradcam": {"entropy_change": [-0.5, 0.6, -0.4, 0.7, np.nan]}})
    band = _table({"gradcam": {"entropy_change": [0.01, -0.02, 0.01, 0.0, 0.01]}})
    (v,) = band_verdicts(
        drift, band, [BandGate("entropy_change", "entropy_change")], "input-noise", n_boot=200
    )
    assert v.n == 4 and v.statistic == "mean |v|" and v.value == pytest.approx(0.55)
    assert v.p == pytest.approx(1 / 16) and "|entropy_change|" in v.message and "perturbed" in v.message
    empty = _table({"gradcam": {"entropy_change": [np.nan, np.nan]}})
    (none,) = band_verdicts(empty, empty, [BandGate("entropy_change", "entropy_change")], "baseline")
    assert not none.passed and none.n == 0 and "cannot be checked" in none.message
    with pytest.raises(CompareError, match="'js' was not computed"):
        band_verdicts(drift, band, [BandGate("js", "js")], "baseline")
    with pytest.raises(CompareError, match="no maps of method 'layercam'"):
        band_verdicts(drift, band, [BandGate("x", "entropy_change", "layercam")], "baseline")


def test_parse_band_gate_metric_at_method() -> None:
    assert parse_band_gate("topk_iou@0.2", METHODS) == BandGate("topk_iou@0.2", "topk_iou@0.2", None)
    assert parse_band_gate("topk_iou@0.2@gradcam", METHODS).method == "gradcam"
    assert parse_band_gate("iou@0.2@gradcam++", METHODS) == BandGate(
        "iou@0.2@gradcam++", "topk_iou@0.2", "gradcam++"
    )
    assert parse_band_gate("spearman@xgradcam", METHODS) == BandGate(
        "spearman@xgradcam", "spearman", "xgradcam"
    )
    with pytest.raises(CompareError, match="method 'scorecam' is not explained"):
        parse_band_gate("spearman@scorecam", METHODS)
    with pytest.raises(CompareError, match="'spearmann'"):
        parse_band_gate("spearmann", METHODS)
    with pytest.raises(CompareError, match="--alpha 1"):
        GateSpec(alpha=1.0).check(METHODS)
    with pytest.raises(CompareError, match="--band-tolerance -1"):
        GateSpec(tolerance=-1.0).check(METHODS)


def _js_summary(*rows: tuple[str, float, float, float]) -> pd.DataFrame:
    """A summary.csv of arch m, metric js, n 5: one (method, mean, ci_low, ci_high) per row."""
    return pd.DataFrame(
        [
            {
                "arch": "m",
                "method": method,
                "metric": "js",
                "n": 5,
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
            }
            for method, mean, low, high in rows
        ]
    )


def test_threshold_verdicts_pass_and_fail_messages() -> None:
    summary = _js_summary(("gradcam", 0.4, 0.3, 0.5), ("layercam", 0.1, 0.0, 0.2))
    failed, passed = threshold_verdicts(summary, {}, {"js": 0.2})
    assert not failed.passed and failed.message.startswith("js under gradcam (m): mean 0.4000 > 0.2")
    assert passed.passed and passed.message.startswith("js under layercam (m): mean 0.1000 ≤ 0.2")
    assert passed.threshold == 0.2 and passed.p is None and (passed.ci_low, passed.ci_high) == (0.0, 0.2)


def test_json_and_junit_documents() -> None:
    summary = _js_summary(
        ("gradcam", 0.4, 0.3, 0.5), ("layercam", np.nan, np.nan, np.nan), ("gradcam++", 0.1, 0.0, 0.2)
    )
    verdicts = threshold_verdicts(summary, {}, {"js": 0.2})
    context = {"a": "/x/a.safetensors", "b": "/x/b & <c>.safetensors", "n_images": 5, "band": None}
    document = json.loads(json.dumps(verdicts_document(verdicts, context), allow_nan=False))  # no NaN left
    assert document["exit_code"] == exit_code(verdicts) == 1 and document["n_failed"] == 2
    assert document["gates"][1]["value"] is None and document["gates"][1]["passed"] is False
    assert [g["name"] for g in document["gates"]] == [
        "fail-above js@gradcam",
        "fail-above js@layercam",
        "fail-above js@gradcam++",
    ]
    root = ET.fromstring(junit_xml(verdicts, context, seconds=1.5))
    assert root.tag == "testsuites" and root.get("tests") == "3" and root.get("failures") == "2"
    (suite,) = root
    assert (
        suite.tag == "testsuite"
        and suite.get("name") == "evidrift compare a.safetensors → b & <c>.safetensors"
    )
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["n_images"] == "5" and "band" not in properties
    cases = suite.findall("testcase")
    assert [c.get("classname") for c in cases] == [
        "evidrift.compare.m.gradcam",
        "evidrift.compare.m.layercam",
        "evidrift.compare.m.gradcam++",
    ]
    assert [c.get("name") for c in cases] == ["fail-above js"] * 3
    assert [c.find("failure") is not None for c in cases] == [True, True, False]
    assert cases[0].find("failure").get("message") == verdicts[0].message
    assert exit_code([]) == 0 and exit_code(verdicts[2:]) == 0


def test_shift_images_exact_and_inverse_on_the_interior() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down_right = shift_images(x, torch.tensor([[1, 2]]))
    assert down_right[0, 0].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [4, 4, 4, 5], [8, 8, 8, 9]]
    back = shift_images(down_right, torch.tensor([[-1, -2]]))
    assert torch.equal(back[0, 0, :3, :2], x[0, 0, :3, :2])  # what was not pushed out comes back
    assert torch.equal(shift_images(x, torch.zeros(1, 2, dtype=torch.int64)), x)
    with pytest.raises(ValueError, match="shifts"):
        shift_images(x, torch.zeros(2, 2, dtype=torch.int64))


def test_perturbation_is_seeded_per_image_and_scaled_to_intensity_units() -> None:
    p = Perturbation(sigma=0.1, shift=0, seed=3)
    first, shift = draw_perturbation(7, (64, 64), p)
    again, _ = draw_perturbation(7, (64, 64), p)
    assert torch.equal(first, again) and shift == (0, 0)
    assert not torch.equal(first, draw_perturbation(8, (64, 64), p)[0])
    assert float(first.std()) == pytest.approx(0.1, rel=0.05)  # 4096 draws: ±5% holds with margin
    x = torch.zeros(3, 3, 64, 64)
    std = [0.5, 0.25, 0.2]
    out, shifts = perturb(x, [7, 8, 9], std, p)
    assert torch.allclose(out[0, 0] * 0.5, first) and torch.allclose(out[0, 1] * 0.25, first)
    alone, _ = perturb(x[1:2], [8], std, p)  # image 8 gets the same field in any batch
    assert torch.equal(alone[0], out[1]) and shifts.tolist() == [[0, 0]] * 3
    shifted = [draw_perturbation(i, (4, 4), Perturbation(0.0, 2, 0))[1] for i in range(200)]
    assert {s for pair in shifted for s in pair} == {-2, -1, 0, 1, 2}
    with pytest.raises(ValueError, match="does nothing"):
        Perturbation(0.0, 0).check()


def test_where_tables_per_class_and_most_drifted() -> None:
    drift = _table({"gradcam": {"topk_iou@0.2": [0.9, 0.1, 0.5, np.nan], "js": [0.0, 0.4, 0.2, 0.1]}})
    band = _table({"gradcam": {"topk_iou@0.2": [0.95, 0.9, 0.8, 0.7], "js": [0.0, 0.0, 0.1, 0.1]}})
    manifest = pd.DataFrame(
        {"id": ["i0", "i1", "i2", "i3"], "label": ["a", "b", "a", "b"], "path": list("wxyz")}
    )
    by_class = drift_by_class(drift, band, manifest, ["topk_iou@0.2"])
    assert by_class[["class", "n", "mean", "band_mean"]].to_dict("list") == {
        "class": ["a", "b"],
        "n": [2, 1],
        "mean": [pytest.approx(0.7), 0.1],
        "band_mean": [pytest.approx(0.875), pytest.approx(0.8)],
    }
    top = most_drifted(drift, band, manifest, "topk_iou@0.2", 2)
    assert top[["rank", "id", "label", "path", "value", "band_value"]].to_dict("list") == {
        "rank": [1, 2],
        "id": ["i1", "i2"],
        "label": ["b", "a"],
        "path": ["x", "y"],
        "value": [0.1, 0.5],
        "band_value": [0.9, 0.8],
    }
    assert most_drifted(drift, None, manifest, "js", 1)["id"].tolist() == ["i1"]
