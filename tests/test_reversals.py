"""Rank reversals as a tested interaction (``evidrift.reversals``): exact hand-built cases, and by
simulation the false-positive rate under a complete null, the power on a planted interaction, and the
permutation null's calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from evidrift import reversals as R
from evidrift import stats

METHODS = ("gradcam", "gradcam++", "layercam", "xgradcam")
ARCHS = ("x", "y", "z")


def _long(values: dict[tuple[str, str], np.ndarray], metric: str = "topk_iou@0.1") -> pd.DataFrame:
    rows = []
    for (arch, method), v in values.items():
        for i, value in enumerate(v):
            if np.isfinite(value):
                rows.append(
                    {"id": f"img{i:03d}", "arch": arch, "method": method, "layer": "l", metric: value}
                )
    return pd.DataFrame(rows)


def _study(rng: np.random.Generator, n: int = 50, planted: float = 0.0, metrics: int = 3) -> pd.DataFrame:
    """Three architectures, four methods (gradcam ≡ xgradcam exactly, gradcam++ ≈ layercam as at a GAP-fed
    layer), ``metrics`` metrics of the ``higher`` kind. Per image a difficulty shared by everything, per
    (image, arch) a component shared by the methods (sd 0.05), per (image, arch, method) noise (sd 0.1):
    per-image differences between two architectures under one method have sd 0.16.
    ``planted``: x more stable than y by ``planted`` under gradcam, less by ``planted`` under gradcam++ (and
    layercam, which coincides with it)."""
    frames = []
    for k in range(metrics):
        difficulty = rng.normal(0.6, 0.1, n)
        values: dict[tuple[str, str], np.ndarray] = {}
        for arch in ARCHS:
            shared = rng.normal(0, 0.05, n)
            own = {m: rng.normal(0, 0.1, n) for m in ("gradcam", "gradcam++")}
            own["xgradcam"] = own["gradcam"]
            own["layercam"] = own["gradcam++"] + rng.normal(0, 0.005, n)
            for method in METHODS:
                values[(arch, method)] = difficulty + shared + own[method]
        if planted and k == 0:
            values[("x", "gradcam")] = values[("x", "gradcam")] + planted / 2
            values[("y", "gradcam")] = values[("y", "gradcam")] - planted / 2
            for method in ("gradcam++", "layercam"):
                values[("x", method)] = values[("x", method)] - planted / 2
                values[("y", method)] = values[("y", method)] + planted / 2
        frames.append(
            _long(values, f"topk_iou@{0.05 * (k + 1):.2f}").set_index(["id", "arch", "method", "layer"])
        )
    return pd.concat(frames, axis=1).reset_index()


EQUIVALENT: stats.Representatives = {
    "l": {"gradcam": "gradcam", "xgradcam": "gradcam", "gradcam++": "gradcam++", "layercam": "gradcam++"}
}


def test_reversal_uses_shared_images_and_checks_each_direction() -> None:
    """The constructed case of the issue: on 30 shared images y beats x by 0.05 under both methods; 10 extra
    hard images for y under method b only (x has no value there) made the old per-arch means reverse."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.02, 40)
    x_a, x_b = base - 0.05, base - 0.05
    y_a, y_b = base.copy(), base.copy()
    x_a[30:] = x_b[30:] = np.nan  # x explained only the first 30
    y_b[30:] = 0.0  # y's extra images are hard under b
    table = _long({("x", "a"): x_a, ("y", "a"): y_a, ("x", "b"): x_b, ("y", "b"): y_b})
    found = R.contrasts(table)
    assert len(found) == 1 and found[0].ua.size == 30
    assert found[0].diff_a == pytest.approx(-0.05) and found[0].diff_b == pytest.approx(-0.05)
    assert R.reversals(found).empty  # the old per-arch means gave diff_under_b > 0: a reversal


