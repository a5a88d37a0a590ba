"""The evaluator's statistics: intervals against known distributions, paired tests on constructed cases."""

from __future__ import annotations

import math

import ftc_evaluator.stats as stats
import numpy as np
import pytest

pytestmark = pytest.mark.unit


def test_interval_of_a_normal_sample_matches_theory():
    rng = np.random.default_rng(0)
    sample = rng.normal(5.0, 2.0, size=400)
    ci = stats.mean_ci(list(sample), seed=1)
    assert ci.low is not None and ci.high is not None, ci
    assert ci.low < 5.0 < ci.high
    theory = 2 * 1.959964 * 2.0 / math.sqrt(400)  # width of the normal-theory 95% interval with sigma known
    assert ci.high - ci.low == pytest.approx(theory, rel=0.15)
    assert ci.mean == pytest.approx(sample.mean())


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    trials = 120
    for trial in range(trials):
        sample = rng.exponential(1.0, size=60)  # skewed: what BCa is for; true mean 1
        ci = stats.mean_ci(list(sample), resamples=999, seed=trial)
        assert ci.low is not None and ci.high is not None, ci
        covered += ci.low <= 1.0 <= ci.high
    assert 0.87 <= covered / trials <= 0.99


def test_interval_of_a_proportion_matches_the_binomial():
    sample = [1.0] * 30 + [0.0] * 70
    ci = stats.mean_ci(sample, seed=3)
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 100)
    assert ci.low == pytest.approx(0.3 - half, abs=0.03)
    assert ci.high == pytest.approx(0.3 + half, abs=0.03)


def test_interval_is_seeded():
    sample = list(np.random.default_rng(1).normal(size=50))
    assert stats.mean_ci(sample, seed=5) == stats.mean_ci(sample, seed=5)


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param([], stats.MeanCI(None, None, None, 0, 0), id="empty"),
        pytest.param([None, None], stats.MeanCI(None, None, None, 0, 2), id="all-missing"),
        pytest.param([7.0, None], stats.MeanCI(7.0, None, None, 1, 1), id="one-value"),
        pytest.param([4.0, 4.0, 4.0, None], stats.MeanCI(4.0, 4.0, 4.0, 3, 1), id="constant"),
    ],
)
def test_interval_edge_cases(values, expected):
    assert stats.mean_ci(values) == expected


def test_missing_values_are_skipped_not_scored_as_zero():
    ci = stats.mean_ci([8.0, None, 6.0, float("nan"), 7.0])
    assert (ci.mean, ci.n, ci.missing) == (7.0, 3, 2)


def test_paired_permutation_is_exact_on_a_small_constructed_case():
    # Five positive differences: of the 2**5 sign patterns, only all-plus and all-minus are as extreme.
    a = [2.0, 3.0, 4.0, 5.0, 6.0]
    b = [1.0, 1.0, 1.0, 1.0, 1.0]
    test = stats.paired_test("a", a, "b", b)
    assert test.mean_diff == pytest.approx(3.0)
    assert test.p_value == pytest.approx(2 / 32)
    assert test.n == 5


def test_paired_test_sees_a_consistent_small_lead_an_unpaired_view_would_miss():
    rng = np.random.default_rng(11)
    difficulty = rng.normal(0, 3, size=40)  # items vary far more than the models differ
    b = difficulty + rng.normal(0, 0.2, size=40)
    a = b + 0.5
    test = stats.paired_test("a", list(a), "b", list(b), seed=2)
    assert test.p_value < 0.001
    assert test.wilcoxon_p is not None and test.wilcoxon_p < 0.001
    assert test.ci_low is not None and test.ci_high is not None, test
    assert test.ci_low < 0.5 < test.ci_high or test.ci_low == pytest.approx(0.5)


def test_paired_test_of_identical_models_is_not_significant():
    a = list(np.random.default_rng(3).integers(1, 11, size=30).astype(float))
    test = stats.paired_test("a", a, "b", list(a))
    assert (test.mean_diff, test.p_value, test.wilcoxon_p) == (0.0, 1.0, 1.0)


def test_paired_test_uses_only_items_both_models_have():
    test = stats.paired_test("a", [5.0, None, 7.0, 9.0], "b", [4.0, 6.0, None, 8.0])
    assert test.n == 2
    assert test.mean_diff == pytest.approx(1.0)


def test_paired_test_refuses_different_item_counts():
    with pytest.raises(ValueError, match="pairs need the same items"):
        stats.paired_test("a", [1.0, 2.0], "b", [1.0])


def test_holm_adjustment_on_a_textbook_case():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.2]) == [0.2]


