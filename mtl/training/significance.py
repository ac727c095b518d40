"""Uncertainty of test AUCs and paired significance tests between models (DeLong).

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of AUCs measured on
the same rows from the placement values of the Mann-Whitney statistic; Sun & Xu
(2014, "Fast implementation of DeLong's algorithm", IEEE SPL 21(11)) compute them
with three midrankings per score vector, one sort each. With ``m`` positives and
``n`` negatives, for score vector ``k``:

- ``Tz``: midranks of all ``m + n`` scores, ``Tx``: of the positives alone,
  ``Ty``: of the negatives alone (ties get the mean rank);
- ``AUC_k = (sum Tz[pos] - m (m + 1) / 2) / (m n)``: ties count 1/2;
- placements ``V10_k[i] = (Tz[pos_i] - Tx[i]) / n`` (share of negatives below
  positive ``i``) and ``V01_k[j] = 1 - (Tz[neg_j] - Ty[j]) / m`` (share of positives
  above negative ``j``);
- ``Cov(AUC) = S10 / m + S01 / n`` with ``S10``, ``S01`` the sample covariance
  matrices (divisor ``m - 1``, ``n - 1``) of the placements across ``k``.

A contrast ``c`` of AUCs (``[1, -1]`` for a paired difference) has variance
``c' Cov c``; ``z = c' AUC / sqrt(c' Cov c)``, two-sided p-value ``2 (1 - Phi(|z|))``.

Across seeds (:func:`seed_paired_test`, :func:`seed_mean_auc`): every seed is
tested on the same rows, so the statistic is the mean over seeds (of a model's AUC,
or of the paired difference), and its variance has two parts: the DeLong variance of
that mean, from the covariance of all seeds' scores on the shared test rows (test-row
sampling), plus the between-seed sample variance of the per-seed values divided by
the number of seeds (training randomness). The per-seed values also vary with the
test rows, so the sum is slightly conservative. The reference distribution is
Student's t with Welch-Satterthwaite degrees of freedom (only the between-seed part
is estimated from few values: ``S - 1`` degrees of freedom); with one seed, or no
spread between seeds, it is the normal distribution of the single-seed DeLong test.
The per-seed DeLong tests are returned beside it.

Everything here is numpy on CPU (the scores of a test split fit in memory); tensors
are accepted and copied to numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

ArrayLike = Any
"""A 1-d numpy array, torch tensor or sequence of numbers."""


@dataclass(frozen=True)
class AUCInterval:
    """An AUC with its standard error and confidence interval.

    Attributes:
        auc: the AUC (mean over seeds for :func:`seed_mean_auc`).
        se: its standard error.
        low, high: the two-sided interval at ``level`` (clipped to [0, 1]).
        level: the confidence level, e.g. 0.95.
        df: degrees of freedom of the t reference (``inf``: normal).

    Example:
        >>> r = seed_mean_auc([[0.9, 0.7, 0.6, 0.4, 0.3, 0.1]], [1, 1, 0, 1, 0, 0])
        >>> round(r.auc, 4), r.low < r.auc < r.high, r.level
        (0.8889, True, 0.95)
    """

    auc: float
    se: float
    low: float
    high: float
    level: float
    df: float = math.inf


@dataclass(frozen=True)
class PairedTest:
    """A paired test of ``AUC_a - AUC_b`` on the same rows.

    Attributes:
        diff: ``AUC_a - AUC_b`` (mean over seeds for :func:`seed_paired_test`).
        se: its standard error.
        z: ``diff / se`` (a t statistic when ``df`` is finite).
        p_value: two-sided p-value.
        low, high: the interval of ``diff`` at ``level``.
        level: the confidence level.
        df: degrees of freedom of the t reference (``inf``: normal).
        per_seed: the single-seed tests a seed-level test combines (empty otherwise).

    Example:
        >>> y = [1, 1, 0, 1, 0, 0]
        >>> t = seed_paired_test([[0.9, 0.7, 0.6, 0.4, 0.3, 0.1]], [[0.1, 0.7, 0.6, 0.4, 0.3, 0.9]], y)
        >>> round(t.diff, 4), round(t.p_value, 3), t.significant(alpha=0.05)
        (0.5556, 0.077, False)
    """

    diff: float
    se: float
    z: float
    p_value: float
    low: float
    high: float
    level: float
    df: float = math.inf
    per_seed: tuple[PairedTest, ...] = field(default=())

    def significant(self, alpha: float = 0.05) -> bool:
        """True when ``p_value < alpha``."""
        return self.p_value < alpha


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _labels(labels: ArrayLike, n: int) -> np.ndarray:
    y = _vector(labels, "labels")
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} rows, the scores {n}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    pos = y > 0.5
    if pos.all() or not pos.any():
        raise ValueError("labels must hold both classes: the AUC is undefined otherwise")
    return pos


def midranks(x: ArrayLike) -> np.ndarray:
    """1-based ranks of ``x``, tied values getting the mean of their ranks.

    Example:
        >>> midranks([0.3, 0.1, 0.3, 0.2]).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def delong_covariance(
    scores: Sequence[ArrayLike], labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several score vectors on the same rows and their DeLong covariance.

    Args:
        scores: ``K`` score vectors of ``N`` rows each (higher = more likely positive).
        labels: ``(N,)`` 0/1 labels holding both classes.

    Returns:
        ``(auc (K,), cov (K, K))``.

    Example:
        >>> auc, cov = delong_covariance([[0.9, 0.8, 0.3, 0.1]], [1, 0, 1, 0])
        >>> auc.tolist()
        [0.75]
    """
    rows = [_vector(s, "scores") for s in scores]
    if not rows:
        raise ValueError("scores is empty")
    n_rows = rows[0].shape[0]
    if any(r.shape[0] != n_rows for r in rows):
        raise ValueError(f"score vectors differ in length: {[r.shape[0] for r in rows]}")
    pos = _labels(labels, n_rows)
    m, n = int(pos.sum()), int((~pos).sum())
    v10 = np.empty((len(rows), m))
    v01 = np.empty((len(rows), n))
    for k, s in enumerate(rows):
        tz = midranks(s)
        v10[k] = (tz[pos] - midranks(s[pos])) / n
        v01[k] = 1.0 - (tz[~pos] - midranks(s[~pos])) / m
    auc = v10.mean(axis=1)  # = (sum Tz[pos] - m (m + 1) / 2) / (m n)
    # One row of one class: no spread to estimate, the class adds no variance term.
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(rows), len(rows)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(rows), len(rows)))
    return auc, s10 / m + s01 / n


def seed_mean_auc(
    scores: Sequence[ArrayLike], labels: ArrayLike, level: float = 0.95
) -> AUCInterval:
    """One model's AUC over seeds: the mean over seeds with an interval for test rows and seeds.

    Args:
        scores: one score vector per seed, all on the rows of ``labels``.
        labels: ``(N,)`` 0/1 labels.
        level: confidence level.

    Example:
        >>> y = [1, 1, 0, 1, 0, 0]
        >>> r = seed_mean_auc([[0.9, 0.7, 0.6, 0.4, 0.3, 0.1]] * 2, y)
        >>> round(r.auc, 4), r.df
        (0.8889, inf)
    """
    auc, cov = delong_covariance(scores, labels)
    c = np.full(len(auc), 1.0 / len(auc))
    mean, var, df = _combine(auc, float(c @ cov @ c))
    return _interval(mean, var, level, df)


def seed_paired_test(
    scores_a: Sequence[ArrayLike],
    scores_b: Sequence[ArrayLike],
    labels: ArrayLike,
    level: float = 0.95,
) -> PairedTest:
    """Paired test of the mean over seeds of ``AUC_a - AUC_b`` (seed ``i`` of a with seed ``i`` of b).

    The variance adds the DeLong variance of the seed-mean difference (test rows)
    and the between-seed variance of the per-seed differences over the number of
    seeds (training randomness); t reference with Welch-Satterthwaite degrees of
    freedom (see the module docstring). ``per_seed`` holds each seed's own DeLong test.

    Example:
        >>> y = [1, 1, 0, 1, 0, 0]
        >>> a = [[0.9, 0.7, 0.6, 0.4, 0.3, 0.1], [0.8, 0.7, 0.6, 0.5, 0.3, 0.1]]
        >>> t = seed_paired_test(a, a, y)
        >>> t.diff, t.p_value, len(t.per_seed)
        (0.0, 1.0, 2)
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(
            f"seed_paired_test pairs seeds: got {len(scores_a)} and {len(scores_b)} score vectors"
        )
    k = len(scores_a)
    auc, cov = delong_covariance([*scores_a, *scores_b], labels)
    diffs = auc[:k] - auc[k:]
    per_seed = tuple(
        _test(float(diffs[i]), float(cov[i, i] + cov[k + i, k + i] - 2 * cov[i, k + i]), level)
        for i in range(k)
    )
    c = np.concatenate([np.full(k, 1.0 / k), np.full(k, -1.0 / k)])
    mean, var, df = _combine(diffs, float(c @ cov @ c))
    return _test(mean, var, level, df, per_seed)


# ----------------------------------------------------------------- statistics
def _combine(values: np.ndarray, test_var: float) -> tuple[float, float, float]:
    """Mean of per-seed ``values``, its variance (test rows + seeds), Satterthwaite df."""
    k = len(values)
    seed_var = float(np.var(values, ddof=1)) / k if k > 1 else 0.0
    var = max(test_var, 0.0) + seed_var
    # Only the seed term is estimated from few values (k - 1 df); the test-row term
    # comes from thousands of rows and counts as exact.
    df = math.inf if seed_var <= 0.0 else var**2 / (seed_var**2 / (k - 1))
    return float(values.mean()), var, df


def _interval(auc: float, var: float, level: float, df: float = math.inf) -> AUCInterval:
    se = math.sqrt(max(var, 0.0))
    half = _quantile(0.5 + level / 2, df) * se
    return AUCInterval(auc, se, max(0.0, auc - half), min(1.0, auc + half), level, df)


def _test(
    diff: float,
    var: float,
    level: float,
    df: float = math.inf,
    per_seed: tuple[PairedTest, ...] = (),
) -> PairedTest:
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        # Identical rankings (or a degenerate split): no evidence of a difference.
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0.0 else 0.0
    else:
        z = diff / se
        p = two_sided_p(z, df)
    half = _quantile(0.5 + level / 2, df) * se
    return PairedTest(diff, se, z, p, diff - half, diff + half, level, df, per_seed)


def two_sided_p(t: float, df: float = math.inf) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom (normal when infinite).

    Example:
        >>> round(two_sided_p(1.959964), 4), round(two_sided_p(4.302653, 2), 4)
        (0.05, 0.05)
    """
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2.0))
    # P(|T| >= t) = I_x(df / 2, 1 / 2) with x = df / (df + t^2).
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _quantile(q: float, df: float) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t, by bisection on :func:`two_sided_p`."""
    z = NormalDist().inv_cdf(q)
    if math.isinf(df):
        return z
    target = 2.0 * (1.0 - q)
    lo, hi = z, z
    while two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if two_sided_p(mid, df) > target else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2.0


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b)
    log_front -= math.lgamma(a) + math.lgamma(b)
    # The fraction converges fast for x < (a + 1) / (a + b + 2); else use the symmetry.
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return math.exp(log_front) * h / a