def test_reversal_row_by_hand() -> None:
    n = 20
    d = np.linspace(-0.01, 0.01, n)
    table = _long(
        {
            ("x", "a"): 0.8 + d,
            ("y", "a"): np.full(n, 0.6),
            ("x", "b"): np.full(n, 0.5),
            ("y", "b"): 0.7 + d,
        }
    )
    table["centroid_shift"] = 1.0 - table["topk_iou@0.1"]  # a `lower` metric: same stability order
    rev = R.reversals(R.contrasts(table), alpha=0.05)
    assert sorted(rev["metric"]) == ["centroid_shift", "topk_iou@0.1"]
    for r in rev.itertuples():
        assert (r.method_a, r.method_b, r.arch_x, r.arch_y, r.n) == ("a", "b", "x", "y", n)
        assert r.diff_under_a == pytest.approx(0.2) and r.diff_under_b == pytest.approx(-0.2)
        assert r.interaction == pytest.approx(0.4)
        assert r.p_a == pytest.approx(sps.wilcoxon(0.2 + d, alternative="greater").pvalue)
        assert r.p_b == pytest.approx(sps.wilcoxon(-0.2 - d, alternative="less").pvalue)
        assert r.p_interaction == pytest.approx(sps.wilcoxon(0.4 + 2 * d).pvalue)
        assert r.significant_a and r.significant_b and r.significant
    # Holm over the study: two interaction tests with equal p → both doubled
    assert rev["p_interaction_holm"].tolist() == pytest.approx([2 * rev["p_interaction"].iloc[0]] * 2)


def test_equivalence_classes_union_find_over_architectures() -> None:
    agreement = pd.DataFrame(
        [
            ("x", "l", "gradcam", "xgradcam", True),
            ("y", "l", "gradcam", "xgradcam", True),
            ("x", "l", "hirescam", "xgradcam", True),
            ("y", "l", "hirescam", "xgradcam", True),
            ("x", "l", "gradcam++", "layercam", True),
            ("y", "l", "gradcam++", "layercam", False),  # not for every architecture: no class
            ("x", "m", "gradcam", "xgradcam", False),
            ("y", "m", "gradcam", "xgradcam", False),
        ],
        columns=["arch", "layer", "method_a", "method_b", "equivalent"],
    )
    classes = R.equivalence_classes(agreement)
    assert classes["l"] == {
        "gradcam": "gradcam",
        "gradcam++": "gradcam++",
        "hirescam": "gradcam",
        "layercam": "layercam",
        "xgradcam": "gradcam",
    }
    assert classes["m"] == {"gradcam": "gradcam", "xgradcam": "xgradcam"}
    assert R.class_label(classes, "l", "gradcam") == "gradcam ≡ hirescam ≡ xgradcam"
    assert R.class_label(classes, "m", "xgradcam") == "xgradcam"


@pytest.mark.slow  # simulation: 200 studies
def test_complete_null_rarely_gives_a_significant_reversal() -> None:
    """200 studies under a complete null (three equally stable architectures, n = 50, two coinciding method
    pairs): the share of studies with any significant reversal stays ≤ 0.05 + its binomial margin (one-sided
    99 % bound of a Binomial(200, 0.05) share: 0.05 + 2.33·sqrt(0.05·0.95/200) = 0.086). Without the
    equivalence classes the coinciding pairs take part too and must not break it either."""
    rng = np.random.default_rng(11)
    replicates = 200
    any_sig = {True: 0, False: 0}
    observed = 0
    for _ in range(replicates):
        table = _study(rng)
        for use_classes in (True, False):
            found = R.contrasts(table, representatives=EQUIVALENT if use_classes else None)
            rev = R.reversals(found)
            any_sig[use_classes] += bool(len(rev) and rev["significant"].any())
            observed += len(rev) if use_classes else 0
    margin = 2.33 * np.sqrt(0.05 * 0.95 / replicates)
    assert any_sig[True] / replicates <= 0.05 + margin, any_sig
    assert any_sig[False] / replicates <= 0.05 + margin, any_sig
    assert observed > 0  # reversals do occur under the null; they just are not significant


