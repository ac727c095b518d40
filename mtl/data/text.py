"""Token datasets for next-token prediction: a text file (or the embedded corpus)
tokenised once into an in-memory tensor, split contiguously into train/val, and
served as fixed-length blocks by the loaders of :mod:`mtl.data.text_loaders`:

* :class:`~mtl.data.text_loaders.RandomBlockLoader` (training): random offsets,
  ``steps_per_epoch`` batches per epoch; under DDP each rank reads its own part
  of every global batch.
* :class:`~mtl.data.text_loaders.PackedBlockLoader` (validation): the split cut
  into non-overlapping blocks, every val token a target exactly once per pass
  over all ranks, the same number of batches on every rank.

Each batch is a :class:`~mtl.data.text_loaders.TokenBatch` ``(inputs, targets)``
of ``torch.long`` tensors, both ``(B, T)``, with ``targets[:, t] == inputs[:, t + 1]``
and the last target being the token after the block. The loaders and
``TokenBatch`` are re-exported here. This module also holds the reference
losses a model must beat (:func:`unigram_cross_entropy`, :func:`bigram_cross_entropy`).

Example:
    >>> dm = TextDataModule(path=None, block_size=64, batch_size=8)
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, y.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([8, 64]), torch.Size([8, 64]), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from mtl.data.text_corpus import default_corpus
from mtl.data.text_loaders import PackedBlockLoader, RandomBlockLoader, TokenBatch, check_block_size
from mtl.data.tokenizers import Tokenizer, build_tokenizer

__all__ = [
    "PackedBlockLoader",
    "RandomBlockLoader",
    "TextDataModule",
    "TokenBatch",
    "bigram_cross_entropy",
    "load_text",
    "split_tokens",
    "unigram_cross_entropy",
]

EMBEDDED_SOURCE = "<embedded corpus>"


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file; relative paths resolve against the current directory.

    Raises:
        FileNotFoundError: the file does not exist (message names the resolved path).
        ValueError: the file is empty, only whitespace, or not UTF-8.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"text file not found: {resolved} (given as {str(path)!r}; relative paths "
            f"resolve against the current directory {Path.cwd()}). For the shared data set "
            "MTL_SHARED_DATA, or pass path=None to use the embedded corpus."
        )
    try:
        text = resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {resolved} is not valid UTF-8: {err}") from err
    if not text.strip():
        raise ValueError(f"text file {resolved} is empty or only whitespace; nothing to train on")
    return text


def split_tokens(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split: the first ``1 - val_fraction`` of the tokens train, the rest validate.

    Contiguous rather than shuffled so that val blocks are text the model never
    saw as context, not neighbours of training windows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = round(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    return tokens[:n_train], tokens[n_train:]


def unigram_cross_entropy(
    train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int
) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under the add-one-smoothed unigram
    distribution of ``train_tokens``: ``-mean(log((count[x] + 1) / (N + V)))``.

    The loss a model reaches by predicting token frequencies and ignoring context;
    a language model must get clearly below it to have learned anything.
    """
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[eval_tokens.long()].mean())


