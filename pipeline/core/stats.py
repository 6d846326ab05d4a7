"""Uncertainty of probe accuracies: seeded bootstrap intervals over eval rows.

A bootstrap resample draws n eval rows with replacement. The resampled top-1
depends only on how many correct rows are drawn, and that count is exactly
Binomial(n, k/n) for k correct rows out of n; for a paired difference between
two probes on the same rows, the counts of rows only A gets right and only B
gets right are exactly Multinomial(n, their shares). Drawing those counts
gives the very distribution that resampling row indices gives, in O(resamples)
instead of O(resamples x n) memory and time, so full iNat18 or ImageNet eval
sets cost nothing. Intervals are the percentile interval of the resamples.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import TimecatError

RESAMPLES = 1000  # the least we accept: percentile intervals need about this many
METHOD = "percentile bootstrap over eval rows"


def _check(resamples: int, n: int) -> None:
    if resamples < RESAMPLES:
        raise TimecatError(f"bootstrap resamples must be at least {RESAMPLES}, got {resamples}")
    if n < 1:
        raise TimecatError("no eval rows to bootstrap")


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def top1_interval(correct: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """95% interval ``[lo, hi]`` of top-1 (%) from a (n,) bool vector of correct eval rows."""
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    _check(resamples, n)
    counts = np.random.default_rng([seed, 0]).binomial(n, correct.mean(), size=resamples)
    return _interval(100.0 * counts / n)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Top-1 of A minus top-1 of B (points) on the same eval rows, with its 95% paired bootstrap interval.

    Rows both get right or both get wrong cancel in every resample; only the
    rows where they disagree move the difference.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise TimecatError(f"paired rows differ in number: {len(a)} and {len(b)}")
    n = len(a)
    _check(resamples, n)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    shares = np.array([only_a, only_b, n - only_a - only_b]) / n
    draws = np.random.default_rng([seed, 1]).multinomial(n, shares, size=resamples)  # (resamples, 3)
    differences = 100.0 * (draws[:, 0] - draws[:, 1]) / n
    difference = 100.0 * (only_a - only_b) / n
    ci = _interval(differences)
    return {
        "difference": round(difference, 4),
        "ci95": ci,
        "rows": n,
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "excludes_zero": not ci[0] <= 0.0 <= ci[1],  # the interval leaves 0 out: more than resampling noise
        "resamples": resamples,
        "interval": "paired " + METHOD,
    }


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one value) with the count."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "count": len(array)}


def mean_difference(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) over independent runs (seeds), with Welch's 95% t-interval (None below 2 runs each)."""
    from scipy import stats as scipy_stats  # scipy comes with scikit-learn

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    difference = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return {"difference": difference, "ci95": None, "interval": "Welch t-interval (needs 2 runs each)"}
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = float(np.sqrt(va + vb))
    if se == 0:
        return {"difference": difference, "ci95": [difference, difference], "interval": "Welch t-interval"}
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))  # Welch-Satterthwaite
    half = float(scipy_stats.t.ppf(0.975, df)) * se
    return {
        "difference": difference,
        "ci95": [round(difference - half, 4), round(difference + half, 4)],
        "interval": f"Welch t-interval, {df:.1f} degrees of freedom",
    }
