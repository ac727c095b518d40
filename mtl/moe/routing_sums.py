"""Routing statistics of many batches or ranks together, from sums of one vector per layer.

A :class:`~mtl.moe.RoutingStats` describes one batch. Its fields are either counts
(``tokens_per_expert_E``, ``dropped_slots``, ``dropped_tokens``, ``valid_slots``,
``num_tokens``) or means over the batch's tokens (``entropy``, ``experts_per_token``,
``mean_weight_E``). Counts add up, and a mean times ``num_tokens`` adds up, so the
statistics of a union of batches (of a validation pass, or of every rank's part of
one global batch) follow from the sum of their packed vectors: exactly what one batch
holding all those tokens gives, however the tokens were split. A batch without tokens
(an empty rank) has NaN means (of nothing); it packs to zeros in those entries and so
adds nothing, and a union without tokens has means 0.

Layout of the packed vector (``2E + 6`` float64 values)::

    [tokens_per_expert_E (E) | mean_weight_E * n (E) | dropped_slots | dropped_tokens
     | valid_slots | n | entropy * n | experts_per_token * n]        n = num_tokens
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mtl.moe.routing import RoutingStats

SumOverRanks = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``);
every rank calls it with a tensor of the same shape."""

PACKED_SCALARS = 6
"""Entries of a packed vector after its two ``(E,)`` blocks."""


def packed_size(num_experts: int) -> int:
    """Length of the packed vector of a layer of ``num_experts`` experts."""
    return 2 * num_experts + PACKED_SCALARS


def pack_routing_stats(stats: RoutingStats) -> Tensor:
    """The additive ``(2E + 6,)`` float64 vector of one batch's statistics (module docstring).

    Example:
        >>> from mtl.moe import TopKGate, routing_stats
        >>> empty = routing_stats(TopKGate(d_model=4, num_experts=2, k=1)(torch.randn(0, 4)))
        >>> pack_routing_stats(empty).tolist()  # NaN means of no tokens pack to 0
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    n = stats.num_tokens.double()

    def times_n(mean: Tensor) -> Tensor:
        # a batch without tokens has NaN means: it contributes nothing
        return torch.where(n > 0, mean.double() * n, torch.zeros_like(mean, dtype=torch.float64))

    scalars = torch.stack(
        [
            stats.dropped_slots.double(),
            stats.dropped_tokens.double(),
            stats.valid_slots.double(),
            n,
            times_n(stats.entropy),
            times_n(stats.experts_per_token),
        ]
    )
    return torch.cat([stats.tokens_per_expert_E.double(), times_n(stats.mean_weight_E), scalars])


def unpack_routing_stats(total: Tensor) -> RoutingStats:
    """:class:`RoutingStats` (float32) of the tokens whose packed vectors summed to ``total``."""
    E = (len(total) - PACKED_SCALARS) // 2
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

    Every rank must pass the same layers with the same expert counts; a rank
    without tokens takes part with its (empty) statistics.

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
    packed = [pack_routing_stats(stats[i]) for i in layers]
    total = reduce_sum(torch.cat(packed))  # one call, whatever the number of layers
    return {
        i: unpack_routing_stats(part)
        for i, part in zip(layers, total.split([len(p) for p in packed]), strict=True)
    }
