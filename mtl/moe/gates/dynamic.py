"""Gates whose number of experts per token varies: top-p and expert choice."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl.moe.gates.base import Router
from mtl.moe.routing import RoutingResult


class TopPGate(Router):
    """Top-p (dynamic) routing (Huang et al. 2024, "Harder tasks need more experts").

    Experts are added in decreasing probability until their cumulative
    probability reaches ``p``; at least one expert is always used. Pair it with
    :func:`~mtl.moe.losses.router_entropy_loss`, otherwise the router learns to
    flatten its distribution and activate every expert.

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        p: cumulative probability threshold in ``(0, 1]``.
        max_k: cap on experts per token (``K`` of the result); None = ``E``.
        renormalize: rescale the chosen probabilities to sum to 1 (the paper
            does not; off by default).

    Shapes:
        ``(T, d_model) ->`` RoutingResult with ``K = max_k``, padding invalid.

    Example:
        >>> gate = TopPGate(d_model=8, num_experts=4, p=0.5)
        >>> r = gate(torch.randn(6, 8))
        >>> bool((r.valid_TK.sum(-1) >= 1).all())
        True
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        p: float,
        max_k: int | None = None,
        renormalize: bool = False,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if max_k is not None and not 1 <= max_k <= num_experts:
            raise ValueError(f"max_k must be in [1, {num_experts}], got {max_k}")
        self.p = p
        self.max_k = max_k or num_experts
        self.renormalize = renormalize

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True)
        sorted_TK, experts_TK = sorted_TE[:, : self.max_k], order_TE[:, : self.max_k]
        before_TK = torch.cumsum(sorted_TK, dim=-1) - sorted_TK
        # keep experts until (and including) the one that reaches p; the first always
        valid_TK = before_TK < self.p
        valid_TK[:, 0] = True
        weights_TK = sorted_TK.masked_fill(~valid_TK, 0.0)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return RoutingResult(
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_TK=valid_TK,
        )


class ExpertChoiceGate(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top tokens.

    Scores ``softmax(x W_g)`` over experts; each expert picks the
    ``ceil(capacity_factor * T / E)`` tokens with the highest score for it. Load is
    perfectly balanced by construction and no auxiliary loss is needed, but a
    token's experts depend on the *other* tokens of the batch: the routing is not
    causal (a decoder's token t sees tokens after t through the selection) and a
    sample's output depends on its batch. Use it for encoders, or knowingly.

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        capacity_factor: tokens per expert as a multiple of ``T / E`` (> 0).

    Shapes:
        ``(T, d_model) ->`` RoutingResult with ``K = E``; a token may get 0..E experts.

    Example:
        >>> gate = ExpertChoiceGate(d_model=8, num_experts=4, capacity_factor=1.0)
        >>> gate(torch.randn(8, 8)).valid_TK.sum(0).tolist()
        [2, 2, 2, 2]
    """

    def __init__(self, *, d_model: int, num_experts: int, capacity_factor: float = 1.0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        return min(
            num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))
        )

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        C = self.capacity(T)
        top_EC = torch.topk(probs_TE.T, C, dim=-1).indices  # (E, C) token ids
        chosen_ET = torch.zeros(E, T, dtype=torch.bool, device=probs_TE.device)
        chosen_ET.scatter_(1, top_EC, True)
        valid_TK = chosen_ET.T.contiguous()
        experts_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
        return RoutingResult(
            weights_TK=probs_TE.masked_fill(~valid_TK, 0.0),
            experts_TK=experts_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_TK=valid_TK,
        )
