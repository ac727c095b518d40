"""Several texts, one domain each: token blocks tagged with their domain id (condition routing).

:class:`DomainTextDataModule` reads ``N`` texts (``None`` is the embedded
corpus), fits one tokenizer on all of them, splits each into train/val, and
serves :class:`DomainTokenBatch` es ``(inputs, targets, domains)``: training row
``b`` of every batch comes from domain ``b % N`` at a random offset (every
batch holds all domains in equal shares), validation blocks are each domain's
packed blocks in turn. An LM built with ``moe.route_on=domain`` routes on
``domains`` (:mod:`mtl.models.lm.domain_routing`); ``LMModule`` passes the third
field of a batch on as ``domain_B``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mtl.data.text import (
    PackedBlockLoader,
    TextDataModule,
    load_text,
    split_tokens,
)
from mtl.data.text_corpus import default_corpus
from mtl.data.tokenizers import Tokenizer, build_tokenizer


class DomainTokenBatch(NamedTuple):
    """``inputs``, ``targets`` ``(B, T)`` long and ``domains`` ``(B,)`` long."""

    inputs: torch.Tensor
    targets: torch.Tensor
    domains: torch.Tensor


class DomainBlockLoader:
    """Training batches whose row ``b`` is a random block of domain ``b % N``.

    Args:
        tokens: one 1-D long tensor per domain, each longer than ``block_size``.
        block_size: ``T``.
        batch_size: ``B`` (a multiple of ``N`` gives every domain the same share).
        steps: batches per epoch.
        seed: base seed; epoch ``e`` draws from ``(seed, rank, e)``.
        rank: process rank, mixed into the seed.

    Example:
        >>> loader = DomainBlockLoader(tokens=[torch.arange(20), torch.arange(100, 120)],
        ...                            block_size=4, batch_size=4, steps=2)
        >>> batch = next(iter(loader))
        >>> batch.domains.tolist(), bool((batch.inputs[1] >= 100).all())
        ([0, 1, 0, 1], True)
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
    ) -> None:
        if not tokens:
            raise ValueError("DomainBlockLoader needs at least one domain")
        self._windows = [t.long().unfold(0, block_size + 1, 1) for t in tokens]
        self.block_size, self.batch_size, self.steps = block_size, batch_size, steps
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.domains_B = torch.arange(batch_size) % len(tokens)

    def set_epoch(self, epoch: int) -> None:
        """Restart at ``epoch`` (resuming a run)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[DomainTokenBatch]:
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch
        )
        self.epoch += 1
        for _ in range(self.steps):
            rows = [
                self._windows[d][torch.randint(len(self._windows[d]), (1,), generator=g)][0]
                for d in self.domains_B.tolist()
            ]
            w_BT1 = torch.stack(rows)
            yield DomainTokenBatch(w_BT1[:, :-1], w_BT1[:, 1:], self.domains_B.clone())


class DomainPackedLoader:
    """Each domain's validation blocks in turn, tagged with the domain id.

    Example:
        >>> loader = DomainPackedLoader(tokens=[torch.arange(7), torch.arange(9)],
        ...                             block_size=3, batch_size=2)
        >>> [b.domains.tolist() for b in loader]
        [[0, 0], [1, 1]]
    """

    def __init__(
        self,
        *,
        tokens: Sequence[torch.Tensor],
        block_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._loaders = [
            PackedBlockLoader(
                tokens=t,
                block_size=block_size,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
            )
            for t in tokens
        ]

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
            (tokenizer, block_size, batch_size, val_fraction, steps_per_epoch, seed);
            the tokenizer is fitted on all the texts.

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
        rank, _ = self._rank()
        loader = DomainBlockLoader(
            tokens=[train for train, _ in self._domain_splits],
            block_size=self.block_size,
            batch_size=self.batch_size,
            steps=self.steps_per_epoch,
            seed=self.seed,
            rank=rank,
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
        )
