"""Several texts, one domain each: token blocks tagged with their domain id (condition routing).

:class:`DomainTextDataModule` reads ``N`` texts (``None`` is the embedded
corpus), fits one tokenizer on all of them, splits each into train/val, and
serves :class:`DomainTokenBatch` es ``(inputs, targets, domains)``: training row
``j`` of every global batch comes from domain ``j % N`` at a random offset (every
batch holds all domains in equal shares; under DDP each rank reads its own
slice of the global batch), validation blocks are each domain's packed blocks
in turn. With ``batch_multiple`` (a Mixture-of-Tokens model's ``group_size``)
every batch holds whole groups: training batches are ``batch_size`` rows, a
multiple, and each domain's validation blocks that cannot fill one more group
on every process are dropped, as :class:`~mtl.data.text.TextDataModule` does
for its one text. An LM built with ``moe.route_on=domain`` routes on
``domains`` (:mod:`mtl.models.lm.domain_routing`); ``LMModule`` passes the third
field of a batch on as ``domain_B``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mtl.data.text import TextDataModule, load_text, split_tokens
from mtl.data.text_corpus import default_corpus
from mtl.data.text_loaders import PackedBlockLoader, check_block_size, epoch_order
from mtl.data.tokenizers import Tokenizer, build_tokenizer


class DomainTokenBatch(NamedTuple):
    """A batch for next-token prediction whose rows are tagged with their domain.

    Attributes:
        inputs: ``(B, T)`` long token ids.
        targets: ``(B, T)`` long, ``inputs`` shifted by one token.
        domains: ``(B,)`` long, the domain id of each row (what ``moe.route_on=domain``
            routes on).

    Example:
        >>> batch = DomainTokenBatch(inputs=torch.tensor([[1, 2], [7, 8]]),
        ...                          targets=torch.tensor([[2, 3], [8, 9]]),
        ...                          domains=torch.tensor([0, 1]))
        >>> inputs, targets, domains = batch  # unpacks like a tuple
        >>> tuple(inputs.shape), domains.tolist()
        ((2, 2), [0, 1])
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    domains: torch.Tensor


