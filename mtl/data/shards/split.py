"""The split of the rows ``mtl prepare`` reads: a lazy ``__split`` column, and its description.

The split column ``__split`` (0 train, 1 val, 2 test) is

* files: rows from ``data.val`` / ``data.test`` files are that split;
* by time (``split_by``): the rows in stable time order cut at the same positions
  as :func:`mtl.data.sources.table.time_split`, found with order statistics of the
  time column and, for ties at a cut, the row index (identical to the in-memory split);
* at random: a hash of the row index with the split seed, uniform in [0, 1), against
  the cumulative fractions (deterministic; about, not exactly, the fractions; not the
  in-memory path's permutation, which needs every row at once). The hash is polars',
  fixed within one polars version; training reads the shards, so a run does not rehash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from mtl.data.data_record import fractions_text
from mtl.data.shards.folder import SPLITS
from mtl.data.validation import DataError

__all__ = ["ROW", "SPLIT", "describe_split", "split_column", "split_seed"]

ROW = "__row"
"""Row index over the concatenated files of one part (``rows``, ``val`` or ``test``)."""
SPLIT = "__split"
"""Split code of a row: 0 train, 1 val, 2 test."""
_HASH_BITS = 53  # a float64 holds 53-bit integers exactly


def _time_key(lf: pl.LazyFrame, column: str, origin: str) -> pl.Expr:
    dtype = lf.collect_schema()[column]
    col = pl.col(column)
    if dtype == pl.String:
        return col.str.to_datetime(strict=False)
    if not (dtype.is_numeric() or dtype.is_temporal()):
        raise DataError(
            f"{origin}: time column {column!r} (data.split_by) must hold numbers, dates or "
            f"datetimes, got dtype {dtype}"
        )
    return col


def _bounds(n: int, fractions: Sequence[float]) -> list[int]:
    # The cut positions of time_split and split_indices: rounded cumulative fractions.
    bounds = np.round(np.cumsum(np.asarray(fractions, dtype=np.float64)) * n).astype(int)
    bounds[-1] = n
    return [int(b) for b in bounds[:-1]]


def _time_parts(lf: pl.LazyFrame, column: str, fractions: Sequence[float], origin: str) -> pl.Expr:
    """The part index (0..len(fractions)-1) of each row in the stable time order."""
    key = _time_key(lf, column, origin)
    stats = lf.select(
        n=pl.len(),
        nulls=key.is_null().sum() - pl.col(column).is_null().sum(),
        empty=pl.col(column).is_null().sum(),
    ).collect(engine="streaming")
    n, unparsed, empty = stats.row(0)
    if unparsed:
        raise DataError(
            f"{origin}: time column {column!r} (data.split_by) must hold numbers, dates or "
            f"datetimes, but {unparsed} value(s) do not parse"
        )
    if empty:
        raise DataError(
            f"{origin}: time column {column!r} (data.split_by) has {empty} empty values; "
            "every row needs a time to be split by time"
        )
    bounds = [b for b in _bounds(n, fractions)]
    inner = [b for b in bounds if 0 < b < n]
    # The time at each cut position (an order statistic), then for ties at that time
    # the row index from which rows belong to the later part (stable: file order).
    values = (
        lf.select(key.sort().gather(inner).alias("t")).collect(engine="streaming")["t"].to_list()
        if inner
        else []
    )
    part = pl.lit(0, dtype=pl.Int32)
    at = dict(zip(inner, values, strict=True))
    for b in bounds:
        if b <= 0:
            part = part + 1
            continue
        if b >= n:
            continue
        t = at[b]
        before = lf.select((key < t).sum()).collect(engine="streaming").item()
        ties = lf.filter(key == t).select(ROW).collect(engine="streaming")[ROW].sort().to_numpy()
        cut = int(ties[b - before])
        later = (key > t) | ((key == t) & (pl.col(ROW) >= cut))
        part = part + later.cast(pl.Int32)
    return part


def _hash_parts(fractions: Sequence[float], seed: int) -> pl.Expr:
    u = (pl.col(ROW).cast(pl.UInt64).hash(seed=seed) % (1 << _HASH_BITS)).cast(pl.Float64) / float(
        1 << _HASH_BITS
    )
    edges = np.cumsum(np.asarray(fractions, dtype=np.float64))[:-1]
    part = pl.lit(0, dtype=pl.Int32)
    for edge in edges:
        part = part + (u >= float(edge)).cast(pl.Int32)
    return part


def split_column(
    lf: pl.LazyFrame,
    *,
    carved: Sequence[str],
    fractions: Mapping[str, float],
    split_by: str | None,
    seed: int,
    origin: str,
) -> pl.Expr:
    """The ``__split`` code of each row of the ``rows`` files.

    Args:
        lf: the rows, with ``__row`` (:func:`mtl.data.shards.scan.scan_files`).
        carved: the splits cut from these rows besides train (``["val", "test"]``,
            one of them, or none when both come from files).
        fractions: the (train, val, test) fractions by name; those of ``train`` and
            ``carved`` are renormalised to sum to one.
        split_by: time column, or None for the hashed random split.
        seed: the hash's seed (the split seed).
        origin: the files, for error messages.

    Returns:
        An Int32 expression: 0 train, 1 val, 2 test.

    Example:
        >>> lf = pl.LazyFrame({"ts": [5, 1, 4, 2, 3]}).with_row_index(ROW)
        >>> e = split_column(lf, carved=["val", "test"], fractions={"train": .6, "val": .2,
        ...     "test": .2}, split_by="ts", seed=0, origin="x")
        >>> lf.select(e.alias("s")).collect()["s"].to_list()
        [2, 0, 1, 0, 0]
    """
    codes = {"train": 0, "val": 1, "test": 2}
    parts = ["train", *carved]
    if len(parts) == 1:
        return pl.lit(0, dtype=pl.Int32)
    total = sum(fractions[p] for p in parts)
    fracs = [fractions[p] / total for p in parts]
    index = _time_parts(lf, split_by, fracs, origin) if split_by else _hash_parts(fracs, seed)
    code = pl.lit(0, dtype=pl.Int32)
    for i, name in enumerate(parts[1:], start=1):
        code = pl.when(index == i).then(pl.lit(codes[name], dtype=pl.Int32)).otherwise(code)
    return code


def split_seed(data: Mapping[str, Any]) -> int:
    """The hash seed of a ``data=table`` config: ``split_seed``, else ``seed`` (default 0).

    Example:
        >>> split_seed({"seed": 3}), split_seed({"seed": 3, "split_seed": 7})
        (3, 7)
    """
    seed = data.get("split_seed")
    return int(data.get("seed", 0) if seed is None else seed)


def describe_split(data: Mapping[str, Any], carved: Sequence[str], head: str) -> str:
    """How the splits of ``data`` (a ``data=table`` config) are made, after ``head`` (the data).

    Args:
        data: the config's ``data`` node (``split``, ``split_by``, the seeds).
        carved: the splits cut from the ``rows`` files (the others come from files).
        head: what the rows are, e.g. ``"table logs/*.csv"``.

    Example:
        >>> describe_split({"split_by": "ts"}, ["val", "test"], "table t.csv")
        "table t.csv by time on 'ts': the earliest 0.8 of the rows train, the next 0.1 val, the latest 0.1 test"
    """
    fracs = dict(zip(SPLITS, (float(f) for f in data.get("split", (0.8, 0.1, 0.1))), strict=True))
    given = [s for s in ("val", "test") if s not in carved]
    column = data.get("split_by")
    if not carved:
        return f"{head}; val and test from data.val and data.test"
    if column:
        parts = ", ".join(
            f"the {'latest' if s == carved[-1] else 'next'} {fracs[s]:g} {s}" for s in carved
        )
        how = f"{head} by time on {column!r}: the earliest {fracs['train']:g} of the rows train, {parts}"
    elif len(carved) == 2:
        how = (
            f"{head} split {fractions_text(tuple(fracs.values()))} at random by a hash of the "
            f"row index (split_seed {split_seed(data)})"
        )
    else:
        share = fracs[carved[0]] / (fracs["train"] + fracs[carved[0]])
        how = (
            f"{head}; {carved[0]}: a random {share:.3g} of the train rows by a hash of the row "
            f"index (split_seed {split_seed(data)})"
        )
    return how + "".join(f"; {s} from data.{s}" for s in given)
