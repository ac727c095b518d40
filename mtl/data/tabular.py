"""In-memory encoded tabular data and a permutation-based batch iterator.

Rec datasets used here fit in memory as a few dense tensors, so a batch is three
tensor gathers with one permutation per epoch; a torch ``DataLoader`` with
per-row ``__getitem__`` and collation would spend most of its time in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import polars as pl
import torch

from mtl.data.features import FittedFeatures, NumericFeature, category_text
from mtl.data.numeric_range import check_standardised

# Fixed seed for hashing string user ids: the same raw id then gets the same
# grouping key in every split of one run.
_USER_HASH_SEED = 0x5EED


@dataclass
class TabularTensors:
    """One encoded split, all tensors on the same device with ``N`` rows.

    Args:
        cat_BF: (N, n_categorical) int64 category indices, 0 = OOV.
        num_BF: (N, n_numeric) float32 standardised numeric features.
        labels_BT: (N, n_tasks) float32 labels (0/1 for binary tasks).
        user_B: (N,) int64 user grouping key, or None. Equal raw ids give equal keys;
            the values are raw integer ids or hashes of string ids, not embedding indices.

    Example:
        >>> t = TabularTensors(cat_BF=torch.zeros(4, 2, dtype=torch.long),
        ...     num_BF=torch.zeros(4, 3), labels_BT=torch.ones(4, 1))
        >>> len(t), t.select(torch.tensor([0, 2])).cat_BF.shape
        (4, torch.Size([2, 2]))
    """

    cat_BF: torch.Tensor
    num_BF: torch.Tensor
    labels_BT: torch.Tensor
    user_B: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels_BT.shape[0]
        checks = [
            ("cat_BF", self.cat_BF, torch.int64, 2),
            ("num_BF", self.num_BF, torch.float32, 2),
            ("labels_BT", self.labels_BT, torch.float32, 2),
        ]
        if self.user_B is not None:
            checks.append(("user_B", self.user_B, torch.int64, 1))
        for name, t, dtype, ndim in checks:
            if t.dtype != dtype or t.ndim != ndim or t.shape[0] != n:
                raise ValueError(
                    f"{name} must be a {ndim}-d {dtype} tensor with {n} rows, got {t.dtype} {tuple(t.shape)}"
                )

    def __len__(self) -> int:
        return int(self.labels_BT.shape[0])

    def select(self, index: torch.Tensor | slice) -> TabularTensors:
        """Rows ``index`` (a slice gives views, an index tensor copies)."""
        return TabularTensors(
            cat_BF=self.cat_BF[index],
            num_BF=self.num_BF[index],
            labels_BT=self.labels_BT[index],
            user_B=None if self.user_B is None else self.user_B[index],
        )

    def to(self, device: torch.device | str) -> TabularTensors:
        """A copy on ``device``."""
        return TabularTensors(
            cat_BF=self.cat_BF.to(device),
            num_BF=self.num_BF.to(device),
            labels_BT=self.labels_BT.to(device),
            user_B=None if self.user_B is None else self.user_B.to(device),
        )


def _to_tensor(frame: pl.DataFrame, dtype: torch.dtype, n_rows: int) -> torch.Tensor:
    if frame.width == 0:
        return torch.empty((n_rows, 0), dtype=dtype)
    # polars hands out column-major (or read-only zero-copy) arrays; torch wants
    # writable row-major memory for fast row gathers. np.require copies only if needed.
    array = np.require(frame.to_numpy(), requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(array).to(dtype)


def _check_no_nulls(df: pl.DataFrame, columns: list[str], what: str, origin: str) -> None:
    if not columns:
        return
    exprs = [
        (pl.col(c).is_null() | (pl.col(c).is_nan() if df.schema[c].is_float() else pl.lit(False)))
        .sum()
        .alias(c)
        for c in columns
    ]
    counts = df.select(exprs).row(0, named=True)
    bad = {c: n for c, n in counts.items() if n}
    if bad:
        raise ValueError(f"{origin}: {what} columns have null/NaN values (column: count) {bad}")


def category_codes(name: str, vocab: pl.Series, dtype: pl.DataType = pl.Int64) -> pl.Expr:
    """Column ``name`` as category indices: the category at ``vocab[i]`` is ``i + 1``;
    unseen categories and nulls are 0 (OOV). The same expression encodes in memory
    (:func:`encode`) and in the streaming shards of ``mtl prepare``.

    Example:
        >>> df = pl.DataFrame({"c": ["b", None, "zzz", "a"]})
        >>> df.select(category_codes("c", pl.Series(["a", "b"])))["c"].to_list()
        [2, 0, 0, 1]
        >>> pl.DataFrame({"c": [12.0, 7.0]}).select(category_codes("c", pl.Series(["12"])))["c"].to_list()
        [1, 0]
    """
    # An Enum of the vocabulary numbers its categories 0.. in order; values outside it
    # become null. Unlike a replace with a mapping, the cast streams in polars' engine.
    # The text of category_text: the vocabulary was counted from it (category_counts).
    known = category_text(name).cast(pl.Enum(vocab), strict=False)
    return (known.to_physical().cast(dtype) + 1).fill_null(0).alias(name)


def standardised(feature: NumericFeature) -> pl.Expr:
    """``(x - mean) / std`` of ``feature``'s column, computed in float64, as float32.

    Example:
        >>> df = pl.DataFrame({"x": [1.0, 3.0]})
        >>> df.select(standardised(NumericFeature("x", 2.0, 1.0)))["x"].to_list()
        [-1.0, 1.0]
    """
    # float32 at the end: numpy then hands torch float32 without a second copy.
    column = pl.col(feature.name).cast(pl.Float64)
    return ((column - feature.mean) / feature.std).cast(pl.Float32).alias(feature.name)


def user_key(name: str, dtype: pl.DataType) -> pl.Expr:
    """The int64 grouping key of user column ``name`` (of ``dtype``); nulls are -1.

    Integer ids are kept (UInt64 reinterpreted bit for bit, so ids above the int64
    range stay distinct); other ids are hashed as text with a fixed seed, so equal
    raw ids give equal keys in every split.

    Example:
        >>> pl.DataFrame({"u": [7, None]}).select(user_key("u", pl.Int64))["u"].to_list()
        [7, -1]
    """
    column = pl.col(name)
    if dtype == pl.UInt64:
        key = column.reinterpret(signed=True)
    elif dtype.is_integer() and dtype not in (pl.Int128, pl.UInt128):
        key = column.cast(pl.Int64)
    else:
        key = column.cast(pl.String).hash(seed=_USER_HASH_SEED).reinterpret(signed=True)
    return key.fill_null(-1).alias(name)


def encode(df: pl.DataFrame, fitted: FittedFeatures, *, origin: str = "frame") -> TabularTensors:
    """Encode a raw frame with the train-fitted vocabularies and statistics.

    Categories unseen in train (and nulls) become 0; numeric columns become
    ``(x - train_mean) / train_std``. Vectorised polars expressions only.

    Args:
        df: raw split with every column named in ``fitted.spec``.
        fitted: result of :func:`mtl.data.features.fit_features` on the train split.
        origin: name used in error messages (e.g. ``"val split of census_income"``).

    Returns:
        :class:`TabularTensors` with ``len(df)`` rows.

    Example:
        >>> from mtl.data.features import fit_features
        >>> train = pl.DataFrame({"c": ["a", "b"], "y": [0, 1]})
        >>> f = fit_features(train, categorical=["c"], numeric=[], labels={"y": "binary"})
        >>> encode(pl.DataFrame({"c": ["b", "zzz"], "y": [1, 0]}), f).cat_BF.tolist()
        [[2], [0]]
    """
    spec = fitted.spec
    needed = [f.name for f in spec.categorical] + [f.name for f in spec.numeric] + spec.task_names
    if spec.user_column is not None:
        needed.append(spec.user_column)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{origin}: missing columns {missing} required by the feature spec")
    _check_no_nulls(df, [f.name for f in spec.numeric], "numeric feature", origin)
    _check_no_nulls(df, spec.task_names, "label", origin)
    for task in spec.tasks:
        if task.kind == "binary":
            bad = df.filter(~pl.col(task.name).cast(pl.Float64).is_in([0.0, 1.0])).get_column(
                task.name
            )
            if len(bad):
                raise ValueError(
                    f"{origin}: binary label {task.name!r} must be 0/1; found {len(bad)} other values, "
                    f"e.g. {bad.unique().head(5).to_list()}"
                )

    n = df.height
    cat_exprs = [category_codes(f.name, fitted.vocabularies[f.name]) for f in spec.categorical]
    num = df.select([standardised(f) for f in spec.numeric])
    check_standardised(num, spec.numeric, origin)
    label_exprs = [pl.col(t).cast(pl.Float32) for t in spec.task_names]

    user_B = None
    if spec.user_column is not None:
        column, dtype = spec.user_column, df.schema[spec.user_column]
        user = df.select(user_key(column, dtype)).to_series()
        user_B = torch.from_numpy(user.to_numpy().copy())

    return TabularTensors(
        cat_BF=_to_tensor(df.select(cat_exprs), torch.int64, n),
        num_BF=_to_tensor(num, torch.float32, n),
        labels_BT=_to_tensor(df.select(label_exprs), torch.float32, n),
        user_B=user_B,
    )


@dataclass
class RecBatch:
    """One mini-batch for the rec models.

    Args:
        cat: (B, n_categorical) int64 category indices (0 = OOV).
        num: (B, n_numeric) float32 standardised numeric features.
        labels: (B, n_tasks) float32, column order = ``FeatureSpec.tasks``.
        user: (B,) int64 user grouping key, or None.

    Example:
        >>> b = RecBatch(cat=torch.zeros(2, 1, dtype=torch.long), num=torch.zeros(2, 0),
        ...     labels=torch.zeros(2, 1))
        >>> b.batch_size
        2
    """

    cat: torch.Tensor
    num: torch.Tensor
    labels: torch.Tensor
    user: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RecBatch:
        """Move to ``device``; Lightning calls this when transferring batches."""
        return RecBatch(
            cat=self.cat.to(device, non_blocking=non_blocking),
            num=self.num.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            user=None if self.user is None else self.user.to(device, non_blocking=non_blocking),
        )


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
