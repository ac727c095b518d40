"""Ranking metrics for multi-task evaluation: GAUC, log loss and per-task metric bundles.

GAUC (group AUC, Zhou et al. "Deep Interest Network", 2018) is the AUC computed per
user and averaged with impression weights, over users that have both a positive and
a negative impression. Recommendation papers (HoME included) report it because the
global AUC rewards ranking *users* against each other, which a feed never does.

Everything here is vectorised torch: one sort and a few scatter-adds, no per-user
Python loop, so its cost grows like a sort of the evaluation set
(timings in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MeanSquaredError, Metric, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

LOG_LOSS_EPS = 1e-7
"""Probabilities are clamped to ``[eps, 1 - eps]`` before the log: one confidently
wrong prediction would otherwise make the mean log loss infinite."""


def group_auc(scores: Tensor, labels: Tensor, groups: Tensor) -> tuple[float, int]:
    """Impression-weighted mean of per-group ROC AUC (GAUC).

    Ties in score get the average rank (the Mann-Whitney convention, which is what
    counting a tied positive/negative pair as 1/2 gives). Groups whose labels are
    all 0 or all 1 have no AUC and are skipped, with their impressions.

    Args:
        scores: (N,) float scores (probabilities or logits; only the order matters).
        labels: (N,) binary labels (0/1, any dtype; ``> 0.5`` is positive).
        groups: (N,) int64 group ids (e.g. user ids), any values.

    Returns:
        ``(gauc, n_groups)``: the GAUC (NaN when no group has both classes) and the
        number of groups that entered it.

    Example:
        >>> s = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2])
        >>> y = torch.tensor([1, 0, 0, 1, 1])
        >>> g = torch.tensor([7, 7, 3, 3, 5])
        >>> group_auc(s, y, g)  # user 7: AUC 1 (2 imps), user 3: AUC 0 (2 imps), user 5 skipped
        (0.5, 2)
    """
    if not (scores.shape == labels.shape == groups.shape) or scores.ndim != 1:
        raise ValueError(
            f"scores, labels and groups must be 1-d of equal length, got "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}, {tuple(groups.shape)}"
        )
    n = scores.shape[0]
    if n == 0:
        return math.nan, 0
    # float64 rank sums stay exact up to ~2^53, far beyond any eval set.
    scores = scores.detach().double()
    pos = (labels.detach() > 0.5).double()
    _, g = torch.unique(groups.detach(), return_inverse=True)
    n_groups = int(g.max()) + 1

    # Lexicographic sort by (group, score): a stable sort on the minor key first.
    by_score = torch.argsort(scores, stable=True)
    order = by_score[torch.argsort(g[by_score], stable=True)]
    g_s, s_s, y_s = g[order], scores[order], pos[order]

    # Tie blocks = runs of equal (group, score); each member gets the block's mean rank.
    new_block = torch.ones(n, dtype=torch.bool, device=scores.device)
    new_block[1:] = (g_s[1:] != g_s[:-1]) | (s_s[1:] != s_s[:-1])
    block_id = torch.cumsum(new_block.long(), 0) - 1
    block_start = torch.nonzero(new_block).squeeze(1).double()
    block_size = torch.bincount(block_id).double()
    group_size = torch.bincount(g_s, minlength=n_groups).double()
    group_start = torch.cumsum(group_size, 0) - group_size
    # 1-based rank inside the group, averaged over the tie block.
    rank = block_start[block_id] - group_start[g_s] + (block_size[block_id] + 1.0) / 2.0

    n_pos = torch.zeros(n_groups, dtype=torch.float64, device=scores.device).index_add_(0, g_s, y_s)
    pos_rank_sum = torch.zeros_like(n_pos).index_add_(0, g_s, rank * y_s)
    n_neg = group_size - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return math.nan, 0
    auc = (pos_rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1.0) / 2.0) / (
        n_pos[valid] * n_neg[valid]
    )
    weights = group_size[valid]
    return float((auc * weights).sum() / weights.sum()), int(valid.sum())


def binary_log_loss(probs: Tensor, labels: Tensor, eps: float = LOG_LOSS_EPS) -> Tensor:
    """Per-example binary cross-entropy of probabilities (the "log loss" of CTR papers).

    Args:
        probs: (N,) predicted probabilities.
        labels: (N,) 0/1 labels.
        eps: clamp of the probabilities, see :data:`LOG_LOSS_EPS`.

    Returns:
        (N,) float32 losses; their mean is the log loss.

    Example:
        >>> round(binary_log_loss(torch.tensor([0.5]), torch.tensor([1.0])).item(), 4)
        0.6931
    """
    p = probs.detach().float().clamp(eps, 1.0 - eps)
    y = labels.detach().float()
    return -(y * torch.log(p) + (1.0 - y) * torch.log1p(-p))


class GroupAUC(Metric):
    """Torchmetrics wrapper of :func:`group_auc`: accumulates scores, labels and groups.

    Keeps every example (like exact ``BinaryAUROC``); evaluation sets of rec
    benchmarks fit comfortably. The states are concatenated across processes.

    Example:
        >>> m = GroupAUC()
        >>> m.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]), torch.tensor([4, 4]))
        >>> m.compute().item()
        1.0
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, groups: Tensor) -> None:
        """Add a batch: ``scores``, ``labels``, ``groups`` all ``(B,)``."""
        self.scores.append(scores.detach().float())
        self.labels.append(labels.detach().float())
        self.groups.append(groups.detach().long())

    def compute(self) -> Tensor:
        """GAUC as a float32 scalar (NaN when no group has both classes)."""
        # After a multi-process sync the list states are one concatenated tensor.
        if len(self.scores) == 0:
            return torch.tensor(math.nan)
        value, _ = group_auc(
            dim_zero_cat(self.scores), dim_zero_cat(self.labels), dim_zero_cat(self.groups)
        )
        return torch.tensor(value, dtype=torch.float32)


