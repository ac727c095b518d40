"""Routing statistics over many batches and over the ranks of a distributed run.

A :class:`~mtl.moe.RoutingStats` describes one batch. Its fields are either counts
(``tokens_per_expert_E``, ``dropped_slots``, ``dropped_tokens``, ``valid_slots``,
``num_tokens``) or means over the batch's tokens (``entropy``, ``experts_per_token``,
``mean_weight_E``). Counts add up, and a mean times ``num_tokens`` adds up, so the
statistics of a union of batches (of a validation pass, or of every rank's part of
one global batch) follow from the sums of one vector per layer. The union's
statistics are then exactly what one batch holding all those tokens gives, however
the tokens were split into batches or ranks; ratios such as ``load_max_over_mean``
are computed from the summed loads, not averaged over batches.

Layout of the per-layer vector (``2E + 6`` float64 values)::

    [tokens_per_expert_E (E) | mean_weight_E * n (E) | dropped_slots | dropped_tokens
     | valid_slots | n | entropy * n | experts_per_token * n]        n = num_tokens
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mtl.moe import RoutingStats

__all__ = ["RoutingTotals", "sum_over_ranks"]

SumOverRanks = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``);
every rank calls it with a tensor of the same shape."""

_SCALARS = 6


def _pack(stats: RoutingStats) -> Tensor:
    """The additive ``(2E + 6,)`` float64 vector of one layer's statistics."""
    n = stats.num_tokens.double()
    scalars = torch.stack(
        [
            stats.dropped_slots.double(),
            stats.dropped_tokens.double(),
            stats.valid_slots.double(),
            n,
            stats.entropy.double() * n,
            stats.experts_per_token.double() * n,
        ]
    )
    load_E = stats.tokens_per_expert_E.double()
    return torch.cat([load_E, stats.mean_weight_E.double() * n, scalars])


def _unpack(total: Tensor) -> RoutingStats:
    """:class:`RoutingStats` of the tokens whose packed vectors summed to ``total``."""
    E = (len(total) - _SCALARS) // 2
    dropped_slots, dropped_tokens, valid_slots, n, entropy_n, experts_n = total[2 * E :]
    per_token = n.clamp_min(1.0)  # no tokens: the means are 0, not NaN
    return RoutingStats(
        tokens_per_expert_E=total[:E].float(),
        dropped_slots=dropped_slots.float(),
        dropped_tokens=dropped_tokens.float(),
        valid_slots=valid_slots.float(),
        entropy=(entropy_n / per_token).float(),
        mean_weight_E=(total[E : 2 * E] / per_token).float(),
        num_tokens=n.float(),
        experts_per_token=(experts_n / per_token).float(),
    )


def sum_over_ranks(
    stats: Mapping[int, RoutingStats], reduce_sum: SumOverRanks
) -> dict[int, RoutingStats]:
    """Per layer, the statistics of every rank's tokens together (one collective call).

    Every rank must pass the same layers with the same expert counts.

    Args:
        stats: layer index -> this rank's :class:`RoutingStats` of one batch.
        reduce_sum: sums a tensor over the ranks.

    Returns:
        layer index -> the statistics of the union of the ranks' batches.

    Example:
        >>> from mtl.moe import RoutingResult, routing_stats
        >>> r = RoutingResult(weights_TK=torch.ones(2, 1), experts_TK=torch.tensor([[0], [1]]),
        ...                   logits_TE=torch.zeros(2, 2), probs_TE=torch.full((2, 2), 0.5))
        >>> both = sum_over_ranks({0: routing_stats(r)}, lambda t: 2 * t)  # two equal ranks
        >>> both[0].tokens_per_expert_E.tolist(), float(both[0].experts_per_token)
        ([2.0, 2.0], 1.0)
    """
    layers = sorted(stats)
    if not layers:
        return {}
    packed = [_pack(stats[i]) for i in layers]
    total = reduce_sum(torch.cat(packed))  # one call, whatever the number of layers
    return {
        i: _unpack(part)
        for i, part in zip(layers, total.split([len(p) for p in packed]), strict=True)
    }


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
            packed = _pack(st)
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
                    2 * num_experts[i] + _SCALARS, dtype=torch.float64, device=device
                )
        layers = sorted(self._sum)
        if not layers:
            return
        parts = [self._sum[i] for i in layers]
        total = reduce_sum(torch.cat(parts))
        self._sum = dict(zip(layers, total.split([len(p) for p in parts]), strict=True))

    def stats(self) -> dict[int, RoutingStats]:
        """Layer index -> the statistics of all the tokens added (and reduced), layers in order."""
        return {i: _unpack(self._sum[i]) for i in sorted(self._sum)}
