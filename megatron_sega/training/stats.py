"""95% intervals and paired tests for preference accuracies (pure functions, numpy only).

- An accuracy over ``n`` pairs gets the **Wilson score interval** (Wilson 1927). Unlike the
  normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal coverage at the
  small ``n`` and the accuracies near 0 or 1 that our evaluations have (64 pairs in the real-model
  demo). It equals statsmodels' ``proportion_confint(method="wilson")``.
- A weighted combination of subset accuracies (RewardBench's section scores) is no binomial
  proportion: it gets a **stratified percentile bootstrap** (pairs resampled within each subset,
  the subset sizes kept), :func:`stratified_bootstrap`.
- A mean over prompts of per-prompt fractions (answer accuracy over n samples a prompt) gets
  the **Student-t interval** over prompts, :func:`mean_interval` (the t quantile in closed form,
  no scipy).
- Two evaluations of the same pairs are compared **paired**: the percentile bootstrap of the
  mean per-pair difference (pairs resampled together) and **McNemar's exact test** on the
  discordant pairs, :func:`mcnemar_exact_p` (statsmodels' ``mcnemar(exact=True)``); two
  means over the same prompts by the **paired t test**, :func:`paired_t_test`.

The bootstraps draw from ``numpy.random.default_rng(seed)``: the same inputs give the same
interval on every run.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
# The two-sided 97.5% normal quantile, 1.959963984540054 (scipy.stats.norm.ppf(0.975)).
Z95 = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``successes / n``:
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``.
    ``successes`` may be fractional (a tie counted as half a success). ``n = 0``: (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    """The central ``CONFIDENCE`` range of bootstrap replicates (linear interpolation)."""
    tail = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(np.asarray(replicates, dtype=np.float64), [tail, 1 - tail])
    return float(lo), float(hi)


def stratified_bootstrap(groups: Mapping[str, Sequence[float]], samples: int,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """``samples`` bootstrap replicates of each group's mean, each group resampled (with
    replacement, at its own size) independently of the others: {group: array [samples]}.
    Any weighted combination of the group means, computed replicate by replicate, then has a
    percentile interval that respects the fixed design (RewardBench's subset sizes are fixed,
    not drawn). Groups are drawn in sorted order, so the result does not depend on dict order."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(groups):
        values = np.asarray(groups[name], dtype=np.float64)
        if values.size == 0:
            raise ValueError(f"group {name!r} is empty")
        idx = rng.integers(0, values.size, size=(samples, values.size))
        out[name] = values[idx].mean(axis=1)
    return out


def paired_bootstrap_difference(a: Sequence[float], b: Sequence[float], samples: int,
                                seed: int = 0) -> tuple[float, tuple[float, float]]:
    """``mean(b - a)`` and its percentile bootstrap interval, the pairs resampled together (so
    the correlation of two models on the same pair is kept; an unpaired interval would be far
    too wide)."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.size == 0:
        raise ValueError(f"need two equal, non-empty samples, got {a_arr.size} and {b_arr.size}")
    diff = b_arr - a_arr
    replicates = stratified_bootstrap({"diff": diff}, samples, seed)["diff"]
    return float(diff.mean()), percentile_interval(replicates)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under H0 each of the ``n = only_a + only_b``
    discordant pairs (right under one evaluation, wrong under the other) goes either way with
    probability 1/2, so ``p = min(1, 2 * P[Binomial(n, 1/2) <= min(only_a, only_b)])``.
    No discordant pair: p = 1."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / (1 << n))  # int / int: correctly rounded, never overflows


def student_t_two_sided(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with an integer ``df >= 1``, in closed form (Abramowitz &
    Stegun 26.7.3-4): with ``theta = atan(t / sqrt(df))``, a finite series in ``cos(theta)``."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: 2/pi * (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return min(1.0, 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total))
    term, total = 1.0, 1.0  # even: sin * (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return min(1.0, math.sin(theta) * total)


def student_t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided critical value ``t`` with ``P(|T| < t) = confidence`` (scipy's
    ``t.ppf((1 + confidence) / 2, df)``), by bisection on :func:`student_t_two_sided`."""
    lo, hi = 0.0, 1.0
    while student_t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if student_t_two_sided(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95% Student-t interval of a mean, ``mean -+ t(n-1) * sd / sqrt(n)`` (sd with
    ``n - 1``), as scipy's ``t.interval`` and statsmodels' ``DescrStatsW.tconfint_mean`` give it.
    Used for a mean over prompts of per-prompt fractions, where the samples of one prompt are
    not independent and a binomial interval over all samples would be too narrow. Equal values
    (every prompt 0, say) give a zero-width interval: read it with the prompt count. Fewer than
    two values: (nan, nan)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    half = student_t_quantile(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return float(x.mean()) - half, float(x.mean()) + half


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """The paired Student-t test of ``mean(b - a)`` (scipy's ``ttest_rel(b, a)``): the mean
    difference, its 95% interval and the two-sided p-value, over ``n >= 2`` paired values (a
    prompt's sampled-answer accuracy under two models, say). Equal differences everywhere give
    a zero-width interval and p = 1 when they are all 0, p = 0 otherwise."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.size < 2:
        raise ValueError(f"need two equal samples of at least 2 values, got {a_arr.size} and "
                         f"{b_arr.size}")
    diff = b_arr - a_arr
    mean, n = float(diff.mean()), diff.size
    se = float(diff.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return {"difference": mean, "ci95": [mean, mean], "p": 1.0 if mean == 0.0 else 0.0,
                "t": math.nan, "df": n - 1}
    t = mean / se
    half = student_t_quantile(n - 1) * se
    return {"difference": mean, "ci95": [mean - half, mean + half],
            "p": 1.0 - student_t_two_sided(abs(t), n - 1), "t": t, "df": n - 1}
