"""Loaders of fixed-length token blocks for next-token prediction.

Both are plain iterables with ``__len__`` that Lightning uses directly, and
both split the data over ``world_size`` processes themselves (no sampler):

* :class:`RandomBlockLoader` (training): random offsets (a seeded permutation of
  the windows, so none repeats within an epoch), ``steps`` batches per epoch, new
  offsets each epoch; each rank reads its own part of every global batch.
* :class:`PackedBlockLoader` (validation): the split cut into non-overlapping
  blocks in order, so every val token is a target exactly once per pass over
  all ranks, with the same number of batches on every rank.

Each batch is a :class:`TokenBatch` ``(inputs, targets)`` of ``torch.long``
tensors, both ``(B, T)``, with ``targets[:, t] == inputs[:, t + 1]`` and the
last target being the token after the block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

__all__ = [
    "PackedBlockLoader",
    "RandomBlockLoader",
    "TokenBatch",
    "check_block_size",
    "epoch_order",
]


class TokenBatch(NamedTuple):
    """A batch for next-token prediction.

    Attributes:
        inputs: ``(B, T)`` long token ids.
        targets: ``(B, T)`` long, ``targets[:, t] == inputs[:, t + 1]``; the last
            target is the token after the block.

    Example:
        >>> loader = PackedBlockLoader(tokens=torch.arange(10), block_size=4, batch_size=1)
        >>> inputs, targets = next(iter(loader))  # a TokenBatch unpacks like a tuple
        >>> inputs.tolist(), targets.tolist()
        ([[0, 1, 2, 3]], [[1, 2, 3, 4]])
    """

    inputs: torch.Tensor
    targets: torch.Tensor


def check_block_size(tokens: torch.Tensor, block_size: int, split: str) -> None:
    """Raise ``ValueError`` unless ``tokens`` (``split`` names it: "val split") holds one block.

    A block needs ``block_size`` inputs plus one more token for the last target.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"block_size={block_size} is too large for the {split}: a block needs "
            f"{block_size + 1} tokens but the split has only {len(tokens)} tokens; "
            "lower block_size or val_fraction, or use more text"
        )


def epoch_order(n: int, need: int, generator: torch.Generator) -> torch.Tensor:
    """``need`` indices of ``0..n-1``: shuffled passes over all ``n``, without replacement
    within a pass (an epoch reads every window once before any twice).

    Example:
        >>> order = epoch_order(3, 5, torch.Generator().manual_seed(0))
        >>> sorted(order[:3].tolist()), len(order)
        ([0, 1, 2], 5)
    """
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-need // n))])[:need]


