"""Categorical vocabularies: how a category is written, counted and kept, the rules both data paths share.

The in-memory fit (:func:`mtl.data.features.fit_features`) and the streaming fit of
``mtl prepare`` (:func:`mtl.data.shards.encoding.fit_lazy`) count categories with
:func:`category_counts` (the same polars query, eager or lazy), write them with
:func:`category_text`, and turn the counts into a vocabulary with
:func:`vocabulary_from_counts`, so both give the same ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TypeVar

import polars as pl
import polars.selectors as cs

from mtl.data.data_warnings import DataWarning

__all__ = [
    "as_text_counts",
    "category_counts",
    "category_text",
    "check_vocab_options",
    "value_counts",
    "vocabulary_from_counts",
    "warn_id_like_columns",
]

# A categorical column with at least this many distinct train values per train row
# (and at least _ID_LIKE_MIN_ROWS rows) is a row id, not a feature an embedding learns.
_ID_LIKE_SHARE = 0.9
_ID_LIKE_MIN_ROWS = 1000


def vocabulary_from_counts(
    counts: pl.DataFrame, name: str, *, min_count: int = 1, max_vocab: int | None = None
) -> pl.Series:
    """The vocabulary of one column from its category counts: the rule both data paths share.

    Categories seen fewer than ``min_count`` times are dropped; of the rest, at most
    ``max_vocab`` are kept, the most frequent first (ties: the smaller string). The
    result is sorted, so a category's index does not depend on row order.

    Args:
        counts: one row per distinct non-null category, columns ``value`` (the
            category as text) and ``n`` (its count in the train split).
        name: the column's name, given to the returned series.
        min_count: the least count a kept category has.
        max_vocab: the most categories kept, or None for no cap.

    Example:
        >>> counts = pl.DataFrame({"value": ["a", "b", "c", "d"], "n": [5, 1, 3, 3]})
        >>> vocabulary_from_counts(counts, "c", min_count=2, max_vocab=2).to_list()
        ['a', 'c']
    """
    known = counts.filter(pl.col("n") >= min_count)
    if max_vocab is not None and known.height > max_vocab:
        known = known.sort(["n", "value"], descending=[True, False]).head(max_vocab)
    return known.get_column("value").sort().rename(name)


FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


def category_text(name: str) -> pl.Expr:
    """Column ``name`` as the text a category is known by, whatever the column's dtype.

    A whole float is written as an integer (``12.0`` as ``"12"``), so an id column
    stored as floats in one file (Parquet from pandas with missing values) matches the
    same ids stored as integers or text in another. Other values are polars' text of them.

    Example:
        >>> pl.DataFrame({"c": [12.0, 0.5, None]}).select(category_text("c"))["c"].to_list()
        ['12', '0.5', None]
    """
    # The selector names the column only when it is a float column: the rule needs no
    # schema at the call site, so every path that builds this expression agrees.
    floats = (cs.by_name(name) & cs.float()).as_expr()
    whole = (floats == floats.round()) & (floats.abs() < 2**53)
    as_int = pl.when(whole).then(floats.cast(pl.Int64).cast(pl.String))
    return pl.coalesce(as_int, pl.col(name).cast(pl.String)).alias(name)


def category_counts(frame: FrameT, name: str) -> FrameT:
    """Counts of the non-null categories of column ``name`` as text: the ``value``/``n``
    frame of :func:`vocabulary_from_counts`. Lazy in, lazy out.

    The values are counted as they are stored (:func:`value_counts`), then written as
    text (:func:`as_text_counts`); the streaming fit of ``mtl prepare`` sums the first
    step over batches and applies the second once, so both paths give the same counts.

    Example:
        >>> category_counts(pl.DataFrame({"c": [1.0, 1.0, None]}), "c").rows()
        [('1', 2)]
    """
    return as_text_counts(value_counts(frame, name))


def value_counts(frame: FrameT, name: str) -> FrameT:
    """Counts ``n`` (Int64) of the non-null values of column ``name``, in its own dtype as ``value``.

    Example:
        >>> value_counts(pl.DataFrame({"c": [3, 3, None]}), "c").rows()
        [(3, 2)]
    """
    # Fixed names: a column may be called "n" or "count".
    return (
        frame.select(pl.col(name).alias("value"))
        .drop_nulls()
        .group_by("value")
        .agg(pl.len().cast(pl.Int64).alias("n"))
    )


def as_text_counts(counts: FrameT) -> FrameT:
    """:func:`value_counts` with each value written as :func:`category_text`, counts of values
    that read the same (``0.0`` and ``-0.0``) summed.

    Example:
        >>> as_text_counts(pl.DataFrame({"value": [0.0, -0.0, 2.5], "n": [1, 2, 4]})).sort("value").rows()
        [('0', 3), ('2.5', 4)]
    """
    return counts.select(category_text("value"), "n").group_by("value").agg(pl.col("n").sum())


def warn_id_like_columns(
    vocab_sizes: Mapping[str, int], n_rows: int, *, min_count: int, max_vocab: int | None
) -> list[str]:
    """Warn when a categorical column has about one distinct train value per train row.

    Such a column (a row or request id) gets an embedding row per value that each
    train row alone updates, and it holds ids val and test never show: many
    parameters that learn nothing. No warning once ``min_count`` or ``max_vocab`` cuts it.

    Args:
        vocab_sizes: per categorical column, its count of distinct train values.
        n_rows: train rows.
        min_count: the fit's ``min_count`` (above 1: the user chose a cut, no warning).
        max_vocab: the fit's ``max_vocab`` (set: no warning).

    Returns:
        The names of the columns warned about.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     warn_id_like_columns({"rid": 5000, "item": 40}, 5000, min_count=1, max_vocab=None)
        ['rid']
    """
    if min_count > 1 or max_vocab is not None or n_rows < _ID_LIKE_MIN_ROWS:
        return []
    columns = [n for n, size in vocab_sizes.items() if size >= _ID_LIKE_SHARE * n_rows]
    if columns:
        sizes = ", ".join(f"{n!r} {vocab_sizes[n]:,}" for n in columns)
        warnings.warn(
            f"categorical column(s) with about one distinct value per train row ({sizes} "
            f"distinct values in {n_rows:,} rows): each gets an embedding row per value that "
            "learns little; cap the vocabulary with data.max_vocab=<n> or "
            "data.min_count=<n>, or drop the column",
            DataWarning,
            stacklevel=2,
        )
    return columns


def check_vocab_options(min_count: int, max_vocab: int | None) -> None:
    """``min_count >= 1`` and ``max_vocab`` None or ``>= 1``, else ValueError."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_vocab is not None and max_vocab < 1:
        raise ValueError(f"max_vocab must be >= 1 or null, got {max_vocab}")
