"""Self-gate: a unit's gate over its own experts only (HoME's gated residual path)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl.moe.gates.base import Router
from mtl.moe.gates.dense import _as_mask
from mtl.moe.routing import RoutingResult


class SelfGate(Router):
    """Gate over the subset of a bank that a unit owns: sigmoid for one expert, softmax for several.

    HoME's self-gate weighs a task's (or category's) own experts and adds the
    result as a residual. With several allowed experts it is a masked softmax,
    like :class:`~mtl.moe.gates.DenseSoftmaxGate`; with exactly one allowed
    expert a softmax would always give 1, so the weight is ``sigmoid(logit)``
    instead and the path can be switched down. Masked experts get weight
    exactly 0 (hence no gradient through this gate).

    Args:
        d_model: gate input width.
        num_experts: ``E``, size of the bank the gate indexes.
        expert_mask: ``E`` booleans or indices of the allowed experts (None = all).
        bias: learn a logit bias.

    Shapes:
        ``(T, d_model) ->`` RoutingResult with ``K = E``; ``dense_weights()`` is
        ``(T, E)``, summing to 1 (softmax case) or in ``(0, 1)`` (sigmoid case).

    Example:
        >>> gate = SelfGate(d_model=8, num_experts=4, expert_mask=[2])
        >>> w = gate(torch.randn(3, 8)).dense_weights()
        >>> bool((w[:, 2] > 0).all() and (w[:, 2] < 1).all()), w[:, [0, 1, 3]].abs().sum().item()
        (True, 0.0)
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        expert_mask: Sequence[bool] | Sequence[int] | Tensor | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, bias=bias)
        mask_E = _as_mask(expert_mask, num_experts)
        self.register_buffer("expert_mask_E", mask_E, persistent=False)
        self.single = int(mask_E.sum()) == 1

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        T, E = logits_TE.shape
        mask_TE = self.expert_mask_E.expand(T, E)
        if self.single:
            weights_TE = torch.where(mask_TE, torch.sigmoid(logits_TE), 0.0)
            # probabilities for statistics: all mass on the one allowed expert
            probs_TE = mask_TE.to(logits_TE.dtype)
        else:
            weights_TE = torch.softmax(logits_TE.masked_fill(~mask_TE, float("-inf")), dim=-1)
            probs_TE = weights_TE
        return RoutingResult(
            weights_TK=weights_TE,
            experts_TK=torch.arange(E, device=logits_TE.device).expand(T, E),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_TK=mask_TE,
        )

    def extra_repr(self) -> str:
        kind = "sigmoid" if self.single else "softmax"
        return f"d_model={self.d_model}, num_experts={self.num_experts}, allowed={int(self.expert_mask_E.sum())}, {kind}"