def test_verdict_names_the_significantly_better_model():
    rng = np.random.default_rng(5)
    base = rng.integers(2, 8, size=40).astype(float)
    scores = {"small": list(base), "big": list(base + rng.integers(1, 3, size=40))}
    result = stats.verdict(scores, seed=1)
    assert result.winner == "big"
    assert result.p_value is not None and result.p_value < 0.05
    assert len(result.pairwise) == 1


def test_verdict_is_a_tie_when_the_lead_is_noise():
    rng = np.random.default_rng(6)
    a = rng.integers(1, 11, size=30).astype(float)
    b = a.copy()
    b[:2] += 1  # a lead of 2 points over 30 items
    result = stats.verdict({"a": list(a), "b": list(b)}, seed=1)
    assert result.winner == stats.TIE
    assert result.best == "b"
    assert result.p_value is not None and result.p_value >= 0.05


def test_verdict_with_three_models_holm_adjusts_and_needs_every_comparison():
    rng = np.random.default_rng(8)
    base = rng.normal(5, 2, size=50)
    scores = {
        "a": list(base),
        "b": list(base + 1.0 + rng.normal(0, 0.3, 50)),
        "c": list(base + 1.05 + rng.normal(0, 0.3, 50)),  # b and c are indistinguishable
    }
    result = stats.verdict(scores, seed=1)
    assert result.winner == stats.TIE
    assert {(t.a, t.b) for t in result.pairwise} == {("a", "b"), ("a", "c"), ("b", "c")}
    assert all(t.p_adjusted >= t.p_value for t in result.pairwise)


def test_verdict_is_reproducible():
    rng = np.random.default_rng(9)
    scores = {"a": list(rng.normal(5, 1, 25)), "b": list(rng.normal(5.3, 1, 25))}
    assert stats.verdict(scores, seed=3) == stats.verdict(scores, seed=3)


@pytest.mark.parametrize(
    ("scores", "winner", "reason"),
    [
        pytest.param({"a": [1.0, 2.0], "b": [None, None]}, stats.INCONCLUSIVE, "b has no scored item", id="one-unscored"),
        pytest.param({"a": [9.0] * 8, "b": [1.0] * 8, "c": []}, stats.INCONCLUSIVE, "c has no scored item", id="empty"),
        pytest.param({"a": [None], "b": [None]}, stats.INCONCLUSIVE, "no model has a score", id="none-scored"),
        pytest.param({"a": [1.0, 2.0]}, "a", "only model evaluated", id="lone-model-forfeit"),
    ],
)
def test_a_model_without_scored_items_makes_the_verdict_inconclusive(scores, winner, reason):
    """A model with no scored item (its judge or metric failed) is never beaten: no verdict, no p-value."""
    result = stats.verdict(scores)
    assert (result.winner, result.p_value) == (winner, None) and reason in result.reason


def test_agreement_of_judges():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    same = stats.agreement(a, a)
    assert (same.spearman, same.kappa, same.exact) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    shifted = stats.agreement(a, [x + 1 for x in a])
    assert shifted.spearman == pytest.approx(1.0)
    assert shifted.kappa is not None and shifted.kappa < 0.1
    partial = stats.agreement([1, 2, None, 4], [1, 3, 3, None])
    assert partial.n == 2


def test_cohen_kappa_on_a_textbook_table():
    # 50 items: both yes 20, both no 15, a-yes/b-no 5, a-no/b-yes 10 -> po=0.7, pe=0.5 -> kappa 0.4
    a = [1] * 20 + [0] * 15 + [1] * 5 + [0] * 10
    b = [1] * 20 + [0] * 15 + [0] * 5 + [1] * 10
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)


def test_verdict_without_any_scored_item_is_inconclusive_not_a_tie():
    result = stats.verdict({"a": [None, None], "b": [None]})
    assert result.winner == stats.INCONCLUSIVE and result.p_value is None


@pytest.mark.parametrize(
    ("n", "reason"),
    [
        pytest.param({"a": 8, "b": 0}, "b has no scored item on judge: there is no verdict.", id="one-unscored"),
        pytest.param({"a": 0, "b": 0}, "No model has a scored item on judge: there is no verdict.", id="none-scored"),
    ],
)
def test_the_report_names_the_model_without_scored_items(n: dict[str, int], reason: str) -> None:
    from ftc_api.steps import EvaluatedModelResult, EvaluateResult, MetricScore
    from ftc_evaluator.outcome import verdict_reason

    models = [EvaluatedModelResult(model=m, checkpoint="best", scores=[MetricScore(metric="judge", n=k)]) for m, k in n.items()]
    result = EvaluateResult(ok=True, models=models, primary_metric="judge", winner=stats.INCONCLUSIVE)
    assert verdict_reason(result) == reason
