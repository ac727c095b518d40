"""In-memory encoded tabular data: :class:`TabularTensors`, :func:`encode` and :class:`RecBatch`.

Rec datasets used here fit in memory as a few dense tensors;
:class:`~mtl.data.tensor_loader.TensorBatchLoader` cuts them into batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from mtl.data.features import FittedFeatures, NumericFeature
from mtl.data.numeric_range import check_standardised
from mtl.data.vocabulary import category_text

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
