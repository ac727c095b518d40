"""Group-limited expert selection (DeepSeek-V3): tokens choose experts only in their best groups."""

from __future__ import annotations

import torch
from torch import Tensor


def check_groups(*, num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    """Raise ValueError unless ``n_group`` groups of equal size can serve ``k`` choices.

    Example:
        >>> check_groups(num_experts=8, k=2, n_group=4, topk_group=2)
    """
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must be >= 1 and divide num_experts={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    per_group = num_experts // n_group
    if n_group > 1 and per_group < 2:
        raise ValueError(
            f"group scores sum each group's top-2 experts: need >= 2 experts per group, "
            f"got num_experts={num_experts}, n_group={n_group}"
        )
    if k > topk_group * per_group:
        raise ValueError(
            f"k={k} exceeds the experts of the kept groups (topk_group={topk_group} x {per_group})"
        )


def group_limited_mask(select_TE: Tensor, *, n_group: int, topk_group: int) -> Tensor:
    """``(T, E)`` bool: the experts of each token's ``topk_group`` best groups.

    Experts ``[g E/n_group, (g+1) E/n_group)`` form group ``g``; a group's score
    is the sum of its two highest selection scores (DeepSeek-V3's node-limited
    routing, which bounds the devices a token is sent to).

    Args:
        select_TE: ``(T, E)`` selection scores (sigmoid scores plus bias).
        n_group: number of groups (divides ``E``).
        topk_group: groups kept per token.

    Example:
        >>> s = torch.tensor([[0.9, 0.1, 0.5, 0.6]])  # groups: (0.9+0.1, 0.5+0.6)
        >>> group_limited_mask(s, n_group=2, topk_group=1).tolist()
        [[False, False, True, True]]
    """
    T, E = select_TE.shape
    group_TGe = select_TE.view(T, n_group, E // n_group)
    group_scores_TG = group_TGe.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
    return keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