@pytest.mark.slow  # simulation: 100 studies
def test_planted_interaction_is_found() -> None:
    """x more stable than y by 0.1 under gradcam and less by 0.1 under gradcam++ (n = 50, the noise above):
    a significant reversal of that contrast in ≥ 80 % of 100 studies."""
    rng = np.random.default_rng(12)
    hits = 0
    replicates = 100
    for _ in range(replicates):
        rev = R.reversals(R.contrasts(_study(rng, planted=0.1), representatives=EQUIVALENT))
        mine = rev[
            (rev["metric"] == "topk_iou@0.05")
            & (rev["method_a"] == "gradcam")
            & (rev["method_b"] == "gradcam++")
            & (rev["arch_x"] == "x")
            & (rev["arch_y"] == "y")
        ]
        hits += bool(len(mine) and mine["significant"].all())
    assert hits / replicates >= 0.8, hits


@pytest.mark.slow  # simulation: 40 studies x 200 permutations
def test_permutation_null_matches_the_observed_count_under_the_null() -> None:
    """Under the complete null the observed count is a draw from what the permutation null describes: over 40
    studies it lies inside the null's [5 %, 95 %] interval in most of them, and the mean observed count is
    close to the mean expected count."""
    rng = np.random.default_rng(13)
    inside, observed, expected = 0, [], []
    for seed in range(40):
        found = R.contrasts(_study(rng), representatives=EQUIVALENT)
        rev = R.reversals(found)
        summary = R.reversal_summary(found, rev, R.null_counts(found, n_permutations=200, seed=seed))
        row = summary[summary["layer"] == R.ALL_LAYERS].iloc[0]
        inside += bool(row["expected_p05"] <= row["observed"] <= row["expected_p95"])
        observed.append(row["observed"])
        expected.append(row["expected_mean"])
        assert row["contrasts"] == 3 * 1 * 3  # 3 metrics × 1 non-equivalent method pair × 3 arch pairs
    assert inside / 40 >= 0.75, inside
    assert abs(np.mean(observed) - np.mean(expected)) < 0.35 * np.mean(expected)


def test_null_counts_are_seeded_and_per_layer() -> None:
    rng = np.random.default_rng(1)
    table = _study(rng, metrics=1)
    other = table.assign(layer="m")
    found = R.contrasts(pd.concat([table, other]), representatives=None)
    a = R.null_counts(found, 50, seed=3)
    b = R.null_counts(found, 50, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["l", "m"] and a.to_numpy().max() <= 6 * 3
    line = R.summary_line(R.reversal_summary(found, R.reversals(found), a))
    assert "expected under no interaction" in line and "(50 permutations)" in line


def test_a_class_stands_in_for_an_architecture_that_lacks_its_representative() -> None:
    """gradcam ≡ xgradcam at layer l, but arch y has only xgradcam maps (a partial explain): y still takes
    part in the class's contrasts, through its xgradcam values; non-finite values never enter a cell."""
    n = 10
    d = np.linspace(0, 0.01, n)
    table = _long(
        {
            ("x", "gradcam"): 0.8 + d,
            ("y", "xgradcam"): 0.6 + d,
            ("x", "layercam"): 0.5 + d,
            ("y", "layercam"): 0.7 + d,
        }
    )
    classes: stats.Representatives = {
        "l": {"gradcam": "gradcam", "xgradcam": "gradcam", "layercam": "layercam"}
    }
    found = R.contrasts(table, representatives=classes)
    assert [(c.method_a, c.method_b, c.arch_x, c.arch_y) for c in found] == [
        ("gradcam", "layercam", "x", "y")
    ]
    assert found[0].diff_a == pytest.approx(0.2) and found[0].diff_b == pytest.approx(-0.2)
    ranked = stats.rankings(table, representatives=classes)
    assert set(ranked[ranked["method"] == "gradcam"]["arch"]) == {"x", "y"}
    table.loc[0, "topk_iou@0.1"] = np.inf
    assert R.contrasts(table, representatives=classes)[0].ua.size == n - 1


def test_equivalence_flags_read_back_from_csv_and_pair_order() -> None:
    agreement = pd.DataFrame(
        [
            ("x", "l", "a", "b", "True"),
            ("y", "l", "b", "a", "False"),  # the same pair, the other way round, not equivalent there
            ("x", "m", "a", "b", float("nan")),
        ],
        columns=["arch", "layer", "method_a", "method_b", "equivalent"],
    )
    classes = R.equivalence_classes(agreement)
    assert classes["l"] == {"a": "a", "b": "b"} and classes["m"] == {"a": "a", "b": "b"}
