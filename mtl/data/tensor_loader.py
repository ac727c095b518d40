"""Batches of in-memory tabular tensors: a permutation per epoch, no ``DataLoader``.

A batch is three tensor gathers with one permutation per epoch; a torch
``DataLoader`` with per-row ``__getitem__`` and collation would spend most of its
time in Python. :class:`EpochSetter` lets Lightning set the epoch of such loaders.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from mtl.data.tabular import RecBatch, TabularTensors

__all__ = ["EpochSetter", "TensorBatchLoader"]


class _SetsEpoch(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


class EpochSetter:
    """Forwards Lightning's ``dataloader.sampler.set_epoch(epoch)`` to a loader that is
    not a torch ``DataLoader`` (this module's and the shard stream's).

    Lightning looks for ``set_epoch`` on the loader's ``sampler``; a loader of this
    kind sets ``self.sampler = EpochSetter(self)`` so the call reaches its own
    ``set_epoch``.

    Args:
        loader: the loader whose ``set_epoch`` receives the epoch.

    Example:
        >>> t = TabularTensors(cat_BF=torch.zeros(4, 1, dtype=torch.long),
        ...     num_BF=torch.zeros(4, 0), labels_BT=torch.zeros(4, 1))
        >>> loader = TensorBatchLoader(tensors=t, batch_size=2)
        >>> EpochSetter(loader).set_epoch(3)
        >>> loader.epoch
        3
    """

    def __init__(self, loader: _SetsEpoch) -> None:
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)


class TensorBatchLoader:
    """Iterate over :class:`TabularTensors` in mini-batches of :class:`RecBatch`.

    With ``shuffle`` the order of epoch ``e`` is ``torch.randperm`` seeded with
    ``seed + e``, so a run resumed at epoch ``e`` sees the same order as the
    uninterrupted run. The epoch advances by one per ``iter()`` unless set with
    :meth:`set_epoch` (Lightning does, via ``loader.sampler.set_epoch``).
    ``state_dict``/``load_state_dict`` record the epoch and the batches already
    served, so a mid-epoch checkpoint resumes with the remaining batches.

    Args:
        tensors: the encoded split.
        batch_size: rows per batch.
        shuffle: draw a fresh permutation each epoch (else file order).
        seed: base seed of the permutations.
        drop_last: drop the last incomplete batch.
        num_shards: split each epoch's rows into this many equal shards (DDP ranks);
            the remainder rows are dropped so every rank has the same batch count.
        shard_index: which shard this loader serves.

    Example:
        >>> t = TabularTensors(cat_BF=torch.zeros(10, 1, dtype=torch.long),
        ...     num_BF=torch.zeros(10, 0), labels_BT=torch.zeros(10, 1))
        >>> loader = TensorBatchLoader(tensors=t, batch_size=4, shuffle=True, seed=0)
        >>> len(loader), [b.batch_size for b in loader]
        (3, [4, 4, 2])
    """

    def __init__(
        self,
        *,
        tensors: TabularTensors,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.sampler = EpochSetter(self)
        self.batch_sampler = None  # Lightning reads it whenever a loader has a ``sampler``
        self._epoch = 0
        self._skip_batches = 0  # set by load_state_dict for a mid-epoch resume
        self._current_epoch = 0
        self._served = 0

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will produce."""
        return self._epoch

    @property
    def num_rows(self) -> int:
        """Rows this loader serves per epoch (before ``drop_last``)."""
        n = len(self.tensors)
        return n if self.num_shards == 1 else n // self.num_shards

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._skip_batches = 0
        self._epoch = epoch

    def __len__(self) -> int:
        n = self.num_rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor | None:
        """Row indices visited in ``epoch`` (None = all rows in file order)."""
        n = len(self.tensors)
        if not self.shuffle and self.num_shards == 1:
            return None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(n, generator=generator)
        else:
            perm = torch.arange(n)
        per_shard = self.num_rows
        # Strided shards give each rank a random sample of the permutation.
        return perm[self.shard_index :: self.num_shards][:per_shard].to(
            self.tensors.labels_BT.device
        )

    def __iter__(self) -> Iterator[RecBatch]:
        epoch, skip = self._epoch, self._skip_batches
        self._epoch, self._skip_batches = epoch + 1, 0
        self._current_epoch, self._served = epoch, skip
        index = self.order(epoch)
        n_batches = len(self)
        for b in range(skip, n_batches):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.num_rows)
            rows = self.tensors.select(slice(start, stop) if index is None else index[start:stop])
            self._served = b + 1
            yield RecBatch(
                cat=rows.cat_BF, num=rows.num_BF, labels=rows.labels_BT, user=rows.user_B
            )

    def state_dict(self) -> dict[str, Any]:
        """Epoch in progress and batches already served from it."""
        return {"epoch": self._current_epoch, "batches_served": self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``iter()`` continues the saved epoch after the served batches."""
        epoch, served = int(state["epoch"]), int(state["batches_served"])
        if served >= len(self):  # the saved epoch was complete: start the next one
            self._epoch, self._skip_batches = epoch + 1, 0
        else:
            self._epoch, self._skip_batches = epoch, served
