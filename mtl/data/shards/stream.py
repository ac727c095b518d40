"""Reading prepared shards as a stream of :class:`~mtl.data.tabular.RecBatch` mini-batches.

The unit of reading is a block: one row group of one shard file (``mtl prepare``
writes row groups of ``row_group_rows`` rows). An epoch's plan, a pure function of
``(seed, epoch)``, orders the blocks (shuffled with ``shuffle``) and lays their rows
end to end; process ``rank`` of ``world`` takes the ``rank``-th of ``world`` equal
contiguous ranges of that sequence (``N // world`` rows each, the few remainder rows
left out so that every process takes the same number of batches, as DDP needs), and
DataLoader worker ``w`` of ``k`` the ``w``-th of ``k`` near-equal contiguous ranges
of its process's range. Each process thus reads its own blocks (a block that straddles
two ranges is read in part by each), and together they read every row once.

A worker reads its blocks one at a time into a buffer; once the buffer holds
``buffer_rows`` rows it is permuted (with ``shuffle``) and served as batches, the
rows short of a full batch staying for the next fill. Memory is bounded by the
buffer and one block, whatever the data's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtl.data.tabular import RecBatch
from mtl.data.tensor_loader import EpochSetter

__all__ = ["Block", "ShardBatchLoader", "ShardColumns", "ShardStream", "blocks_of", "plan_ranges"]


@dataclass(frozen=True)
class Block:
    """Rows ``[start, start + rows)`` of the shard file ``path`` (one row group)."""

    path: str
    start: int
    rows: int


@dataclass(frozen=True)
class ShardColumns:
    """The shard columns of the categorical ids, numerics, labels and user key, in spec order.

    Example:
        >>> ShardColumns(cat=["cat.item"], num=[], labels=["label.click"]).all()
        ['cat.item', 'label.click']
    """

    cat: list[str]
    num: list[str]
    labels: list[str]
    user: str | None = None

    def all(self) -> list[str]:
        return [*self.cat, *self.num, *self.labels, *([self.user] if self.user else [])]


def plan_ranges(
    blocks: Sequence[Block],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int = 0,
    world: int = 1,
    worker: int = 0,
    workers: int = 1,
) -> list[tuple[Block, int, int]]:
    """The pieces ``(block, lo, hi)`` (rows ``lo:hi`` of the block) one worker of one process reads.

    Example:
        >>> blocks = [Block("a", 0, 4), Block("a", 4, 4), Block("b", 0, 2)]
        >>> [(b.path, b.start, lo, hi) for b, lo, hi in plan_ranges(blocks, seed=0, epoch=0,
        ...     shuffle=False, rank=1, world=2)]
        [('a', 4, 1, 4), ('b', 0, 0, 2)]
    """
    if not 0 <= rank < world or not 0 <= worker < workers:
        raise ValueError(f"rank {rank} of {world} / worker {worker} of {workers} is out of range")
    order = list(range(len(blocks)))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks)).tolist()
    lo, hi = _worker_span(sum(b.rows for b in blocks), world, rank, workers, worker)
    pieces: list[tuple[Block, int, int]] = []
    offset = 0
    for i in order:
        block = blocks[i]
        a, b = max(lo, offset), min(hi, offset + block.rows)
        if a < b:
            pieces.append((block, a - offset, b - offset))
        offset += block.rows
    return pieces


def _worker_span(total: int, world: int, rank: int, workers: int, worker: int) -> tuple[int, int]:
    """Rows ``lo:hi`` of ``total`` that one worker of one process reads: every process an
    equal ``total // world`` (equal DDP steps), split near-equally between its workers."""
    per_rank = total // world
    lo_rank = rank * per_rank
    return lo_rank + (per_rank * worker) // workers, lo_rank + (per_rank * (worker + 1)) // workers


