"""Any table as a data source: CSV, TSV, Parquet or NDJSON files named by config, no code.

The columns' roles come from the call (labels, categorical and numeric features, an
optional user column), so a ranking engineer trains on their own file with::

    mtl train data=table data.path=logs.parquet data.labels=[click] \\
        data.categorical=[user_id,item_id] data.numeric=[price]

``path`` is a file, a folder (every table file in it) or a glob (``logs/*.csv``).
Only the named columns are read. The rows are split by the data module at random,
come from separate ``train``/``val``/``test`` files, or are split by time on a
timestamp column (``split_by``): training on the earliest rows and evaluating on the
latest is how a ranker meets its future traffic.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import SourceData, read_table, validate_frame
from mtl.data.sources.table_files import TABLE_SUFFIXES, _format, split_files, table_files
from mtl.data.spec import TASK_KINDS, TaskKind
from mtl.data.validation import (
    DataError,
    check_row_limit,
    check_unique,
    read_error,
    refuse_duplicate_names,
    separator_hint,
)
from mtl.data.vocabulary import category_text

# The file-finding names stay importable from here (the shard scan and the table data
# module read them through this module).
__all__ = ["TABLE_SUFFIXES", "split_files", "table", "table_files", "time_split"]

_WHAT = "table file"
_EXAMPLES = 5


def _columns(path: Path, fmt: str, separator: str, used: Iterable[str] | None = None) -> list[str]:
    """The column names of table file ``path``; a CSV header naming a ``used`` column twice
    is refused (polars would silently read the first)."""
    try:
        if fmt == "parquet":
            return pl.scan_parquet(path).collect_schema().names()
        if fmt == "ndjson":
            return pl.scan_ndjson(path).collect_schema().names()
        columns = pl.read_csv(path, separator=separator, n_rows=1, infer_schema=False).columns
    except (pl.exceptions.PolarsError, OSError, EOFError) as exc:
        raise read_error(path, _WHAT, exc, {"separator": separator}) from exc
    refuse_duplicate_names(path, columns, separator, used=used)
    return columns


def _read_file(
    path: Path,
    needed: Mapping[str, str],
    *,
    separator: str | None,
    null_values: Sequence[str] | None,
    text_columns: Sequence[str],
    float_columns: Sequence[str],
    n_rows: int | None,
) -> pl.DataFrame:
    """Read the ``needed`` columns (name -> config key) of one file, refusing missing ones."""
    fmt = _format(path)
    assert fmt is not None
    sep = separator if separator is not None else ("\t" if fmt == "tsv" else ",")
    columns = _columns(path, fmt, sep, used=needed)
    missing = [f"{name!r} (data.{key})" for name, key in needed.items() if name not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"the file has columns {columns}{separator_hint(columns)}"
        )
    names = list(needed)
    if fmt in ("csv", "tsv"):
        # Ids read as text: inference from the first rows would guess integers for a
        # column whose later rows hold "a12"; numerics as floats for the same reason.
        overrides = {c: pl.String for c in text_columns} | {c: pl.Float64 for c in float_columns}
        return read_table(
            path,
            _WHAT,
            separator=sep,
            columns=names,
            null_values=None if null_values is None else list(null_values),
            schema_overrides=overrides,
            n_rows=n_rows,
        )
    try:
        scan = pl.scan_parquet(path) if fmt == "parquet" else pl.scan_ndjson(path)
        df = scan.select(names).head(n_rows).collect() if n_rows else scan.select(names).collect()
    except (pl.exceptions.PolarsError, OSError, EOFError) as exc:
        raise read_error(path, _WHAT, exc) from exc
    if df.height == 0:
        raise DataError(f"{_WHAT} has no data rows: {path}")
    return df


def _concat(
    frames: list[pl.DataFrame], files: list[Path], text_columns: Sequence[str]
) -> pl.DataFrame:
    if len(frames) == 1:
        return frames[0]
    # An id column stored as integers in one file and text in another is one id space.
    mixed = [c for c in text_columns if len({f.schema[c] for f in frames}) > 1]
    if mixed:
        frames = [f.with_columns(category_text(c) for c in mixed) for f in frames]
    try:
        return pl.concat(frames, how="vertical_relaxed")
    except pl.exceptions.PolarsError as exc:
        kinds = {
            str(p): {c: str(t) for c, t in f.schema.items()}
            for p, f in zip(files, frames, strict=True)
        }
        first = str(exc).strip().splitlines()[0]
        raise DataError(
            f"table files have columns of incompatible types ({first}): {kinds}"
        ) from exc


def _time_key(df: pl.DataFrame, column: str, origin: str) -> pl.Series:
    """The ``column`` as a sortable series: numbers, dates, datetimes or datetime text."""
    col = df.get_column(column)
    if col.dtype == pl.String:
        try:
            parsed = col.str.to_datetime(strict=False)
        except pl.exceptions.ComputeError:  # no value looks like a date: polars finds no format
            parsed = pl.Series(column, [None] * len(col), dtype=pl.Datetime)
        bad = col.filter(col.is_not_null() & parsed.is_null())
        if len(bad):
            examples = bad.unique(maintain_order=True).head(_EXAMPLES).to_list()
            raise DataError(
                f"{origin}: time column {column!r} (data.split_by) must hold numbers, dates or "
                f"datetimes, but {len(bad)} value(s) do not parse, e.g. {examples}"
            )
        col = parsed
    elif not (col.dtype.is_numeric() or col.dtype.is_temporal()):
        raise DataError(
            f"{origin}: time column {column!r} (data.split_by) must hold numbers, dates or "
            f"datetimes, got dtype {col.dtype}"
        )
    if col.null_count():
        raise DataError(
            f"{origin}: time column {column!r} (data.split_by) has {col.null_count()} empty values; "
            "every row needs a time to be split by time"
        )
    return col


def time_split(
    df: pl.DataFrame, column: str, fractions: Sequence[float], *, origin: str = "table"
) -> list[pl.DataFrame]:
    """Consecutive parts of ``df`` ordered by ``column``: the first part holds the earliest rows.

    Rows with equal times keep their file order (a stable sort); part sizes are the
    rounded cumulative fractions, as in :func:`mtl.data.datamodule.split_indices`.

    Example:
        >>> df = pl.DataFrame({"ts": [5, 1, 4, 2, 3], "y": [0, 1, 0, 1, 0]})
        >>> [p["ts"].to_list() for p in time_split(df, "ts", (0.6, 0.2, 0.2))]
        [[1, 2, 3], [4], [5]]
    """
    key = _time_key(df, column, origin)
    order = pl.DataFrame({"key": key}).with_row_index().sort("key", maintain_order=True)["index"]
    bounds = np.round(np.cumsum(np.asarray(fractions, dtype=np.float64)) * df.height).astype(int)
    bounds[-1] = df.height
    sorted_df = df[order]
    starts = [0, *bounds[:-1]]
    return [sorted_df.slice(int(a), int(b - a)) for a, b in zip(starts, bounds, strict=True)]


def _task_kinds(
    labels: Sequence[str], task_kinds: Sequence[str] | Mapping[str, str] | None
) -> dict[str, TaskKind]:
    if isinstance(task_kinds, str):  # one kind alone: data.task_kinds=regression
        task_kinds = [task_kinds]
    if task_kinds is None:
        kinds: dict[str, Any] = {}
    elif isinstance(task_kinds, Mapping):
        unknown = [n for n in task_kinds if n not in labels]
        if unknown:
            raise ValueError(
                f"data.task_kinds names {unknown}, which are not in data.labels {list(labels)}"
            )
        kinds = dict(task_kinds)
    else:
        if len(task_kinds) != len(labels):
            raise ValueError(
                f"data.task_kinds has {len(task_kinds)} entries for {len(labels)} labels {list(labels)}; "
                "give one kind per label or a mapping {label: kind}"
            )
        kinds = dict(zip(labels, task_kinds, strict=True))
    for name, kind in kinds.items():
        if kind not in TASK_KINDS:
            raise ValueError(
                f"data.task_kinds[{name!r}] must be one of {list(TASK_KINDS)}, got {kind!r}"
            )
    return {name: kinds.get(name, "binary") for name in labels}


def _validate(
    df: pl.DataFrame, roles: ColumnRoles, origin: str, fill: float | None
) -> pl.DataFrame:
    try:
        return validate_frame(df, roles, origin=origin, fill_numeric_nulls=fill)
    except DataError:
        raise
    except ValueError as exc:
        message = str(exc)
        if "must be binary 0/1" in message and "other values" in message:
            message += "; a regression label needs data.task_kinds={<label>: regression}"
        message = message.replace(
            "pass fill_numeric_nulls=<value>", "set data.fill_numeric_nulls=<value>"
        )
        raise DataError(message) from exc


def table(
    path: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[str],
    categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    user: str | None = None,
    task_kinds: Sequence[str] | Mapping[str, str] | None = None,
    separator: str | None = None,
    null_values: Sequence[str] | None = None,
    fill_numeric_nulls: float | None = None,
    train: str | os.PathLike[str] | None = None,
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    split_by: str | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    n_rows: int | None = None,
) -> SourceData:
    """Read a table of any format, keep the named columns, validate them, split by time if asked.

    Args:
        path: the rows (a file, a folder or a glob); or give ``train`` instead; with
            ``train`` too, the folder that ``train``/``val``/``test`` name files in.
        labels: label columns, one task each, in task order.
        categorical: categorical feature columns (ids; read as text from CSV).
        numeric: numeric feature columns.
        user: column grouping rows by user (per-user metrics such as GAUC), or None.
        task_kinds: ``"binary"`` (the default) or ``"regression"`` per label: a list
            aligned with ``labels`` or a mapping ``{label: kind}``.
        separator: CSV field separator (default ``","``; ``"\\t"`` for ``.tsv``).
        null_values: CSV strings read as missing (e.g. ``["", "NA", "\\\\N"]``).
        fill_numeric_nulls: a value for missing numeric features (default: refuse them).
        train: the train rows, as an alternative spelling of ``path`` (see :func:`split_files`).
        val: validation rows from their own files (default: carved from the train rows).
        test: test rows from their own files (default: carved from the train rows).
        split_by: a time column (numbers, dates, datetimes or datetime text): the
            splits not given as files are the latest rows, by the ``split`` fractions.
            Without it the data module splits the rows at random.
        split: (train, val, test) fractions, used here for the time split only.
        n_rows: read only the first rows of each file (quick runs).

    Returns:
        :class:`SourceData` with only the named columns (plus ``split_by``), with
        ``val``/``test`` set when they come from files or from the time split.

    Raises:
        FileNotFoundError: a path matches no file.
        DataError: a file lacks a named column (the message lists the file's columns),
            a column has the wrong type or bad values, or a file cannot be read.
        ValueError: the arguments contradict each other (no labels, a column in two roles).

    Example:
        >>> data = table("clicks.csv", labels=["click"], categorical=["user_id"], numeric=["price"],
        ...              split_by="ts")  # doctest: +SKIP
        >>> data.test["ts"].min() >= data.train["ts"].max()  # doctest: +SKIP
        True
    """
    if not labels:
        raise ValueError(
            "data.labels is empty: name at least one label column, e.g. data.labels=[click]"
        )
    files = split_files(path, train=train, val=val, test=test)
    rows_key = "train" if "train" in files else "path"
    rows_path = files[rows_key]
    check_row_limit(n_rows, key="data.n_rows")
    roles_lists = {
        "labels": list(labels),
        "categorical": list(categorical),
        "numeric": list(numeric),
    }
    for key, names in roles_lists.items():
        check_unique(names, key=f"data.{key}")
    seen: dict[str, str] = {}
    for key, names in (*roles_lists.items(), ("user", [user] if user else [])):
        for name in names:
            if name in seen and not (key == "user" and seen[name] == "categorical"):
                raise ValueError(
                    f"column {name!r} is in data.{seen[name]} and data.{key}; give it one role"
                )
            seen.setdefault(name, key)
    roles = ColumnRoles(
        categorical=list(categorical),
        numeric=list(numeric),
        labels=_task_kinds(labels, task_kinds),
        user_column=user,
    )
    needed = {name: key for key, names in roles_lists.items() for name in names}
    if user:
        needed.setdefault(user, "user")
    if split_by:
        needed.setdefault(split_by, "split_by")
    text_columns = [*categorical, *([user] if user and user not in categorical else [])]
    regression = [n for n, k in roles.labels.items() if k == "regression"]

    def read(spec: str | os.PathLike[str], key: str) -> pl.DataFrame:
        files = table_files(spec, key=key)
        frames = [
            _read_file(
                file,
                needed,
                separator=separator,
                null_values=null_values,
                text_columns=text_columns,
                float_columns=[*numeric, *regression],
                n_rows=n_rows,
            )
            for file in files
        ]
        frames = [
            _validate(f, roles, str(p), fill_numeric_nulls)
            for f, p in zip(frames, files, strict=True)
        ]
        return _concat(frames, files, text_columns)

    rows = read(rows_path, rows_key)
    given = {k: read(files[k], k) for k in ("val", "test") if k in files}
    if split_by:
        missing = [k for k in ("val", "test") if k not in given]
        if missing:
            fracs = dict(zip(("train", "val", "test"), split, strict=True))
            parts = ["train", *missing]
            total = sum(fracs[k] for k in parts)
            pieces = time_split(
                rows, split_by, [fracs[k] / total for k in parts], origin=str(rows_path)
            )
            rows = pieces[0]
            given |= dict(zip(missing, pieces[1:], strict=True))
    return SourceData(
        name="table", train=rows, roles=roles, val=given.get("val"), test=given.get("test")
    )