def bigram_cross_entropy(
    train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int
) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens[1:]`` given the previous token, under
    add-one-smoothed bigram counts of ``train_tokens``: ``(c[a, b] + 1) / (c[a] + V)``.

    Pair counts are kept sparse (sorted unique pair ids), so large vocabularies
    do not need a ``V x V`` table.
    """
    train, ev = train_tokens.long(), eval_tokens.long()
    pair_ids, pair_counts = torch.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    prev_counts = torch.bincount(train[:-1], minlength=vocab_size)
    query = ev[:-1] * vocab_size + ev[1:]
    pos = torch.searchsorted(pair_ids, query).clamp(max=len(pair_ids) - 1)
    c_pair = torch.where(pair_ids[pos] == query, pair_counts[pos], 0).double()
    p = (c_pair + 1.0) / (prev_counts[ev[:-1]].double() + vocab_size)
    return float(-p.log().mean())


class TextDataModule(pl.LightningDataModule):
    """Lightning data module for token language modelling on one text.

    The text is read, tokenised and split lazily, on :meth:`setup` or the first
    access to :attr:`tokenizer` / :attr:`vocab_size` (build the model from
    ``dm.vocab_size``). Its :meth:`state_dict` (saved in Lightning checkpoints)
    holds the tokenizer, and :meth:`load_state_dict` refuses a checkpoint whose
    vocabulary differs.

    Args:
        path: UTF-8 text file (relative to the current directory), or ``None`` for
            the embedded generated corpus (:mod:`mtl.data.text_corpus`).
        tokenizer: ``"char"``, ``"byte"`` or ``"bpe"`` (fitted on the whole text),
            or a ready :class:`~mtl.data.tokenizers.Tokenizer` (e.g. from a checkpoint).
        tokenizer_kwargs: Options for :func:`~mtl.data.tokenizers.build_tokenizer`.
        block_size: Context length ``T``.
        batch_size: Training batch size ``B`` of each process (a DDP run of ``W`` processes
            trains on global batches of ``W * B``).
        val_batch_size: Validation batch size (default: ``batch_size``).
        batch_multiple: Every batch holds a multiple of this many blocks (a Mixture-of-Tokens
            model's ``group_size``): ``batch_size`` and ``val_batch_size`` must be multiples,
            and the last val blocks that do not fill ``batch_multiple`` blocks on each
            process are dropped (not padded), so the last val batch is full too.
        val_fraction: Fraction of tokens, at the end of the text, held out for validation.
        steps_per_epoch: Training batches per epoch.
        seed: Seed of the training offsets.

    Example:
        >>> dm = TextDataModule(path=None, block_size=32, batch_size=4, steps_per_epoch=10)
        >>> dm.vocab_size > 30, len(dm.train_dataloader())
        (True, 10)
    """

    def __init__(
        self,
        *,
        path: str | Path | None,
        tokenizer: str | Tokenizer = "char",
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        batch_multiple: int = 1,
        val_fraction: float = 0.1,
        steps_per_epoch: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1 or steps_per_epoch < 1:
            raise ValueError(
                "block_size, batch_size and steps_per_epoch must be >= 1, got "
                f"{block_size}, {batch_size}, {steps_per_epoch}"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        # A Tokenizer object is not a hyperparameter Lightning can log as YAML.
        self.save_hyperparameters(ignore=None if isinstance(tokenizer, str) else ["tokenizer"])
        self.path = None if path is None else str(path)
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        multiple = max(batch_multiple, 1)
        if batch_multiple < 1 or (self.batch_size % multiple or self.val_batch_size % multiple):
            raise ValueError(
                f"batch_size={batch_size} and val_batch_size={self.val_batch_size} must be "
                f"multiples of batch_multiple={batch_multiple} (>= 1)"
            )
        self.batch_multiple = batch_multiple
        self.val_fraction, self.steps_per_epoch, self.seed = val_fraction, steps_per_epoch, seed
        self._tokenizer_spec = tokenizer
        # Hydra passes a DictConfig; a plain dict keeps the tokenizer code OmegaConf-free.
        self._tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._tokenizer: Tokenizer | None = None
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._train_loader: RandomBlockLoader | None = None
        self._restored_epoch = 0

    @property
    def source(self) -> str:
        """The text file path, or ``"<embedded corpus>"``."""
        return EMBEDDED_SOURCE if self.path is None else self.path

    def _prepare(self) -> None:
        if self._tokenizer is not None:
            return
        text = default_corpus() if self.path is None else load_text(self.path)
        if isinstance(self._tokenizer_spec, Tokenizer):
            tokenizer = self._tokenizer_spec
        else:
            tokenizer = build_tokenizer(self._tokenizer_spec, text, **self._tokenizer_kwargs)
        train, val = split_tokens(tokenizer.encode(text), self.val_fraction)
        # Fail here, at set-up, rather than at the first batch of the first epoch.
        check_block_size(train, self.block_size, f"train split of {self.source}")
        check_block_size(val, self.block_size, f"val split of {self.source}")
        self._tokenizer, self._train, self._val = tokenizer, train, val

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    @property
    def tokenizer(self) -> Tokenizer:
        self._prepare()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokens(self, split: Literal["train", "val"]) -> torch.Tensor:
        """The 1-D long token tensor of a split."""
        self._prepare()
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._train if split == "train" else self._val  # type: ignore[return-value]

    def _rank(self) -> tuple[int, int]:
        # Under DDP: each rank reads its part of every global train batch and of the val blocks.
        t = self.trainer
        return (0, 1) if t is None else (int(t.global_rank), int(t.world_size))

    def train_dataloader(self) -> RandomBlockLoader:
        rank, world_size = self._rank()
        self._train_loader = RandomBlockLoader(
            tokens=self.tokens("train"),
            block_size=self.block_size,
            batch_size=self.batch_size,
            steps=self.steps_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        self._train_loader.set_epoch(self._restored_epoch)
        return self._train_loader

    def val_dataloader(self) -> PackedBlockLoader:
        rank, world_size = self._rank()
        return PackedBlockLoader(
            tokens=self.tokens("val"),
            block_size=self.block_size,
            batch_size=self.val_batch_size,
            rank=rank,
            world_size=world_size,
            multiple=self.batch_multiple,  # whole groups of blocks on every process
        )

    def unigram_entropy(self, split: Literal["train", "val"] = "val") -> float:
        """Cross-entropy (nats/token) of ``split`` under the add-one unigram model of train counts."""
        return unigram_cross_entropy(self.tokens("train"), self.tokens(split), self.vocab_size)

    def bigram_entropy(self, split: Literal["train", "val"] = "val") -> float:
        """Cross-entropy (nats/token) of ``split`` under the add-one bigram model of train counts."""
        return bigram_cross_entropy(self.tokens("train"), self.tokens(split), self.vocab_size)

    def state_dict(self) -> dict[str, Any]:
        epoch = self._train_loader.epoch if self._train_loader is not None else self._restored_epoch
        return {
            "tokenizer": self.tokenizer.state_dict(),
            "fingerprint": self.tokenizer.fingerprint(),
            "train_epoch": epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "tokenizer" in state_dict:
            self.tokenizer.check_compatible(state_dict["tokenizer"])
        self._restored_epoch = int(state_dict.get("train_epoch", 0))
        if self._train_loader is not None:
            self._train_loader.set_epoch(self._restored_epoch)
