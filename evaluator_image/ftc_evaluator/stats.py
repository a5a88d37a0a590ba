"""Statistics of the bake-off: pure, seeded functions of score arrays (numpy + scipy, no I/O).

- `mean_ci`: a metric's mean over the test items with a 95% bootstrap interval (BCa).
- `paired_test`: two models on the same items: mean difference, its bootstrap interval, a paired
  permutation test (sign flips of the per-item differences) and a Wilcoxon signed-rank test as a check.
- `holm`: Holm-Bonferroni adjustment of a family of p-values.
- `verdict`: the best model when its lead over every other model is significant, else `tie`.
- `agreement`: Spearman correlation and Cohen's kappa between two judges' ratings.

Missing scores are `None` or NaN: intervals skip them, paired tests use only items both models have.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from ftc_api.status import INCONCLUSIVE, TIE
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    """A mean with its bootstrap interval; `n` items scored, `missing` items without a score."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int = 0


@dataclass(frozen=True)
class Paired:
    """A paired comparison of models `a` and `b` on the same items (a minus b)."""

    a: str
    b: str
    mean_diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float
    wilcoxon_p: float | None
    n: int
    p_adjusted: float = 1.0


@dataclass(frozen=True)
class Verdict:
    """The winner (a model name or `tie`), the adjusted p-value behind it, and why."""

    winner: str
    p_value: float | None
    best: str | None
    reason: str
    pairwise: list[Paired] = field(default_factory=list)


