"""Statistics: bootstrap, paired tests with Holm, rankings, Kendall τ, reversals, classification figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import f1_score, roc_auc_score

import evidrift  # noqa: F401
from evidrift import reversals, stats


def _table(values: dict[tuple[str, str], np.ndarray], metric: str = "spearman") -> pd.DataFrame:
    rows = []
    for (arch, method), vals in values.items():
        for i, v in enumerate(vals):
            rows.append(
                {
                    "id": f"img{i}",
                    "arch": arch,
                    "method": method,
                    "layer": "l",
                    metric: v,
                    "degenerate": False,
                    "degenerate_reason": "",
                }
            )
    return pd.DataFrame(rows)


def test_bootstrap_ci_is_seeded_and_covers_the_mean() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.1, 200)
    lo, hi = stats.bootstrap_ci(x, n_boot=2000, seed=3)
    assert (lo, hi) == stats.bootstrap_ci(x, n_boot=2000, seed=3)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(200), rel=0.15)
    assert np.isnan(stats.bootstrap_ci(np.array([np.nan]))[0])


def test_summarize_counts_and_skips_nan() -> None:
    t = _table({("a", "gradcam"): np.array([0.1, 0.2, np.nan, 0.3])})
    s = stats.summarize(t, n_boot=200)
    row = s.iloc[0]
    assert (row["arch"], row["method"], row["metric"], row["n"], row["n_nan"]) == (
        "a",
        "gradcam",
        "spearman",
        3,
        1,
    )
    assert row["mean"] == pytest.approx(0.2) and row["median"] == pytest.approx(0.2)
    assert row["std"] == pytest.approx(0.1)
    assert 0.1 <= row["ci_low"] <= row["ci_high"] <= 0.3


def test_holm_matches_definition() -> None:
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.isnan(stats.holm([np.nan, 0.5])[0])


def test_planted_difference_is_detected() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.7, 60)
    t = _table({("x", "m"): base + 0.05 + rng.normal(0, 0.02, 60), ("y", "m"): base})
    tests = stats.paired_tests(t)
    row = tests.iloc[0]
    assert row["significant"] and row["mean_diff"] > 0.04 and row["n"] == 60
    assert row["p"] == pytest.approx(sps.wilcoxon(t[t.arch == "x"].spearman.to_numpy() - base).pvalue)
    ranked = stats.rankings(t)
    assert list(ranked["arch"]) == ["x", "y"]  # spearman: higher is more stable


def test_null_is_rejected_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(2)
    rejections = 0
    sims = 300
    for _ in range(sims):
        x, y = rng.normal(0, 1, 25), rng.normal(0, 1, 25)
        rejections += stats.wilcoxon_p(x, y) < 0.05
    assert rejections / sims < 0.09  # nominal 5 %, binomial sd 1.3 %


def test_planted_rank_reversal_is_reported_with_significance() -> None:
    rng = np.random.default_rng(3)
    n = 50
    noise = lambda: rng.normal(0, 0.01, n)  # noqa: E731
    values = {
        ("arch1", "gradcam"): 0.8 + noise(),
        ("arch2", "gradcam"): 0.6 + noise(),
        ("arch1", "layercam"): 0.5 + noise(),
        ("arch2", "layercam"): 0.7 + noise(),
        ("arch3", "gradcam"): 0.4 + noise(),
        ("arch3", "layercam"): 0.3 + noise(),
    }
    t = _table(values)
    rev = reversals.reversals(reversals.contrasts(t))
    assert len(rev) == 1
    r = rev.iloc[0]
    assert (r.metric, r.method_a, r.method_b, r.arch_x, r.arch_y) == (
        "spearman",
        "gradcam",
        "layercam",
        "arch1",
        "arch2",
    )
    assert r.diff_under_a == pytest.approx(0.2, abs=0.01) and r.diff_under_b == pytest.approx(-0.2, abs=0.01)
    assert r.significant_a and r.significant_b and r.significant
    tau = stats.kendall_between_methods(stats.rankings(t))
    assert tau.iloc[0]["tau"] == pytest.approx(
        1 / 3
    )  # orders (1,2,3) vs (2,1,3): one discordant pair of three


def test_zero_direction_metrics_rank_on_absolute_value() -> None:
    t = _table(
        {("a", "m"): np.array([-0.3, 0.3, -0.3]), ("b", "m"): np.array([0.1, 0.1, 0.1])}, "gini_change"
    )
    ranked = stats.rankings(t)
    assert list(ranked["arch"]) == ["b", "a"]
    assert ranked.iloc[1]["score"] == pytest.approx(0.3)


@pytest.mark.parametrize("c", [2, 4])
def test_classification_summary_matches_sklearn(c: int) -> None:
    rng = np.random.default_rng(c)
    n = 300
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), y] += 1.0
    logits = np.round(logits, 1)  # ties in the scores
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = stats.classification_summary(y, probs, n_boot=300, seed=0)
    assert out["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    assert out["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    ref = (
        roc_auc_score(y, probs[:, 1])
        if c == 2
        else roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert out["macro_auroc"] == pytest.approx(ref, abs=1e-5)
    for name in ("accuracy", "macro_f1", "macro_auroc"):
        assert out[f"{name}_ci_low"] <= out[name] <= out[f"{name}_ci_high"]
    with pytest.raises(ValueError, match="y_true values must be in"):
        stats.classification_summary(np.array([0, 5]), np.ones((2, 2)) / 2)


def test_mcnemar_exact_by_hand_and_against_scipy() -> None:
    from scipy.stats import binomtest

    from evidrift.stats import mcnemar_exact

    a = np.array([True, True, True, False, False, False, False, False])
    b = np.array([True, False, False, True, True, True, True, True])
    result = mcnemar_exact(a, b)  # discordant: 2 right only under a, 5 only under b
    assert (result["n"], result["only_a"], result["only_b"]) == (8, 2, 5)
    assert result["accuracy_a"] == 3 / 8 and result["accuracy_b"] == 6 / 8
    assert result["change"] == pytest.approx(3 / 8)
    # two-sided exact binomial of 5 of 7 at 1/2: 2 * P(X <= 2) = 2 * (1 + 7 + 21) / 128
    assert result["p"] == pytest.approx(58 / 128)
    assert result["p"] == pytest.approx(binomtest(5, 7, 0.5).pvalue)
    one_sided = mcnemar_exact(np.zeros(5, dtype=bool), np.ones(5, dtype=bool))
    assert one_sided["p"] == pytest.approx(2 * 0.5**5)
    assert mcnemar_exact(a, a)["p"] == 1.0  # no discordant image
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        mcnemar_exact(a, b[:3])