@dataclass
class ShardStream(IterableDataset):
    """The batches of one epoch of prepared shards, for one process (``rank`` of ``world``).

    Under a ``DataLoader`` with workers each worker serves its own share; with
    ``batch_size=None`` the loader passes the :class:`RecBatch` es through.

    Args:
        blocks: the row groups of the split.
        columns: which shard columns to serve.
        batch_size: rows per batch.
        shuffle: shuffle the block order and within the buffer.
        seed: base seed; the epoch's plan and buffers are functions of ``(seed, epoch)``.
        epoch: the epoch served.
        buffer_rows: rows gathered before a shuffle (memory bound).
        drop_last: drop each worker's last incomplete batch.
        rank: this process.
        world: processes.

    Example:
        >>> s = ShardStream(blocks=[], columns=ShardColumns([], [], []), batch_size=4)
        >>> list(s)
        []
    """

    blocks: list[Block]
    columns: ShardColumns
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    buffer_rows: int = 200_000
    drop_last: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def num_batches(self, workers: int = 1) -> int:
        """Batches per epoch served by this process with ``workers`` DataLoader workers."""
        total = sum(b.rows for b in self.blocks)
        k = max(1, workers)
        per = [hi - lo for lo, hi in (_worker_span(total, self.world, 0, k, w) for w in range(k))]
        if self.drop_last:
            return sum(n // self.batch_size for n in per)
        return sum(math.ceil(n / self.batch_size) for n in per)

    def _read(self, block: Block, lo: int, hi: int) -> dict[str, np.ndarray]:
        frame = pl.scan_parquet(block.path).slice(block.start + lo, hi - lo).collect()
        c = self.columns
        return {
            "cat": frame.select(c.cat).to_numpy().astype(np.int64, order="C")
            if c.cat
            else np.empty((frame.height, 0), np.int64),
            "num": np.ascontiguousarray(frame.select(c.num).to_numpy(), dtype=np.float32)
            if c.num
            else np.empty((frame.height, 0), np.float32),
            "labels": np.ascontiguousarray(frame.select(c.labels).to_numpy(), dtype=np.float32),
            **({"user": frame.get_column(c.user).to_numpy()} if c.user else {}),
        }

    def _batches(self, buf: dict[str, np.ndarray], n_full: int) -> Iterator[RecBatch]:
        for i in range(n_full):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield RecBatch(
                cat=torch.from_numpy(buf["cat"][sl]),
                num=torch.from_numpy(buf["num"][sl]),
                labels=torch.from_numpy(buf["labels"][sl]),
                user=torch.from_numpy(buf["user"][sl]) if "user" in buf else None,
            )

    def __iter__(self) -> Iterator[RecBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pieces = plan_ranges(
            self.blocks,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            rank=self.rank,
            world=self.world,
            worker=worker,
            workers=workers,
        )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        parts: list[dict[str, np.ndarray]] = []
        held = 0
        for block, lo, hi in pieces:
            parts.append(self._read(block, lo, hi))
            held += hi - lo
            if held >= max(self.buffer_rows, self.batch_size):
                buf = self._mix(parts, rng)
                n_full = held // self.batch_size
                yield from self._batches(buf, n_full)
                rest = n_full * self.batch_size
                parts = [{k: v[rest:] for k, v in buf.items()}]
                held -= rest
        if held:
            buf = self._mix(parts, rng)
            n = held // self.batch_size if self.drop_last else math.ceil(held / self.batch_size)
            yield from self._batches(buf, n)

    def _mix(
        self, parts: list[dict[str, np.ndarray]], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        buf = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.shuffle:
            perm = rng.permutation(len(buf["labels"]))
            buf = {k: v[perm] for k, v in buf.items()}
        return buf


class ShardBatchLoader:
    """Epochs of a :class:`ShardStream`, read in this process or by DataLoader workers.

    Like :class:`~mtl.data.tensor_loader.TensorBatchLoader`: the epoch advances per
    ``iter()`` unless set (Lightning sets it through ``loader.sampler.set_epoch``), and
    ``state_dict``/``load_state_dict`` record the epoch and the batches served, so a
    resumed run continues where the saved one stopped (mid-epoch, by skipping the
    served batches of the same deterministic stream).

    Args:
        stream: the split's stream (its ``epoch`` is set per ``iter()``).
        num_workers: DataLoader worker processes (0: read in this process).

    Example:
        >>> loader = ShardBatchLoader(stream=ShardStream(blocks=[], columns=ShardColumns([], [], []),
        ...     batch_size=2))
        >>> len(loader), list(loader)
        (0, [])
    """

    def __init__(self, *, stream: ShardStream, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.sampler = EpochSetter(self)
        self.batch_sampler = None
        self._epoch = stream.epoch
        self._skip = 0
        self._current_epoch = stream.epoch
        self._served = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._skip = 0
        self._epoch = epoch

    def __len__(self) -> int:
        return self.stream.num_batches(max(1, self.num_workers))

    def _source(self) -> Any:
        self.stream.epoch = self._epoch
        if self.num_workers == 0:
            return self.stream
        # "spawn": polars' thread pool does not survive fork.
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            multiprocessing_context="spawn",
        )

    def __iter__(self) -> Iterator[RecBatch]:
        epoch, skip = self._epoch, self._skip
        source = self._source()
        self._epoch, self._skip = epoch + 1, 0
        self._current_epoch, self._served = epoch, 0
        for i, batch in enumerate(source):
            self._served = i + 1
            if i < skip:
                continue
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch in progress and batches already served from it."""
        return {"epoch": self._current_epoch, "batches_served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``iter()`` continues the saved epoch after the served batches."""
        epoch, served = int(state["epoch"]), int(state["batches_served"])
        if served >= len(self):
            self._epoch, self._skip = epoch + 1, 0
        else:
            self._epoch, self._skip = epoch, served


def blocks_of(root: Path, shards: Sequence[dict[str, Any]], row_group_rows: int) -> list[Block]:
    """The row-group blocks of a split's shards as the manifest lists them."""
    blocks = []
    for shard in shards:
        path, rows = str(root / shard["path"]), int(shard["rows"])
        blocks += [
            Block(path, start, min(row_group_rows, rows - start))
            for start in range(0, rows, row_group_rows)
        ]
    return blocks