def as_array(values: Sequence[float | None]) -> np.ndarray:
    """Scores as a float array with NaN for missing ones."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def mean_ci(values: Sequence[float | None], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 42) -> MeanCI:
    """Mean of the present values and its BCa bootstrap interval (seeded: same input, same interval).

    One value gives a mean and no interval; constant values give a zero-width interval."""
    array = as_array(values)
    present = array[~np.isnan(array)]
    missing = int(array.size - present.size)
    n = int(present.size)
    if n == 0:
        return MeanCI(None, None, None, 0, missing)
    mean = float(present.mean())
    if n == 1:
        return MeanCI(mean, None, None, 1, missing)
    if np.all(present == present[0]):
        return MeanCI(mean, mean, mean, n, missing)
    low, high = _bootstrap_interval(present, resamples=resamples, confidence=confidence, seed=seed)
    return MeanCI(mean, low, high, n, missing)


def _bootstrap_interval(sample: np.ndarray, *, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning on near-constant data: fall back below
        result = stats.bootstrap(
            (sample,),
            np.mean,
            n_resamples=resamples,
            confidence_level=confidence,
            method="BCa",
            vectorized=True,
            random_state=_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):
        # BCa is undefined when nearly every resample has the same mean; the percentile interval is not.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                (sample,),
                np.mean,
                n_resamples=resamples,
                confidence_level=confidence,
                method="percentile",
                vectorized=True,
                random_state=_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return low, high


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def paired_test(
    a_name: str,
    a: Sequence[float | None],
    b_name: str,
    b: Sequence[float | None],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 42,
) -> Paired:
    """Compare two models item by item. Items missing in either model are left out.

    p-value: two-sided paired permutation test (each item's pair swapped or not; exact when
    2**n <= resamples). Wilcoxon signed-rank (zero_method="pratt", integer judge scores tie often)
    is reported beside it as a check. The interval is the bootstrap interval of the mean difference."""
    x, y = as_array(a), as_array(b)
    if x.size != y.size:
        raise ValueError(f"paired_test: {a_name} has {x.size} items and {b_name} {y.size}; pairs need the same items")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n == 0:
        return Paired(a_name, b_name, 0.0, None, None, 1.0, None, 0)
    diff = x - y
    mean_diff = float(diff.mean())
    if n == 1 or np.all(diff == diff[0]):
        # No variation: an all-zero difference is no evidence; a constant non-zero one is decided by the sign test.
        p = 1.0 if diff[0] == 0 else float(min(1.0, 2.0 * 0.5**n))
        return Paired(a_name, b_name, mean_diff, mean_diff, mean_diff, p, None if n == 1 else p, n)
    perm = stats.permutation_test(
        (x, y),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        random_state=_rng(seed),
    )
    p_value = float(min(1.0, perm.pvalue))
    low, high = _bootstrap_interval(diff, resamples=resamples, confidence=confidence, seed=seed)
    return Paired(a_name, b_name, mean_diff, low, high, p_value, _wilcoxon(diff), n)


def _wilcoxon(diff: np.ndarray) -> float | None:
    if np.all(diff == 0):
        return 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(stats.wilcoxon(diff, zero_method="pratt").pvalue)
    except ValueError:
        return None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order (monotone, capped at 1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def pairwise_tests(
    scores: Mapping[str, Sequence[float | None]], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 42
) -> list[Paired]:
    """Every pair of models (in the mapping's order), with Holm-adjusted p-values over the family."""
    names = list(scores)
    tests = [
        paired_test(a, scores[a], b, scores[b], resamples=resamples, confidence=confidence, seed=seed)
        for a, b in combinations(names, 2)
    ]
    adjusted = holm([t.p_value for t in tests]) if len(tests) > 1 else [t.p_value for t in tests]
    return [_with_adjusted(t, p) for t, p in zip(tests, adjusted, strict=True)]


def _with_adjusted(test: Paired, p_adjusted: float) -> Paired:
    return Paired(**{**test.__dict__, "p_adjusted": p_adjusted})


def verdict(
    scores: Mapping[str, Sequence[float | None]],
    *,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 42,
) -> Verdict:
    """The winner on one metric: the model with the highest mean wins when, against every other model,
    its lead is positive and significant after Holm adjustment; otherwise `tie`. When any model has no scored
    item, `inconclusive`: a model nobody could score is not beaten (its judge or metric failed, not its
    answers), so there is no verdict at all. A lone model (the others left out before scoring) wins by forfeit.

    `p_value` is the largest adjusted p-value of the best model's comparisons (the one that decides)."""
    means = {name: mean_ci(values, resamples=resamples, seed=seed).mean for name, values in scores.items()}
    scored = {name: m for name, m in means.items() if m is not None}
    if not scored:
        return Verdict(INCONCLUSIVE, None, None, "no model has a score on this metric: no verdict")
    unscored = [name for name in scores if name not in scored]
    if unscored:
        return Verdict(INCONCLUSIVE, None, None, f"{', '.join(unscored)} has no scored item on this metric: no verdict")
    if len(scored) == 1:
        (only,) = scored
        return Verdict(only, None, only, f"{only} is the only model evaluated")
    pairs = pairwise_tests({name: scores[name] for name in scored}, resamples=resamples, seed=seed)
    best = max(scored, key=lambda name: (scored[name], -list(scored).index(name)))
    worst_p = 0.0
    for test in pairs:
        if best not in (test.a, test.b):
            continue
        other = test.b if test.a == best else test.a
        lead = test.mean_diff if test.a == best else -test.mean_diff
        worst_p = max(worst_p, test.p_adjusted)
        if lead <= 0 or test.p_adjusted >= alpha:
            return Verdict(
                TIE,
                test.p_adjusted,
                best,
                f"{best} leads {other} by {lead:.4g}, not significant (adjusted p={test.p_adjusted:.3g} >= {alpha})",
                pairs,
            )
    return Verdict(best, worst_p, best, f"{best} leads every other model significantly (adjusted p <= {worst_p:.3g})", pairs)


@dataclass(frozen=True)
class Agreement:
    """Agreement of two judges on the items both rated."""

    n: int
    spearman: float | None
    kappa: float | None
    exact: float | None


def agreement(a: Sequence[float | None], b: Sequence[float | None]) -> Agreement:
    """Spearman's rho and Cohen's kappa (ratings rounded to integers) on the items both judges rated."""
    x, y = as_array(a), as_array(b)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 2:
        return Agreement(n, None, None, None)
    rho = None
    if np.ptp(x) > 0 and np.ptp(y) > 0:
        rho = float(stats.spearmanr(x, y).statistic)
    return Agreement(n, rho, cohen_kappa(np.rint(x), np.rint(y)), float(np.mean(np.rint(x) == np.rint(y))))


def cohen_kappa(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cohen's kappa of two raters' categorical ratings: (observed - chance) / (1 - chance)."""
    x, y = np.asarray(a), np.asarray(b)
    if x.size == 0:
        return None
    categories = np.union1d(x, y)
    observed = float(np.mean(x == y))
    chance = float(sum(np.mean(x == c) * np.mean(y == c) for c in categories))
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - chance) / (1.0 - chance)