class BinaryTaskMetrics(nn.Module):
    """AUC, log loss, positive rate and (with user ids) GAUC of one binary task.

    AUC is torchmetrics' exact ``BinaryAUROC``; it returns 0 with a warning when
    the split has a single class, which would read as a real (terrible) score, so
    :meth:`compute` reports NaN instead.

    Example:
        >>> m = BinaryTaskMetrics()
        >>> m.update(torch.tensor([0.8, 0.3, 0.6]), torch.tensor([1.0, 0.0, 0.0]), user=None)
        >>> sorted(m.compute())
        ['auc', 'logloss', 'pos_rate']
    """

    def __init__(self) -> None:
        super().__init__()
        self.auc = BinaryAUROC(thresholds=None)
        self.logloss = MeanMetric()
        self.positives = SumMetric()
        self.count = SumMetric()
        self.gauc = GroupAUC()
        self._has_users = False

    def update(self, probs: Tensor, labels: Tensor, user: Tensor | None) -> None:
        """Add a batch of ``(B,)`` probabilities and 0/1 labels, and ``(B,)`` user ids or None."""
        probs, labels = probs.detach().float(), labels.detach().float()
        self.auc.update(probs, labels.long())
        self.logloss.update(binary_log_loss(probs, labels))
        self.positives.update(labels.sum())
        self.count.update(torch.tensor(float(labels.numel()), device=labels.device))
        if user is not None:
            self._has_users = True
            self.gauc.update(probs, labels, user)

    def compute(self) -> dict[str, float]:
        """``{"auc", "logloss", "pos_rate"[, "gauc"]}`` as Python floats."""
        n, n_pos = float(self.count.compute()), float(self.positives.compute())
        both_classes = 0 < n_pos < n
        out = {
            "auc": float(self.auc.compute()) if both_classes else math.nan,
            "logloss": float(self.logloss.compute()),
            "pos_rate": n_pos / n if n else math.nan,
        }
        if self._has_users:
            out["gauc"] = float(self.gauc.compute())
        return out

    def reset(self) -> None:
        for metric in (self.auc, self.logloss, self.positives, self.count, self.gauc):
            metric.reset()
        self._has_users = False


class RegressionTaskMetrics(nn.Module):
    """Mean squared error of one regression task.

    Example:
        >>> m = RegressionTaskMetrics()
        >>> m.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), user=None)
        >>> m.compute()
        {'mse': 2.0}
    """

    def __init__(self) -> None:
        super().__init__()
        self.mse = MeanSquaredError()

    def update(self, preds: Tensor, labels: Tensor, user: Tensor | None) -> None:
        """Add a batch of ``(B,)`` predictions and targets; ``user`` is ignored."""
        del user
        self.mse.update(preds.detach().float(), labels.detach().float())

    def compute(self) -> dict[str, float]:
        return {"mse": float(self.mse.compute())}

    def reset(self) -> None:
        self.mse.reset()
