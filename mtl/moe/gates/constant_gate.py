"""A gate without parameters that sends every token to every expert with a fixed weight.

Used to check expert construction: a dense FFN split into ``E`` neuron groups
(LLaMA-MoE) and run through an :class:`~mtl.moe.layer.MoELayer` with this gate
and weight 1 reproduces the dense FFN exactly, because the experts' outputs add
up to the dense output. Also a baseline "uniform mixture" router.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtl.moe.gates.base import check_positive_int
from mtl.moe.routing import RoutingResult


class ConstantGate(nn.Module):
    """Route every token to all ``E`` experts with the same weight.

    The router probabilities reported for statistics and balancing losses are
    uniform (``1 / E``), the logits zero; no parameter is learned.

    Args:
        num_experts: ``E``.
        weight: combine weight of every expert (1.0 sums the experts' outputs,
            ``1 / E`` averages them).

    Shapes:
        ``(T, D) ->`` RoutingResult with ``K = E``.

    Example:
        >>> gate = ConstantGate(num_experts=3)
        >>> gate(torch.randn(2, 8)).weights_TK.tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, *, num_experts: int, weight: float = 1.0) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        self.weight = float(weight)
        self.k = num_experts

    def forward(self, x_TD: Tensor) -> RoutingResult:
        """Route ``(T, D)`` tokens (or ``(..., D)``, flattened)."""
        T = x_TD.reshape(-1, x_TD.shape[-1]).shape[0]
        E = self.num_experts
        device = x_TD.device
        return RoutingResult(
            weights_TK=torch.full((T, E), self.weight, dtype=torch.float32, device=device),
            experts_TK=torch.arange(E, device=device).expand(T, E),
            logits_TE=torch.zeros(T, E, dtype=torch.float32, device=device),
            probs_TE=torch.full((T, E), 1.0 / E, dtype=torch.float32, device=device),
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, weight={self.weight}"
