"""Token-block loaders split over simulated data-parallel ranks (rank/world_size arguments).

Validation: every rank serves the same number of batches (under expert parallelism
each forward is a collective), and the ranks together see every block exactly once,
so the validation loss and routing totals equal the single-process pass.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mtl.data.text import PackedBlockLoader as ReexportedPackedBlockLoader
from mtl.data.text_loaders import PackedBlockLoader, TokenBatch
from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import SwiGLUExperts, TopKGate
from mtl.training.lm_module import LMModule
from mtl.training.routing_totals import RoutingTotals


def rank_loaders(n_tokens: int, block: int, batch: int, world: int) -> list[PackedBlockLoader]:
    tokens = torch.arange(n_tokens)
    return [
        PackedBlockLoader(
            tokens=tokens, block_size=block, batch_size=batch, rank=r, world_size=world
        )
        for r in range(world)
    ]


@pytest.mark.parametrize(
    ("n_tokens", "block", "batch", "world"),
    [
        (101, 10, 3, 2),  # 10 blocks: shares 5, 5
        (111, 10, 3, 2),  # 11 blocks: shares 6, 5
        (91, 10, 3, 2),  # 9 blocks: shares 5, 4 -> the larger share's last batch is B + 1
        (131, 10, 1, 3),  # 13 blocks, B = 1: shares 5, 4, 4
        (171, 10, 4, 4),  # 17 blocks: shares 5, 4, 4, 4
        (41, 10, 8, 4),  # one block each
    ],
)
def test_packed_ranks_have_equal_counts_and_cover_every_block_once(
    n_tokens: int, block: int, batch: int, world: int
) -> None:
    loaders = rank_loaders(n_tokens, block, batch, world)
    per_rank = [list(loader) for loader in loaders]
    counts = [len(batches) for batches in per_rank]
    assert counts == [len(loader) for loader in loaders]
    assert len(set(counts)) == 1, counts
    n_blocks = (n_tokens - 1) // block
    assert counts[0] == math.ceil((n_blocks // world) / batch)
    sizes = [len(b.inputs) for batches in per_rank for b in batches]
    assert min(sizes) >= 1 and max(sizes) <= batch + 1
    # every block exactly once over the ranks, as the single process reads them
    starts = sorted(int(s) for batches in per_rank for b in batches for s in b.inputs[:, 0])
    assert starts == list(range(0, n_blocks * block, block))
    for batches in per_rank:
        for b in batches:
            assert torch.equal(b.targets, b.inputs + 1)


def test_packed_single_process_batches_are_full_but_the_last() -> None:
    (loader,) = rank_loaders(91, 10, 4, 1)
    assert [len(b.inputs) for b in loader] == [4, 4, 1]
    assert ReexportedPackedBlockLoader is PackedBlockLoader


def test_packed_refuses_more_ranks_than_blocks() -> None:
    with pytest.raises(ValueError, match=r"3 blocks of block_size=10 .* fewer than the 4"):
        rank_loaders(31, 10, 2, 4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        PackedBlockLoader(tokens=torch.arange(50), block_size=4, batch_size=2, rank=2, world_size=2)


def _validate(module: LMModule, batches: list[TokenBatch], totals: RoutingTotals) -> None:
    for i, b in enumerate(batches):
        module.validation_step((b.inputs, b.targets), i)
        totals.update(module.net(b.inputs, b.targets).layer_stats)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_validation_metrics_equal_single_process(world: int) -> None:
    """The metric states summed over the ranks (what the sync does) give the one-process pass."""
    torch.manual_seed(0)
    vocab, block = 13, 6
    tokens = torch.randint(0, vocab, (6 * 23 + 1,))  # 23 blocks: uneven shares
    net = TransformerLM(
        vocab_size=vocab,
        d_model=8,
        n_layers=1,
        n_heads=2,
        d_ff=16,
        max_seq_len=block,
        moe=MoEFFN(
            num_experts=4, gate=partial(TopKGate, k=2), experts=partial(SwiGLUExperts, d_hidden=8)
        ),
    ).eval()
    kw = {"tokens": tokens, "block_size": block, "batch_size": 4}

    single, single_totals = LMModule(net=net), RoutingTotals()
    with torch.no_grad():
        _validate(single, list(PackedBlockLoader(**kw)), single_totals)
        ranks, rank_totals = [LMModule(net=net) for _ in range(world)], RoutingTotals()
        loaders = [PackedBlockLoader(**kw, rank=r, world_size=world) for r in range(world)]
        assert len({len(loader) for loader in loaders}) == 1
        for module, loader in zip(ranks, loaders, strict=True):
            _validate(module, list(loader), rank_totals)
        # naive reference: every block in one forward
        n = (len(tokens) - 1) // block
        ref = net(tokens[: n * block].view(n, block), tokens[1 : n * block + 1].view(n, block))

    value = sum(m.val_loss.mean_value for m in ranks) / sum(m.val_loss.weight for m in ranks)
    torch.testing.assert_close(value, single.val_loss.compute(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(value, ref.loss, rtol=1e-5, atol=1e-6)
    (got,), (want,) = rank_totals.stats().values(), single_totals.stats().values()
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    assert float(got.num_tokens) == float(want.num_tokens) == n * block
    torch.testing.assert_close(got.entropy, want.entropy)


# ------------------------------------------------------------ whole groups (batch multiple)


@pytest.mark.parametrize(
    ("n_blocks", "batch", "world", "multiple"),
    [
        (23, 8, 1, 4),  # 23 blocks: 20 kept, batches 8, 8, 4
        (24, 8, 1, 4),  # nothing to drop
        (23, 4, 2, 2),  # unit 4: 20 kept, shares of 10
        (37, 6, 3, 3),  # unit 9: 36 kept, shares of 12
        (9, 8, 2, 4),  # one group per rank, the last block dropped
    ],
)
def test_packed_multiple_gives_whole_groups_and_drops_only_the_tail(
    n_blocks: int, batch: int, world: int, multiple: int
) -> None:
    block = 5
    tokens = torch.arange(n_blocks * block + 3)  # a partial block at the end, never read
    loaders = [
        PackedBlockLoader(
            tokens=tokens,
            block_size=block,
            batch_size=batch,
            rank=r,
            world_size=world,
            multiple=multiple,
        )
        for r in range(world)
    ]
    per_rank = [list(loader) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1
    assert [len(batches) for batches in per_rank] == [len(loader) for loader in loaders]
    sizes = [len(b.inputs) for batches in per_rank for b in batches]
    assert all(0 < s <= batch and s % multiple == 0 for s in sizes), sizes
    # the same blocks as without the multiple, less the tail of fewer than world * multiple
    kept = n_blocks - n_blocks % (world * multiple)
    starts = sorted(int(s) for batches in per_rank for b in batches for s in b.inputs[:, 0])
    assert starts == list(range(0, kept * block, block))
    plain = [
        int(s)
        for r in range(world)
        for b in PackedBlockLoader(
            tokens=tokens, block_size=block, batch_size=batch, rank=r, world_size=world
        )
        for s in b.inputs[:, 0]
    ]
    assert set(starts) <= set(plain) and len(set(plain) - set(starts)) == n_blocks - kept
    for batches in per_rank:
        for b in batches:
            assert torch.equal(b.targets, b.inputs + 1)


def test_packed_multiple_refuses_an_off_batch_and_too_few_blocks() -> None:
    with pytest.raises(ValueError, match=r"batch_size=6 must be a multiple of multiple=4"):
        PackedBlockLoader(tokens=torch.arange(100), block_size=4, batch_size=6, multiple=4)
    with pytest.raises(ValueError, match=r"7 blocks of block_size=4 .* fewer than the 8"):
        PackedBlockLoader(
            tokens=torch.arange(30), block_size=4, batch_size=4, world_size=2, multiple=4
        )
