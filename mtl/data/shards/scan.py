"""The rows of a ``data=table`` config as lazy polars queries: read, checked and split.

Nothing here loads a table: every function builds or runs a ``LazyFrame`` query
over the files with polars' streaming engine. The reading rules are the table
source's (:mod:`mtl.data.sources.table`): only the named columns, ids as text and
numerics as floats from CSV, files concatenated in sorted order, ``n_rows`` per
file. The checks are :func:`mtl.data.sources.base.validate_frame`'s, counted over
all rows in one pass. The split column ``__split`` (0 train, 1 val, 2 test) is

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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mtl.data.features import ColumnRoles, names_list
from mtl.data.numeric_range import FLOAT32_MAX
from mtl.data.sources.table import _columns, _format, _task_kinds, table_files
from mtl.data.validation import DataError, _describe_bad_values

__all__ = [
    "ROW",
    "SPLIT",
    "TableQuery",
    "check_rows",
    "read_failure",
    "scan_files",
    "split_column",
]

ROW = "__row"
"""Row index over the concatenated files of one part (``rows``, ``val`` or ``test``)."""
SPLIT = "__split"
"""Split code of a row: 0 train, 1 val, 2 test."""
_BINARY_TEXT = ["0", "1", "0.0", "1.0", "true", "false"]
_HASH_BITS = 53  # a float64 holds 53-bit integers exactly
_EXAMPLES = 5  # bad values quoted in a message


@dataclass
class TableQuery:
    """The column roles and reading options of a ``data=table`` config.

    Args:
        roles: which column is a label, a feature or the user.
        separator: CSV separator (None: ``,``, tab for ``.tsv``).
        null_values: CSV strings read as missing.
        fill_numeric_nulls: value for missing numeric features (None: refuse them).
        split_by: time column, or None.
        n_rows: read only the first rows of each file.

    Example:
        >>> q = TableQuery.from_config({"labels": ["y"], "categorical": ["c"], "numeric": []})
        >>> q.roles.labels, q.columns()
        ({'y': 'binary'}, ['y', 'c'])
    """

    roles: ColumnRoles
    separator: str | None = None
    null_values: list[str] | None = None
    fill_numeric_nulls: float | None = None
    split_by: str | None = None
    n_rows: int | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Mapping[str, object]) -> TableQuery:
        """From the ``data`` node of a ``data=table`` config (its keys, not ``source_kwargs``)."""
        labels = names_list(data.get("labels"), key="data.labels")
        if not labels:
            raise ValueError(
                "data.labels is empty: name the label columns, e.g. data.labels=[click]"
            )
        categorical = names_list(data.get("categorical"), key="data.categorical")
        numeric = names_list(data.get("numeric"), key="data.numeric")
        user = data.get("user")
        roles = ColumnRoles(
            categorical=categorical,
            numeric=numeric,
            labels=_task_kinds(labels, data.get("task_kinds")),  # type: ignore[arg-type]
            user_column=None if user is None else str(user),
        )
        keys = {c: "labels" for c in labels} | {c: "numeric" for c in numeric}
        keys |= {c: "categorical" for c in categorical}
        if user:
            keys.setdefault(str(user), "user")
        split_by = data.get("split_by")
        if split_by:
            keys.setdefault(str(split_by), "split_by")
        nulls = data.get("null_values")
        fill = data.get("fill_numeric_nulls")
        n_rows = data.get("n_rows")
        return cls(
            roles=roles,
            separator=None if data.get("separator") is None else str(data.get("separator")),
            null_values=None if nulls is None else [str(v) for v in nulls],  # type: ignore[attr-defined]
            fill_numeric_nulls=None if fill is None else float(fill),  # type: ignore[arg-type]
            split_by=None if not split_by else str(split_by),
            n_rows=None if n_rows is None else int(n_rows),  # type: ignore[call-overload]
            keys=keys,
        )

    def columns(self) -> list[str]:
        """Every column read: labels, features, user, time."""
        return list(self.keys)

    @property
    def text_columns(self) -> list[str]:
        user = self.roles.user_column
        return [*self.roles.categorical, *([user] if user else [])]


def _scan_one(path: Path, query: TableQuery) -> pl.LazyFrame:
    fmt = _format(path)
    if fmt is None:
        raise DataError(f"{path} is not a table file")
    sep = query.separator if query.separator is not None else ("\t" if fmt == "tsv" else ",")
    present = _columns(path, fmt, sep)
    missing = [f"{c!r} (data.{k})" for c, k in query.keys.items() if c not in present]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"the file has columns {present}"
        )
    names = query.columns()
    if fmt in ("csv", "tsv"):
        regression = [n for n, k in query.roles.labels.items() if k == "regression"]
        overrides = {c: pl.String for c in query.text_columns}
        overrides |= {c: pl.Float64 for c in [*query.roles.numeric, *regression]}
        lf = pl.scan_csv(
            path,
            separator=sep,
            null_values=query.null_values,
            schema_overrides=overrides,
        )
    elif fmt == "parquet":
        lf = pl.scan_parquet(path)
    else:
        lf = pl.scan_ndjson(path)
    lf = lf.select(names)
    return lf.head(query.n_rows) if query.n_rows else lf


def scan_files(
    spec: str | os.PathLike[str], query: TableQuery, *, key: str
) -> tuple[list[Path], pl.LazyFrame]:
    """The files ``spec`` names (``data.<key>``) and their rows as one lazy frame with ``__row``.

    Raises:
        FileNotFoundError: no file matches.
        DataError: a file lacks a named column (the message lists the file's columns).
    """
    files = table_files(spec, key=key)
    scans = [_scan_one(f, query) for f in files]
    if len(scans) > 1:
        # An id column stored as integers in one file and text in another is one id
        # space: text in all, as the in-memory concatenation makes it.
        schemas = [lf.collect_schema() for lf in scans]
        mixed = [c for c in query.text_columns if len({s[c] for s in schemas}) > 1]
        scans = [lf.with_columns(pl.col(mixed).cast(pl.String)) for lf in scans]
    lf = scans[0] if len(scans) == 1 else pl.concat(scans, how="vertical_relaxed")
    return files, lf.with_row_index(ROW)


def check_rows(lf: pl.LazyFrame, query: TableQuery, *, origin: str) -> pl.LazyFrame:
    """Refuse bad labels and numerics (one streaming pass); fill numeric nulls if asked.

    The rules of :func:`mtl.data.sources.base.validate_frame`: binary labels hold only
    0/1, regression labels and numeric features are numeric without null/NaN (numeric
    nulls filled with ``fill_numeric_nulls`` when given) and within float32's range.

    Returns:
        ``lf`` with the fills applied.

    Raises:
        DataError: naming ``origin``, the column and the count of bad values, or
            saying that ``origin`` has no data rows.
    """
    schema = lf.collect_schema()
    roles = query.roles
    checks: dict[str, pl.Expr] = {}
    for name, kind in roles.labels.items():
        col = pl.col(name)
        if kind == "binary":
            ok = col.cast(pl.String).is_in(_BINARY_TEXT) & col.is_not_null()
            checks[f"label {name!r} must be binary 0/1 but has"] = (~ok).sum()
        elif not schema[name].is_numeric():
            raise DataError(
                f"{origin}: regression label {name!r} must be numeric, got {schema[name]}"
            )
        else:
            bad = col.is_null() | (col.is_nan() if schema[name].is_float() else pl.lit(False))
            checks[f"regression label {name!r} has null/NaN:"] = bad.sum()
    for name in roles.numeric:
        dtype = schema[name]
        if not dtype.is_numeric():
            raise DataError(
                f"{origin}: numeric feature {name!r} must be a numeric column, got dtype {dtype}"
            )
        col = pl.col(name)
        checks[f"numeric {name}: nulls"] = (
            col.is_null() | (col.is_nan() if dtype.is_float() else pl.lit(False))
        ).sum()
        if dtype.is_float():
            checks[f"numeric {name}: range"] = ((col.abs() > FLOAT32_MAX) & col.is_not_nan()).sum()
    counts = lf.select(
        pl.len().alias("rows"), **{f"c{i}": e for i, e in enumerate(checks.values())}
    ).collect(engine="streaming")
    n_rows, *values = counts.row(0)
    if n_rows == 0:
        raise DataError(f"{origin}: no data rows, only the column names; nothing to prepare")
    found = dict(zip(checks, values, strict=True))
    fills = []
    for what, n in found.items():
        if not n:
            continue
        if what.startswith("numeric ") and what.endswith(": nulls"):
            name = what[len("numeric ") : -len(": nulls")]
            if query.fill_numeric_nulls is None:
                raise DataError(
                    f"{origin}: numeric feature {name!r} has {n} null/NaN values; "
                    "set data.fill_numeric_nulls=<value> to fill them"
                )
            col = pl.col(name).fill_nan(None) if schema[name].is_float() else pl.col(name)
            fills.append(col.fill_null(query.fill_numeric_nulls).alias(name))
        elif what.startswith("numeric "):
            name = what[len("numeric ") : -len(": range")]
            raise DataError(
                f"{origin}: numeric feature {name!r} has {n} infinite or out-of-range values "
                f"(|x| > {FLOAT32_MAX:.2g}, the float32 range of the model's inputs); "
                "remove, clip or rescale them"
            )
        else:
            suffix = (
                ""
                if "binary" not in what
                else "; a regression label needs data.task_kinds={<label>: regression}"
            )
            raise DataError(f"{origin}: {what} {n} bad values{suffix}")
    return lf.with_columns(fills) if fills else lf


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
        lf: the rows, with ``__row`` (:func:`scan_files`).
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


def _unparsable(path: Path, query: TableQuery) -> str | None:
    """The first numeric column of CSV file ``path`` with text that is not a number, described
    as the in-memory reader describes it (file, column, count, examples); None if none."""
    fmt = _format(path)
    if fmt not in ("csv", "tsv"):
        return None
    regression = [n for n, k in query.roles.labels.items() if k == "regression"]
    floats = [*query.roles.numeric, *regression]
    if not floats:
        return None
    sep = query.separator if query.separator is not None else ("\t" if fmt == "tsv" else ",")
    text = pl.scan_csv(path, separator=sep, null_values=query.null_values, infer_schema=False)
    text = text.select(floats)
    if query.n_rows:
        text = text.head(query.n_rows)

    def bad(name: str) -> pl.Expr:
        return pl.col(name).is_not_null() & pl.col(name).cast(pl.Float64, strict=False).is_null()

    counts = text.select(bad(c).sum() for c in floats).collect(engine="streaming").row(0)
    for name, count in zip(floats, counts, strict=True):
        if count:
            # Streamed up to a bounded number of bad values: their distinct examples.
            head = text.filter(bad(name)).select(name).head(1000).collect(engine="streaming")
            examples = head[name].unique(maintain_order=True).head(_EXAMPLES).to_list()
            return _describe_bad_values(path, name, pl.Float64(), count, examples)
    return None


def read_failure(files: Sequence[Path], query: TableQuery, exc: BaseException) -> DataError:
    """The one-line :class:`DataError` for a polars error raised while reading ``files``.

    Each file is read again on its own (one streaming pass, on this error path only)
    until one fails: a numeric CSV value that does not parse is named with its file,
    column, count and examples, another failure with its file and polars' first line.

    Example:
        >>> try:  # doctest: +SKIP
        ...     rows.collect(engine="streaming")
        ... except pl.exceptions.PolarsError as exc:
        ...     raise read_failure(files, query, exc) from exc
        DataError: d/rows.csv: column 'price' must hold numbers (Float64), but 2 value(s) do not parse, e.g. ['n/a']
    """
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for path in files:
        try:
            _scan_one(path, query).select(pl.all().null_count()).collect(engine="streaming")
        except pl.exceptions.PolarsError as one:
            try:
                message = _unparsable(path, query)
            except pl.exceptions.PolarsError:  # not even readable as text (a ragged row...)
                message = None
            if message is not None:
                return DataError(message)
            line = (str(one).strip().splitlines() or [type(one).__name__])[0]
            return DataError(f"table file {path} cannot be read: {line}")
    return DataError(f"{', '.join(map(str, files))}: {first}")
