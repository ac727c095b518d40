"""Sigmoid scoring with auxiliary-loss-free balancing (DeepSeek-V3).

:class:`SigmoidBiasGate` is the gate; :func:`group_limited_mask` and
:func:`check_groups` are its optional group-limited selection, in which tokens
choose experts only in their best groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.moe.gates.base import Router, check_k
from mtl.moe.routing import RoutingResult


class SigmoidBiasGate(Router):
    """Sigmoid affinities, top-k selection on ``score + bias``, no auxiliary loss.

    The per-expert bias ``b`` is not learned by gradient: it only shifts which
    experts are *selected*; the combine weights come from the unbiased sigmoid
    scores of the selected experts, normalised to sum to 1 and multiplied by
    ``route_scale``. After each optimiser step, :meth:`update_bias` moves ``b``
    toward balance: ``b += rate * sign(mean_load - load)``, centred so that the
    bias does not drift (as torchtitan does).

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        k: experts per token.
        route_scale: factor on the normalised weights.
        bias_update_rate: ``gamma`` of the update rule (DeepSeek-V3 uses 1e-3).
        normalize: normalise the chosen scores to sum 1.
        n_group: group-limited routing (DeepSeek-V3): the experts form
            ``n_group`` equal groups; 1 disables it.
        topk_group: groups a token may choose from, ranked by the sum of their
            two best ``score + bias`` (:func:`group_limited_mask`); None: all.

    Example:
        >>> gate = SigmoidBiasGate(d_model=8, num_experts=4, k=2)
        >>> r = gate(torch.randn(16, 8))
        >>> gate.update_bias(torch.tensor([16.0, 8.0, 8.0, 0.0]))
        >>> gate.expert_bias_E.argmax().item()
        3
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int,
        route_scale: float = 1.0,
        bias_update_rate: float = 1e-3,
        normalize: bool = True,
        n_group: int = 1,
        topk_group: int | None = None,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.k = check_k(k, num_experts)
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.route_scale = route_scale
        self.bias_update_rate = bias_update_rate
        self.normalize = normalize
        self.n_group = n_group
        self.topk_group = n_group if topk_group is None else topk_group
        check_groups(num_experts=num_experts, k=k, n_group=n_group, topk_group=self.topk_group)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE + self.expert_bias_E
        if self.topk_group < self.n_group:
            keep_TE = group_limited_mask(
                select_TE, n_group=self.n_group, topk_group=self.topk_group
            )
            select_TE = select_TE.masked_fill(~keep_TE, float("-inf"))
        experts_TK = torch.topk(select_TE, self.k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * self.route_scale
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        return RoutingResult(
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            extras={"expert_bias_E": self.expert_bias_E.detach().clone()},
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Move the selection bias toward balance given the observed load ``(E,)``."""
        load_E = tokens_per_expert_E.to(self.expert_bias_E)
        delta_E = self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias_E += delta_E - delta_E.mean()


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
    P, Q = n_group, E // n_group
    select_TPQ = select_TE.view(T, P, Q)
    group_scores_TP = select_TPQ.topk(min(2, Q), dim=-1).values.sum(-1)
    keep_TP = torch.zeros_like(group_scores_TP, dtype=torch.bool)
    keep_TP.scatter_(1, group_scores_TP.topk(topk_group, dim=-1).indices, True)
    return keep_TP.unsqueeze(-1).expand(T, P, Q).reshape(T, E)
