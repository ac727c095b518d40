"""Routing statistics over many batches and over the ranks of a distributed run.

A :class:`~mtl.moe.RoutingStats` describes one batch. The statistics of a union of
batches (of a validation pass, or of every rank's part of one global batch) follow
from the sums of one packed vector per layer (:mod:`mtl.moe.routing_sums`): exactly
what one batch holding all those tokens gives, however the tokens were split into
batches or ranks, empty ones included; ratios such as ``load_max_over_mean`` are
computed from the summed loads, not averaged over batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl.moe import RoutingStats
from mtl.moe.routing_sums import (
    SumOverRanks,
    pack_routing_stats,
    packed_size,
    sum_over_ranks,
    unpack_routing_stats,
)

__all__ = ["RoutingTotals", "SumOverRanks", "sum_over_ranks"]


class RoutingTotals:
    """Routing statistics of every batch seen since :meth:`reset`, per MoE layer.

    ``update`` adds each batch's packed statistics on the device (no host sync);
    ``reduce`` sums them over the ranks once, at the end of an evaluation;
    ``stats`` hands back one :class:`RoutingStats` per layer describing all of those
    tokens together.

    Example:
        >>> from mtl.moe import RoutingResult, routing_stats
        >>> def batch(experts):
        ...     T = len(experts)
        ...     return routing_stats(RoutingResult(
        ...         weights_TK=torch.ones(T, 1), experts_TK=torch.tensor(experts).view(T, 1),
        ...         logits_TE=torch.zeros(T, 2), probs_TE=torch.full((T, 2), 0.5)))
        >>> totals = RoutingTotals()
        >>> totals.update({3: batch([0, 0])})
        >>> totals.update({3: batch([1, 0, 0, 0])})
        >>> s = totals.stats()[3]
        >>> s.tokens_per_expert_E.tolist(), float(s.num_tokens)
        ([5.0, 1.0], 6.0)
    """

    def __init__(self) -> None:
        self._sum: dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._sum = {}

    def update(self, stats: Mapping[int, RoutingStats]) -> None:
        """Add one batch's statistics (layer index -> stats)."""
        for i, st in stats.items():
            packed = pack_routing_stats(st)
            self._sum[i] = self._sum[i] + packed if i in self._sum else packed

    def reduce(
        self, reduce_sum: SumOverRanks, num_experts: Mapping[int, int], device: torch.device
    ) -> None:
        """Sum the totals over the ranks (every rank calls this, once, at the same point).

        Args:
            reduce_sum: sums a tensor over the ranks.
            num_experts: every MoE layer's index -> its expert count; a rank that saw no
                batch takes part with zeros.
            device: where those zeros live (the collective's device).
        """
        for i in sorted(num_experts):
            if i not in self._sum:
                self._sum[i] = torch.zeros(
                    packed_size(num_experts[i]), dtype=torch.float64, device=device
                )
        layers = sorted(self._sum)
        if not layers:
            return
        parts = [self._sum[i] for i in layers]
        total = reduce_sum(torch.cat(parts))
        self._sum = dict(zip(layers, total.split([len(p) for p in parts]), strict=True))

    def stats(self) -> dict[int, RoutingStats]:
        """Layer index -> the statistics of all the tokens added (and reduced), layers in order."""
        return {i: unpack_routing_stats(self._sum[i]) for i in sorted(self._sum)}
