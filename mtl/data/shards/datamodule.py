"""``data=shards``: train on the shards ``mtl prepare`` wrote, streaming, in bounded memory.

:class:`ShardsDataModule` is a :class:`~mtl.data.datamodule.RecDataModule` whose rows
stay on disk: the feature spec comes from the prepared ``encoding.json``, the data
record (files read, rows per split, label rates, how the split was made) from
``manifest.json``, and the loaders stream the row groups
(:class:`~mtl.data.shards.stream.ShardBatchLoader`) in the :class:`~mtl.data.tabular.RecBatch`
form the rankers take from the in-memory path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtl.data.datamodule import SPLITS, RecDataModule, Split
from mtl.data.features import FittedFeatures
from mtl.data.shards.encoding import load_encoding
from mtl.data.shards.folder import ENCODING_FILE, column_names, read_manifest
from mtl.data.shards.record import warn_one_class, warn_unseen
from mtl.data.shards.stream import ShardBatchLoader, ShardColumns, ShardStream, blocks_of
from mtl.data.tabular import TabularTensors

__all__ = ["ShardsDataModule", "read_manifest"]


def _rank_world(trainer: Any) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardsDataModule(RecDataModule):
    """Prepared shards (``mtl prepare``), streamed: bounded memory at any data size.

    Args:
        path: the folder ``mtl prepare`` wrote (``out=DIR``).
        seed: the shuffle seed; epoch ``e`` of seed ``s`` is one fixed order.
        batch_size: train batch size.
        eval_batch_size: val/test batch size (default: ``batch_size``).
        drop_last: drop each reader's last incomplete train batch.
        buffer_rows: rows gathered and shuffled together (the memory bound).
        num_workers: DataLoader worker processes reading the shards (0: the training process).

    Example:
        >>> dm = ShardsDataModule(path="shards/clicks")  # doctest: +SKIP
        >>> dm.setup("fit"); dm.split_summary()["rows"]  # doctest: +SKIP
        {'train': 80012, 'val': 9990, 'test': 9998}
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        seed: int = 0,
        batch_size: int = 1024,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        buffer_rows: int = 200_000,
        num_workers: int = 0,
    ) -> None:
        if path is None:
            raise ValueError("data=shards needs data.path=<folder written by `mtl prepare`>")
        super().__init__(
            source="shards",
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )
        self.path = Path(path).expanduser()
        self.buffer_rows = int(buffer_rows)
        self.num_workers = int(num_workers)
        self._manifest: dict[str, Any] = {}

    def _prepare(self) -> None:
        if self._fitted is not None:
            return
        self._manifest = read_manifest(self.path)
        self._fitted = load_encoding(self.path / self._manifest.get("encoding", ENCODING_FILE))
        # What `mtl prepare` warned about, said again to each run as the in-memory path does.
        for split, columns in (self._manifest.get("unseen_categories") or {}).items():
            warn_unseen(f"{split} split of {self.path}", columns)
        splits = self._manifest.get("splits") or {}
        warn_one_class(
            self._manifest.get("positive_rate") or {},
            {s: int(v["rows"]) for s, v in splits.items()},
            origins={s: f"{s} split of {self.path}" for s in splits},
        )

    @property
    def manifest(self) -> dict[str, Any]:
        """The prepared folder's manifest."""
        self._prepare()
        return self._manifest

    @property
    def fitted(self) -> FittedFeatures:
        self._prepare()
        assert self._fitted is not None
        return self._fitted

    def rows(self, split: Split) -> int:
        """Rows of ``split`` in the shards."""
        return int(self.manifest["splits"][split]["rows"])

    def files(self) -> dict[str, list[str]]:
        """The table files prepared (``rows``, ``val``, ``test``), and the shard folder."""
        return {k: list(v) for k, v in self.manifest["files"].items()} | {
            "shards": [str(self.path)]
        }

    def split_how(self) -> str:
        return str(self.manifest["how"])

    def split_summary(self) -> dict[str, Any]:
        """What the run trains on, from the manifest: the :meth:`RecDataModule.split_summary` keys."""
        m = self.manifest
        summary: dict[str, Any] = {
            "how": self.split_how(),
            "rows": {s: self.rows(s) for s in SPLITS},
            "files": self.files(),
        }
        for key in ("positive_rate", "label_mean", "time_range"):
            if key in m:
                summary[key] = m[key]
        return summary

    def tensors(self, split: Split) -> TabularTensors:
        raise ValueError(
            f"data=shards streams its rows from {self.path}: the {split} split is not in memory "
            "(use data=table for in-memory tensors)"
        )

    def columns(self) -> ShardColumns:
        """The shard columns in the feature spec's order."""
        spec = self.spec
        return ShardColumns(
            cat=[column_names("cat", f.name) for f in spec.categorical],
            num=[column_names("num", f.name) for f in spec.numeric],
            labels=[column_names("label", t) for t in spec.task_names],
            user="user" if spec.user_column is not None else None,
        )

    def stream(self, split: Split, *, rank: int = 0, world: int = 1) -> ShardStream:
        """The stream of ``split`` for process ``rank`` of ``world`` (train: shuffled)."""
        m = self.manifest
        train = split == "train"
        return ShardStream(
            blocks=blocks_of(self.path, m["splits"][split]["shards"], int(m["row_group_rows"])),
            columns=self.columns(),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            buffer_rows=self.buffer_rows,
            drop_last=self.drop_last and train,
            rank=rank,
            world=world,
        )

    def train_dataloader(self) -> ShardBatchLoader:  # type: ignore[override]
        # Under DDP each process reads its own equal share of every epoch's rows.
        rank, world = _rank_world(getattr(self, "trainer", None))
        return ShardBatchLoader(
            stream=self.stream("train", rank=rank, world=world), num_workers=self.num_workers
        )

    def _eval_loader(self, split: Split) -> ShardBatchLoader:  # type: ignore[override]
        # Evaluation is not sharded: every process sees every row, so metrics are exact.
        return ShardBatchLoader(stream=self.stream(split), num_workers=self.num_workers)