class RandomBlockLoader:
    """Training batches at random offsets, ``steps`` batches per epoch.

    Epoch ``e`` shuffles the ``N - T`` window offsets with a generator seeded with
    ``(seed, e)`` and serves the first ``steps * world_size * B`` of them: global
    batch ``s`` is entries ``[s*W*B, (s+1)*W*B)`` and rank ``r`` reads its ``r``-th
    block of ``B``. So every rank draws the same permutation and reads a disjoint
    part of it, the ranks' batches ``s`` together are the single-process batch ``s``
    of size ``W*B`` (and the single-process batches ``s*W .. s*W+W-1`` of size
    ``B``), and no window is read twice in an epoch while ``steps * W * B <= N - T``
    (past that, further permutations follow). The same seed gives the same batches,
    each epoch sees new windows. The epoch counter advances on every ``iter()`` and
    can be set (:meth:`set_epoch`) on resume.

    Args:
        tokens: 1-D long tensor ``(N,)`` with ``N >= block_size + 1``.
        block_size: ``T``, the context length.
        batch_size: ``B``, this rank's batch size.
        steps: Batches per epoch (``len(loader)``).
        seed: Base seed.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: ``W``, the number of processes reading one global batch.

    Example:
        >>> loader = RandomBlockLoader(tokens=torch.arange(100), block_size=4, batch_size=2, steps=3)
        >>> len(loader), [tuple(b.inputs.shape) for b in loader]
        (3, [(2, 4), (2, 4), (2, 4)])
    """

    def __init__(
        self,
        *,
        tokens: torch.Tensor,
        block_size: int,
        batch_size: int,
        steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_block_size(tokens, block_size, "train split")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        # unfold is a view (N - T, T + 1): row i is tokens[i : i + T + 1], no copy.
        self._windows = tokens.long().unfold(0, block_size + 1, 1)
        self.block_size, self.batch_size, self.steps = block_size, batch_size, steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the batches of ``epoch``."""
        self.epoch = epoch

    def offsets(self, epoch: int) -> torch.Tensor:
        """This rank's ``(steps, B)`` start offsets of ``epoch``; batch ``s`` row ``b`` starts at ``[s, b]``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # the same on every rank
        n, W, B = len(self._windows), self.world_size, self.batch_size
        need = self.steps * W * B
        return epoch_order(n, need, g).view(self.steps, W, B)[:, self.rank]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[TokenBatch]:
        offsets = self.offsets(self.epoch)
        self.epoch += 1
        for row in offsets:
            window = self._windows[row]  # (B, T + 1), a fresh contiguous copy
            yield TokenBatch(window[:, :-1].contiguous(), window[:, 1:].contiguous())


class PackedBlockLoader:
    """Deterministic batches of non-overlapping consecutive blocks (validation).

    Block ``i`` has inputs ``tokens[i*T : (i+1)*T]`` and targets one token later,
    so a pass predicts each of the first ``n_blocks * T`` targets exactly once;
    the last ``< T`` tokens that do not fill a block are dropped.

    With ``world_size`` ``W > 1`` rank ``r`` takes every ``W``-th block from
    ``r``: shares of ``q = n_blocks // W`` or ``q + 1`` blocks. Every rank serves
    the same number of batches, ``ceil(q / B)`` (a collective per forward, as
    under expert parallelism, needs that): batches of ``B`` blocks, and a last
    batch that holds the rest of the share, which on a rank with ``q + 1``
    blocks can be ``B + 1``. No block is dropped or repeated, so the ranks
    together predict every target exactly once, as one process does, and the
    token-weighted mean loss and summed routing statistics of a pass are the
    single-process ones. ``W = 1`` gives ``ceil(n_blocks / B)`` batches of ``B``
    and a last one that may be smaller.

    With ``multiple`` ``m > 1`` every batch holds a multiple of ``m`` blocks (whole
    groups of a Mixture-of-Tokens model): the last ``n_blocks % (W * m)`` blocks,
    too few to give every rank another group, are dropped, so every share is
    ``n_blocks // (W * m) * m`` blocks and every batch, the last included, a
    multiple of ``m`` of at most ``B``. The other blocks are still read exactly once.

    Args:
        tokens: 1-D long tensor ``(N,)`` with ``N >= block_size + 1``.
        block_size: ``T``.
        batch_size: ``B``, a multiple of ``multiple``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: ``W``; the split needs at least ``W`` blocks (``W * m`` with ``multiple``).
        multiple: ``m``, every batch holds a multiple of this many blocks.

    Example:
        >>> loader = PackedBlockLoader(tokens=torch.arange(10), block_size=3, batch_size=2)
        >>> [b.inputs.tolist() for b in loader]
        [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]]]
        >>> ranks = [PackedBlockLoader(tokens=torch.arange(16), block_size=3, batch_size=2,
        ...                            rank=r, world_size=2) for r in range(2)]
        >>> [[b.inputs[:, 0].tolist() for b in loader] for loader in ranks]
        [[[0, 6, 12]], [[3, 9]]]
        >>> pairs = PackedBlockLoader(tokens=torch.arange(16), block_size=3, batch_size=4, multiple=2)
        >>> [b.inputs[:, 0].tolist() for b in pairs]  # 5 blocks: the fifth makes no pair
        [[0, 3, 6, 9]]
    """

    def __init__(
        self,
        *,
        tokens: torch.Tensor,
        block_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        multiple: int = 1,
    ) -> None:
        check_block_size(tokens, block_size, "val split")
        if batch_size < 1 or multiple < 1 or batch_size % multiple:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of multiple={multiple} (both >= 1)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        n_blocks = (len(tokens) - 1) // block_size
        if n_blocks < world_size:
            raise ValueError(
                f"the val split has {n_blocks} blocks of block_size={block_size} tokens, fewer "
                f"than the {world_size} processes that each need one; lower block_size or "
                "raise val_fraction"
            )
        if multiple > 1:  # equal shares of whole groups; a smaller group computes another function
            unit = world_size * multiple
            if n_blocks < unit:
                raise ValueError(
                    f"the val split has {n_blocks} blocks of block_size={block_size} tokens, "
                    f"fewer than the {unit} that {world_size} process(es) need for a group of "
                    f"{multiple} blocks each; lower block_size or raise val_fraction"
                )
            n_blocks = n_blocks // unit * unit
        used = n_blocks * block_size
        tokens = tokens.long()
        self.inputs = tokens[:used].view(n_blocks, block_size)[rank::world_size]
        self.targets = tokens[1 : used + 1].view(n_blocks, block_size)[rank::world_size]
        self.batch_size = batch_size
        # the smallest share sets the count; a larger share's extra block joins its last batch
        self.num_batches = math.ceil((n_blocks // world_size) / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[TokenBatch]:
        for i in range(self.num_batches):
            start = i * self.batch_size
            stop = start + self.batch_size if i < self.num_batches - 1 else len(self.inputs)
            yield TokenBatch(self.inputs[start:stop], self.targets[start:stop])
