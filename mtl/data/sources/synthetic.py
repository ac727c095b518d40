"""Synthetic multi-task data: the MMoE paper's controlled-correlation benchmark and a CTR generator.

Both generators are vectorised numpy and deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import SourceData


def _unit_pair(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Two orthonormal vectors in R^d (Gram-Schmidt on Gaussian draws)."""
    u1 = rng.standard_normal(d)
    u1 /= np.linalg.norm(u1)
    u2 = rng.standard_normal(d)
    u2 -= (u2 @ u1) * u1
    u2 /= np.linalg.norm(u2)
    return u1, u2


def synthetic_mmoe(
    n: int = 10_000,
    correlation: float = 0.5,
    d: int = 100,
    *,
    c: float = 1.0,
    m: int = 10,
    noise_std: float = 0.1,
    seed: int = 0,
) -> SourceData:
    """Two regression tasks with a controlled task correlation (Ma et al., KDD 2018, sec. 5.2).

    ``w1 = c*u1``, ``w2 = c*(p*u1 + sqrt(1-p^2)*u2)`` for orthonormal ``u1, u2``;
    ``x ~ N(0, I_d)``; ``y_i = w_i^T x + sum_j sin(alpha_j w_i^T x + beta_j) + eps_i``.
    As in the paper, both tasks share the sinusoid parameters ``alpha_j, beta_j``
    (drawn from N(0, 1)), so the only difference between the tasks is the angle
    between ``w1`` and ``w2``, and the label correlation grows with ``p``.

    Args:
        n: number of rows.
        correlation: cosine ``p`` between the task weight vectors, in [-1, 1].
        d: input dimension.
        c: scale of the weight vectors.
        m: number of sinusoids.
        noise_std: std of the label noise (the paper's N(0, 0.01) is std 0.1).
        seed: seed of the vectors, sinusoid parameters, inputs and noise.

    Returns:
        :class:`SourceData` with numeric columns ``x_0..x_{d-1}`` and regression labels ``y1``, ``y2``.

    Example:
        >>> data = synthetic_mmoe(n=100, correlation=0.9, d=8, seed=1)
        >>> data.train.shape, data.roles.labels
        ((100, 10), {'y1': 'regression', 'y2': 'regression'})
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if d < 2:
        raise ValueError(f"d must be >= 2 to hold two orthogonal vectors, got {d}")
    rng = np.random.default_rng(seed)
    u1, u2 = _unit_pair(rng, d)
    w1 = c * u1
    w2 = c * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)
    alpha, beta = rng.standard_normal(m), rng.standard_normal(m)
    x = rng.standard_normal((n, d))

    def label(w: np.ndarray) -> np.ndarray:
        z = x @ w
        return (
            z + np.sin(np.outer(z, alpha) + beta).sum(axis=1) + noise_std * rng.standard_normal(n)
        )

    y1, y2 = label(w1), label(w2)
    cols = {f"x_{j}": x[:, j].astype(np.float32) for j in range(d)}
    frame = pl.DataFrame({**cols, "y1": y1, "y2": y2})
    roles = ColumnRoles(numeric=list(cols), labels={"y1": "regression", "y2": "regression"})
    return SourceData(
        name="synthetic_mmoe",
        train=frame,
        roles=roles,
        description=f"synthetic_mmoe: {n:,} generated rows (seed {seed})",
    )


def _zipf_draw(rng: np.random.Generator, n_values: int, size: int, exponent: float) -> np.ndarray:
    # Popularity in rec logs is heavy-tailed; ids are shuffled so id order means nothing.
    weights = (np.arange(1, n_values + 1, dtype=np.float64)) ** -exponent
    ranked = rng.choice(n_values, size=size, p=weights / weights.sum())
    return rng.permutation(n_values)[ranked]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _calibrate_bias(logit: np.ndarray, target: float) -> float:
    """Bias ``b`` with ``mean(sigmoid(logit + b)) == target`` (bisection: the mean is monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logit + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_DEFAULT_RATES = (0.25, 0.05, 0.02, 0.01)


def synthetic_ctr(
    n: int = 200_000,
    n_users: int = 10_000,
    n_items: int = 5_000,
    tasks: Sequence[str] = ("click", "like", "conversion"),
    *,
    rates: Sequence[float] | Mapping[str, float] | None = None,
    latent_dim: int = 8,
    signal: float = 1.5,
    task_correlation: float = 0.6,
    cascade: bool = True,
    seed: int = 0,
) -> SourceData:
    """Multi-objective CTR log with correlated, learnable binary labels.

    Each row is an impression of an item to a user in a context. Every task's logit
    mixes a shared user-item affinity (latent dot product) with a task-specific
    one (weight ``task_correlation`` on the shared part), plus field effects
    (item category/brand, user segment, device, hour) and numeric effects (price,
    position, user activity); the ``noise`` column is pure noise. With ``cascade``
    the later tasks can only fire after the first one (a like or a conversion needs
    a click), which also makes them sparser. Biases are calibrated so that the
    marginal positive rate of each task equals ``rates``.

    Args:
        n: number of impressions.
        n_users: number of users (Zipf-distributed activity).
        n_items: number of items (Zipf-distributed popularity).
        tasks: label names; the first is the root task of the cascade.
        rates: marginal positive rate per task (default 0.25, 0.05, 0.02, 0.01, ...).
        latent_dim: width of the latent user/item factors.
        signal: scale of the latent affinity in the logits (higher = easier).
        task_correlation: share in [0, 1] of the shared affinity in each task.
        cascade: later tasks require the first task to be positive.
        seed: seed of everything.

    Returns:
        :class:`SourceData` with categorical ``user_id, item_id, user_segment, user_age,
        item_category, item_brand, device, hour``, numeric ``price, user_activity,
        position, noise``, binary labels ``tasks`` and user column ``user_id``.

    Example:
        >>> data = synthetic_ctr(n=1000, n_users=50, n_items=40, seed=0)
        >>> data.roles.label_names, data.train.height
        (['click', 'like', 'conversion'], 1000)
    """
    tasks = list(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be non-empty and unique, got {tasks}")
    if isinstance(rates, Mapping):
        rate_list = [float(rates[t]) for t in tasks]
    elif rates is not None:
        rate_list = [float(r) for r in rates]
    else:
        rate_list = [_DEFAULT_RATES[min(i, len(_DEFAULT_RATES) - 1)] for i in range(len(tasks))]
    if len(rate_list) != len(tasks) or not all(0.0 < r < 1.0 for r in rate_list):
        raise ValueError(f"rates must give one value in (0, 1) per task {tasks}, got {rate_list}")
    if cascade and any(r > rate_list[0] for r in rate_list[1:]):
        raise ValueError(
            f"with cascade=True no rate may exceed the first task's rate, got {rate_list}"
        )
    if not 0.0 <= task_correlation <= 1.0:
        raise ValueError(f"task_correlation must be in [0, 1], got {task_correlation}")

    rng = np.random.default_rng(seed)
    k, n_tasks = latent_dim, len(tasks)
    # Entity attributes: categories fixed per user / item, so they carry signal.
    user_segment = rng.integers(0, 16, n_users)
    user_age = rng.integers(0, 8, n_users)
    user_activity = rng.gamma(2.0, 1.0, n_users)
    item_category = rng.integers(0, 64, n_items)
    item_brand = rng.integers(0, 500, n_items)
    item_price = rng.lognormal(3.0, 1.0, n_items)

    u = _zipf_draw(rng, n_users, n, 0.7)
    i = _zipf_draw(rng, n_items, n, 0.9)
    device = rng.integers(0, 4, n)
    hour = rng.integers(0, 24, n)
    position = rng.integers(1, 21, n).astype(np.float64)
    noise = rng.standard_normal(n)

    # Latent factors; items share a category factor so that item_category generalises.
    cat_factor = rng.standard_normal((64, k))
    user_f = rng.standard_normal((n_tasks + 1, n_users, k))
    item_f = rng.standard_normal((n_tasks + 1, n_items, k)) + cat_factor[item_category][None]
    item_f /= np.sqrt(2.0)

    def affinity(slot: int) -> np.ndarray:
        return np.einsum("nk,nk->n", user_f[slot][u], item_f[slot][i]) / np.sqrt(k)

    def field_effects() -> np.ndarray:
        effects = 0.0
        for values, card in (
            (item_category[i], 64),
            (item_brand[i], 500),
            (user_segment[u], 16),
            (user_age[u], 8),
            (device, 4),
            (hour, 24),
        ):
            effects = effects + rng.normal(0.0, 0.4, card)[values]
        return effects

    shared = affinity(0)
    common = field_effects() - 0.4 * (np.log(item_price[i]) - 3.0) - 0.08 * (position - 10.5)
    common = common + 0.3 * (np.log1p(user_activity[u]) - 1.0)
    labels: dict[str, np.ndarray] = {}
    for t, name in enumerate(tasks):
        mixed = np.sqrt(task_correlation) * shared + np.sqrt(1.0 - task_correlation) * affinity(
            t + 1
        )
        logit = signal * mixed + common + 0.5 * field_effects()
        if cascade and t > 0:
            # Calibrate on the rows where the root task fired: P(y_t) = P(root) * P(y_t | root).
            root = labels[tasks[0]].astype(bool)
            conditional = rate_list[t] / max(root.mean(), 1e-12)
            if conditional >= 1.0:
                raise ValueError(
                    f"rate of {name!r} ({rate_list[t]}) is not below the realised rate of {tasks[0]!r}"
                )
            b = _calibrate_bias(logit[root], conditional)
            labels[name] = (root & (rng.random(n) < _sigmoid(logit + b))).astype(np.int8)
        else:
            b = _calibrate_bias(logit, rate_list[t])
            labels[name] = (rng.random(n) < _sigmoid(logit + b)).astype(np.int8)

    frame = pl.DataFrame(
        {
            "user_id": u.astype(np.int64),
            "item_id": i.astype(np.int64),
            "user_segment": user_segment[u],
            "user_age": user_age[u],
            "item_category": item_category[i],
            "item_brand": item_brand[i],
            "device": device,
            "hour": hour,
            "price": item_price[i],
            "user_activity": user_activity[u],
            "position": position,
            "noise": noise,
            **labels,
        }
    )
    roles = ColumnRoles(
        categorical=[
            "user_id",
            "item_id",
            "user_segment",
            "user_age",
            "item_category",
            "item_brand",
            "device",
            "hour",
        ],
        numeric=["price", "user_activity", "position", "noise"],
        labels=dict.fromkeys(tasks, "binary"),
        user_column="user_id",
    )
    return SourceData(
        name="synthetic_ctr",
        train=frame,
        roles=roles,
        description=f"synthetic_ctr: {n:,} generated rows (seed {seed})",
    )
