"""The 95% intervals and the paired tests of megatron_sega/training/stats.py against scipy and
statsmodels (test references only): Wilson against ``proportion_confint(method="wilson")``,
McNemar against ``mcnemar(exact=True)``, the bootstraps against ``scipy.stats.bootstrap``
(percentile method; a different random stream, so within a Monte Carlo tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as scipy_stats
import statsmodels.stats.contingency_tables as contingency
import statsmodels.stats.proportion as proportion

from megatron_sega.training.stats import (
    Z95, mcnemar_exact_p, paired_bootstrap_difference, paired_t_test, percentile_interval,
    stratified_bootstrap, wilson_interval,
)


def test_z95_is_the_normal_quantile():
    assert Z95 == pytest.approx(scipy_stats.norm.ppf(0.975), abs=1e-12)


@pytest.mark.parametrize("successes, n", [(52, 64), (53, 64), (0, 10), (10, 10), (31, 160),
                                          (1, 1), (7.5, 20), (120, 160)])
def test_wilson_matches_statsmodels(successes, n):
    low, high = proportion.proportion_confint(successes, n, alpha=0.05, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-12)


def test_wilson_of_nothing_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (1, 0), (3, 9), (9, 3), (10, 10), (0, 25),
                                            (40, 61), (560, 640)])
def test_mcnemar_exact_matches_statsmodels(only_a, only_b):
    table = [[5, only_a], [only_b, 7]]  # the concordant cells do not enter the test
    expected = contingency.mcnemar(table, exact=True).pvalue
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_bootstrap_matches_scipy():
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.6).astype(float)
    b = np.where(rng.random(200) < 0.8, a, 1 - a)  # correlated with a, as two models are
    diff, (low, high) = paired_bootstrap_difference(a, b, samples=20000, seed=3)
    ref = scipy_stats.bootstrap((a, b), lambda x, y, axis: np.mean(y - x, axis=axis),
                                paired=True, n_resamples=20000, method="percentile",
                                random_state=np.random.default_rng(4)).confidence_interval
    assert diff == pytest.approx(np.mean(b - a))
    # The interval's width is ~0.12; two bootstraps of 20000 agree to well within 0.01.
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)
    # Paired: the interval is much narrower than one that ignores the pairing would be.
    unpaired = 2 * Z95 * np.sqrt(a.var() / a.size + b.var() / b.size)
    assert high - low < 0.8 * unpaired


def test_stratified_bootstrap_of_one_group_matches_scipy():
    values = np.array([1.0] * 30 + [0.0] * 18)
    replicates = stratified_bootstrap({"only": values}, samples=20000, seed=0)["only"]
    ref = scipy_stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                                random_state=np.random.default_rng(5)).confidence_interval
    low, high = percentile_interval(replicates)
    # The means lie on a grid of 1/48: the two may land on neighbouring points.
    assert low == pytest.approx(ref.low, abs=1.1 / 48)
    assert high == pytest.approx(ref.high, abs=1.1 / 48)


def test_stratified_bootstrap_keeps_each_group_apart_and_is_seeded():
    groups = {"all right": [1.0] * 5, "half": [1.0, 0.0] * 20}
    first = stratified_bootstrap(groups, samples=500, seed=7)
    assert np.all(first["all right"] == 1.0)  # never mixed with the other group's pairs
    assert 0.3 < first["half"].mean() < 0.7 and first["half"].std() > 0
    again = stratified_bootstrap(dict(reversed(list(groups.items()))), samples=500, seed=7)
    assert np.array_equal(first["half"], again["half"])  # dict order does not matter
    with pytest.raises(ValueError, match="empty"):
        stratified_bootstrap({"none": []}, samples=10)


@pytest.mark.parametrize("n,shift", [(2, 0.3), (5, 0.0), (64, 0.1), (64, -0.05)])
def test_paired_t_test_matches_scipy(n, shift):
    rng = np.random.default_rng(n)
    a = rng.integers(0, 5, n) / 4  # per-prompt fractions of 4 samples, as answer accuracy
    b = np.clip(a + shift + rng.normal(0, 0.25, n), 0, 1)
    result = paired_t_test(a, b)
    ref = scipy_stats.ttest_rel(b, a)
    interval = ref.confidence_interval(0.95)
    assert result["difference"] == pytest.approx(np.mean(b - a), abs=1e-15)
    assert result["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert result["p"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)
    assert result["ci95"] == pytest.approx([interval.low, interval.high], rel=1e-9)
    assert result["df"] == n - 1


def test_paired_t_test_without_spread_and_too_few():
    assert paired_t_test([0.5, 0.25], [0.5, 0.25])["p"] == 1.0
    shifted = paired_t_test([0.0, 0.25], [0.5, 0.75])
    assert shifted["p"] == 0.0 and shifted["ci95"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([1.0], [0.0])
