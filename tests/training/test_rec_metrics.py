"""GAUC and the per-task metric bundles against naive reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from mtl.training.metrics import (
    LOG_LOSS_EPS,
    BinaryTaskMetrics,
    GroupAUC,
    binary_log_loss,
    group_auc,
)


def naive_auc(scores: list[float], labels: list[int]) -> float:
    """Pair counting: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_gauc(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[float, int]:
    total, weight, used = 0.0, 0.0, 0
    for g in groups.unique().tolist():
        mask = groups == g
        y = labels[mask].long().tolist()
        if 0 < sum(y) < len(y):
            total += len(y) * naive_auc(scores[mask].tolist(), y)
            weight += len(y)
            used += 1
    return (total / weight if weight else math.nan), used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_auc_matches_per_user_loop_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 600
    groups = torch.randint(0, 40, (n,), generator=gen) * 7919 - 5  # arbitrary, negative ids too
    # Coarse scores create many ties inside users.
    scores = torch.randint(0, 6, (n,), generator=gen).float() / 5
    labels = (torch.rand(n, generator=gen) < 0.3 + 0.4 * scores).float()
    got, used = group_auc(scores, labels, groups)
    want, want_used = naive_gauc(scores, labels, groups)
    assert used == want_used
    assert got == pytest.approx(want, abs=1e-12)


def test_group_auc_single_group_equals_auc_and_degenerate_cases() -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    value, used = group_auc(scores, labels, torch.zeros(4, dtype=torch.long))
    assert (value, used) == (pytest.approx(0.75), 1)
    # All users single-class: no GAUC.
    value, used = group_auc(scores, torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    assert math.isnan(value) and used == 0
    assert math.isnan(
        group_auc(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long))[0]
    )


def test_group_auc_is_impression_weighted() -> None:
    # User 1: 4 impressions, AUC 1; user 2: 2 impressions, AUC 0 -> (4*1 + 2*0) / 6.
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.1, 0.9])
    labels = torch.tensor([1, 1, 0, 0, 1, 0])
    groups = torch.tensor([1, 1, 1, 1, 2, 2])
    value, used = group_auc(scores, labels, groups)
    assert used == 2 and value == pytest.approx(4 / 6)


def test_group_auc_metric_accumulates_batches() -> None:
    gen = torch.Generator().manual_seed(3)
    scores, labels = torch.rand(300, generator=gen), (torch.rand(300, generator=gen) < 0.4).float()
    groups = torch.randint(0, 10, (300,), generator=gen)
    metric = GroupAUC()
    for chunk in range(3):
        sl = slice(100 * chunk, 100 * (chunk + 1))
        metric.update(scores[sl], labels[sl], groups[sl])
    assert metric.compute().item() == pytest.approx(group_auc(scores, labels, groups)[0], abs=1e-6)


def test_binary_task_metrics_auc_logloss_gauc() -> None:
    gen = torch.Generator().manual_seed(4)
    probs, labels = torch.rand(200, generator=gen), (torch.rand(200, generator=gen) < 0.5).float()
    users = torch.randint(0, 5, (200,), generator=gen)
    m = BinaryTaskMetrics()
    m.update(probs[:120], labels[:120], users[:120])
    m.update(probs[120:], labels[120:], users[120:])
    out = m.compute()
    assert out["auc"] == pytest.approx(naive_auc(probs.tolist(), labels.long().tolist()), abs=1e-6)
    want_ll = -(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean().item()
    assert out["logloss"] == pytest.approx(want_ll, rel=1e-5)
    assert out["gauc"] == pytest.approx(naive_gauc(probs, labels, users)[0], abs=1e-6)
    assert out["pos_rate"] == pytest.approx(labels.mean().item())


def test_binary_task_metrics_single_class_is_nan_not_zero() -> None:
    m = BinaryTaskMetrics()
    m.update(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 0.0]), None)
    out = m.compute()
    assert math.isnan(out["auc"]) and "gauc" not in out
    m.reset()
    m.update(torch.tensor([0.2, 0.7]), torch.tensor([0.0, 1.0]), None)
    assert m.compute()["auc"] == 1.0


def test_log_loss_clamps_certain_mistakes() -> None:
    losses = binary_log_loss(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0]))
    # A certain mistake costs -log(eps), not infinity; 1 - eps is rounded to float32.
    upper = float(torch.tensor(1.0 - LOG_LOSS_EPS))
    want = [-math.log(LOG_LOSS_EPS), -math.log1p(-upper), math.log(2.0)]
    assert losses.tolist() == pytest.approx(want, rel=1e-5)


def test_log_loss_matches_the_formula_per_example() -> None:
    gen = torch.Generator().manual_seed(6)
    probs = torch.rand(50, generator=gen) * 0.98 + 0.01
    labels = (torch.rand(50, generator=gen) < 0.5).float()
    want = [
        -math.log(p) if y == 1.0 else -math.log(1.0 - p)
        for p, y in zip(probs.tolist(), labels.tolist(), strict=True)
    ]
    assert binary_log_loss(probs, labels).tolist() == pytest.approx(want, rel=1e-5)