class DomainBlockLoader:
    """Training batches whose global row ``j`` is a random block of domain ``j % N``.

    Data-parallel like :class:`~mtl.data.text_loaders.RandomBlockLoader`: every
    rank draws the same global batches of ``W * B`` rows and reads its own slice,
    rows ``[r*B, (r+1)*B)``, so the ranks read disjoint blocks and their batches
    ``s`` together are the single-process batch ``s`` of ``W * B`` rows. Epoch
    ``e`` shuffles each domain's windows with one generator seeded with
    ``(seed, e)`` (the same on every rank); global batch ``s`` takes the next
    ``c_d`` windows of domain ``d``'s permutation, ``c_d`` being the number of
    its rows in a global batch, so no window repeats within an epoch while
    ``steps * c_d`` does not exceed the domain's windows (past that, further
    permutations follow).

    Args:
        tokens: one 1-D long tensor per domain, each longer than ``block_size``.
        block_size: ``T``.
        batch_size: ``B``, this rank's batch size; ``W * B`` must be a multiple of
            ``N``, so that every domain gets the same share of a global batch (``B``
            a multiple of ``N`` gives every rank the rows ``[0, 1, .., N-1, 0, ..]``).
        steps: batches per epoch.
        seed: base seed.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: ``W``, the number of processes reading one global batch.

    Shapes:
        each batch: ``inputs``, ``targets`` ``(B, T)``, ``domains`` ``(B,)``.

    Example:
        >>> loader = DomainBlockLoader(tokens=[torch.arange(20), torch.arange(100, 120)],
        ...                            block_size=4, batch_size=4, steps=2)
        >>> batch = next(iter(loader))
        >>> batch.domains.tolist(), bool((batch.inputs[1] >= 100).all())
        ([0, 1, 0, 1], True)
        >>> rank1 = DomainBlockLoader(tokens=[torch.arange(20), torch.arange(100, 120)],
        ...                           block_size=4, batch_size=3, steps=2, rank=1, world_size=2)
        >>> next(iter(rank1)).domains.tolist()  # global rows 3, 4, 5
        [1, 0, 1]
    """

    def __init__(
        self,
        *,
        tokens: Sequence[torch.Tensor],
        block_size: int,
        batch_size: int,
        steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not tokens:
            raise ValueError("DomainBlockLoader needs at least one domain")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        for d, t in enumerate(tokens):
            check_block_size(t, block_size, f"train split of domain {d}")
        if (world_size * batch_size) % len(tokens):
            # rows cycle through the domains over the global batch: any remainder favours
            # the first domains in every batch
            raise ValueError(
                f"data.batch_size={batch_size} x {world_size} process(es) is not a multiple of "
                f"the {len(tokens)} domains: every domain must get the same share of a batch"
            )
        # unfold is a view (n_d, T + 1): row i is tokens[i : i + T + 1], no copy
        self._windows = [t.long().unfold(0, block_size + 1, 1) for t in tokens]
        self.block_size, self.batch_size, self.steps = block_size, batch_size, steps
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        rows_G = torch.arange(world_size * batch_size)  # the global batch's rows
        self.domains_B = (rows_G % len(tokens))[rank * batch_size : (rank + 1) * batch_size]
        # row j is the (j // N)-th row of its domain in the global batch
        self._slot_B = (rows_G // len(tokens))[rank * batch_size : (rank + 1) * batch_size]
        self._rows_per_domain = [int((rows_G % len(tokens) == d).sum()) for d in range(len(tokens))]

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the batches of ``epoch`` (resuming a run)."""
        self.epoch = epoch

    def offsets(self, epoch: int) -> torch.Tensor:
        """This rank's ``(steps, B)`` window offsets of ``epoch``, each in its row's domain."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # the same on every rank
        per_domain = []  # domain d: (steps, c_d) offsets, global batch s takes row s
        for windows, c in zip(self._windows, self._rows_per_domain, strict=True):
            n, need = len(windows), self.steps * c
            per_domain.append(epoch_order(n, need, g).view(self.steps, c))
        pairs = zip(self.domains_B.tolist(), self._slot_B.tolist(), strict=True)
        return torch.stack([per_domain[d][:, k] for d, k in pairs], dim=1)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[DomainTokenBatch]:
        offsets_SB = self.offsets(self.epoch)
        self.epoch += 1
        domains = self.domains_B.tolist()
        for row in offsets_SB:
            w_BT1 = torch.stack(
                [self._windows[d][i] for d, i in zip(domains, row.tolist(), strict=True)]
            )
            yield DomainTokenBatch(w_BT1[:, :-1], w_BT1[:, 1:], self.domains_B.clone())


class DomainPackedLoader:
    """Each domain's validation blocks in turn, tagged with the domain id.

    One :class:`~mtl.data.text_loaders.PackedBlockLoader` per domain: every block
    read exactly once over the ranks, the same number of batches on every rank.

    Args:
        tokens: one 1-D long tensor per domain.
        block_size: ``T``.
        batch_size: ``B``, a multiple of ``multiple``.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: ``W``.
        multiple: every batch holds a multiple of this many blocks; each domain's last
            ``n_d % (W * multiple)`` blocks are dropped.

    Shapes:
        each batch: ``inputs``, ``targets`` ``(B', T)``, ``domains`` ``(B',)``, ``B' <= B``
        (``B + 1`` for a rank's larger share without ``multiple``).

    Example:
        >>> loader = DomainPackedLoader(tokens=[torch.arange(7), torch.arange(9)],
        ...                             block_size=3, batch_size=2)
        >>> [b.domains.tolist() for b in loader]
        [[0, 0], [1, 1]]
        >>> pairs = DomainPackedLoader(tokens=[torch.arange(10), torch.arange(9)],
        ...                            block_size=3, batch_size=2, multiple=2)
        >>> [len(b.domains) for b in pairs]  # each domain's third block makes no pair
        [2, 2]
    """

    def __init__(
        self,
        *,
        tokens: Sequence[torch.Tensor],
        block_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        multiple: int = 1,
    ) -> None:
        self._loaders: list[PackedBlockLoader] = []
        for d, t in enumerate(tokens):
            try:
                loader = PackedBlockLoader(
                    tokens=t,
                    block_size=block_size,
                    batch_size=batch_size,
                    rank=rank,
                    world_size=world_size,
                    multiple=multiple,
                )
            except ValueError as err:
                raise ValueError(f"domain {d}: {err}") from err
            self._loaders.append(loader)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self._loaders)

    def __iter__(self) -> Iterator[DomainTokenBatch]:
        for d, loader in enumerate(self._loaders):
            for batch in loader:
                domains_B = torch.full((batch.inputs.shape[0],), d, dtype=torch.long)
                yield DomainTokenBatch(batch.inputs, batch.targets, domains_B)


class DomainTextDataModule(TextDataModule):
    """:class:`~mtl.data.text.TextDataModule` over several texts, one domain id each.

    Args:
        paths: the domains' UTF-8 text files, in id order; ``None`` is the
            embedded corpus.
        kwargs: the other arguments of :class:`~mtl.data.text.TextDataModule`
            (tokenizer, block_size, batch_size, val_batch_size, batch_multiple,
            val_fraction, steps_per_epoch, seed); the tokenizer is fitted on all the
            texts, and ``batch_multiple`` drops each domain's validation blocks that
            cannot fill a group on every process.

    Example:
        >>> dm = DomainTextDataModule(paths=[None, None], block_size=16, batch_size=4)
        >>> dm.num_domains, next(iter(dm.train_dataloader())).domains.tolist()
        (2, [0, 1, 0, 1])
    """

    def __init__(self, *, paths: Sequence[str | Path | None], **kwargs: Any) -> None:
        super().__init__(path=None, **kwargs)
        if not paths:
            raise ValueError("DomainTextDataModule needs at least one path (null: embedded corpus)")
        self.paths = [None if p is None else str(p) for p in paths]
        self._domain_splits: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_domains(self) -> int:
        return len(self.paths)

    @property
    def source(self) -> str:
        return " + ".join("<embedded corpus>" if p is None else p for p in self.paths)

    def _prepare(self) -> None:
        if self._tokenizer is not None:
            return
        texts = [default_corpus() if p is None else load_text(p) for p in self.paths]
        if isinstance(self._tokenizer_spec, Tokenizer):
            tokenizer = self._tokenizer_spec
        else:
            tokenizer = build_tokenizer(
                self._tokenizer_spec, "\n".join(texts), **self._tokenizer_kwargs
            )
        splits = [split_tokens(tokenizer.encode(t), self.val_fraction) for t in texts]
        for d, (train, val) in enumerate(splits):
            for name, part in (("train", train), ("val", val)):
                if len(part) <= self.block_size:
                    raise ValueError(
                        f"the {name} split of domain {d} ({self.source.split(' + ')[d]}) has "
                        f"{len(part)} tokens, not more than block_size={self.block_size}"
                    )
        self._domain_splits = splits
        self._tokenizer = tokenizer
        self._train = torch.cat([train for train, _ in splits])
        self._val = torch.cat([val for _, val in splits])

    def train_dataloader(self) -> DomainBlockLoader:  # type: ignore[override]
        self._prepare()
        rank, world_size = self._rank()
        loader = DomainBlockLoader(
            tokens=[train for train, _ in self._domain_splits],
            block_size=self.block_size,
            batch_size=self.batch_size,
            steps=self.steps_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        loader.set_epoch(self._restored_epoch)
        self._train_loader = loader  # type: ignore[assignment]
        return loader

    def val_dataloader(self) -> DomainPackedLoader:  # type: ignore[override]
        self._prepare()
        rank, world_size = self._rank()
        return DomainPackedLoader(
            tokens=[val for _, val in self._domain_splits],
            block_size=self.block_size,
            batch_size=self.val_batch_size,
            rank=rank,
            world_size=world_size,
            multiple=self.batch_multiple,
        )
