"""Routing statistics of several batches summed: equal to one batch of all their tokens."""

from __future__ import annotations

import pytest
import torch

from mtl.moe import TopKGate, routing_stats
from mtl.moe.routing_sums import pack_routing_stats, sum_over_ranks, unpack_routing_stats
from mtl.training.routing_totals import RoutingTotals

FIELDS = (
    "tokens_per_expert_E",
    "dropped_slots",
    "dropped_tokens",
    "valid_slots",
    "entropy",
    "mean_weight_E",
    "num_tokens",
    "experts_per_token",
)


def assert_same_stats(got, want) -> None:
    for field in FIELDS:
        torch.testing.assert_close(
            getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6, msg=field
        )


@pytest.mark.parametrize("sizes", [[0, 6], [3, 0, 4], [5]])
def test_sum_over_ranks_with_an_empty_rank_equals_one_batch(sizes: list[int]) -> None:
    torch.manual_seed(0)
    gate = TopKGate(d_model=4, num_experts=4, k=2)
    x = torch.randn(sum(sizes), 4)
    with torch.no_grad():
        want = routing_stats(gate(x))
        parts = [routing_stats(gate(p)) for p in x.split(sizes)]
    assert any(torch.isnan(p.entropy) for p in parts) == (0 in sizes)  # NaN means of no tokens
    packed = [pack_routing_stats(p) for p in parts]
    # each "rank" passes its own stats; reduce_sum adds the other ranks' packed vectors
    for r, part in enumerate(parts):
        others = sum((p for i, p in enumerate(packed) if i != r), torch.zeros_like(packed[r]))
        got = sum_over_ranks({0: part}, lambda t, o=others: t + o)[0]
        assert_same_stats(got, want)
    totals = RoutingTotals()
    for part in parts:
        totals.update({0: part})
    assert_same_stats(totals.stats()[0], want)


def test_no_tokens_anywhere_gives_zero_means() -> None:
    gate = TopKGate(d_model=4, num_experts=3, k=1)
    with torch.no_grad():
        empty = routing_stats(gate(torch.randn(0, 4)))
    got = unpack_routing_stats(pack_routing_stats(empty) * 2)
    assert float(got.entropy) == 0.0 and float(got.num_tokens) == 0.0
    assert got.mean_weight_E.tolist() == [0.0, 0.0, 0.0]
