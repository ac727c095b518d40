"""The rows of a ``data=table`` config as lazy polars queries: read and checked.

Nothing here loads a table: every function builds or runs a ``LazyFrame`` query
over the files with polars' streaming engine. The reading rules are the table
source's (:mod:`mtl.data.sources.table`): only the named columns, ids as text and
numerics as floats from CSV, ids stored as different dtypes in different files
made one id space with :func:`~mtl.data.vocabulary.category_text`, files
concatenated in sorted order, ``n_rows`` per file. The checks are
:func:`mtl.data.sources.base.validate_frame`'s, counted over all rows in one pass,
with its messages. The split of the rows is :mod:`mtl.data.shards.split`'s
(``ROW``, ``SPLIT`` and :func:`split_column` stay importable from here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from mtl.data.csv_layout import RAGGED_ROW_ERROR, ragged_row
from mtl.data.features import ColumnRoles, names_list
from mtl.data.numeric_range import FLOAT32_MAX
from mtl.data.shards.split import ROW, SPLIT, split_column
from mtl.data.sources.base import binary_label_ok, binary_label_problem
from mtl.data.sources.table import _columns, _format, _task_kinds, table_files
from mtl.data.validation import DataError, check_row_limit, describe_bad_values, separator_hint
from mtl.data.vocabulary import category_text

__all__ = [
    "ROW",
    "SPLIT",
    "TableQuery",
    "check_rows",
    "read_failure",
    "scan_files",
    "split_column",
]

_EXAMPLES = 5  # bad values quoted in a message
_EXAMPLE_ROWS = 1000  # bad values read to find the distinct examples quoted


@dataclass
class TableQuery:
    """The column roles and reading options of a ``data=table`` config.

    Args:
        roles: which column is a label, a feature or the user.
        separator: CSV separator (None: ``,``, tab for ``.tsv``).
        null_values: CSV strings read as missing (in the config, one string or a list).
        fill_numeric_nulls: value for missing numeric features (None: refuse them).
        split_by: time column, or None.
        n_rows: read only the first rows of each file (a positive integer), or None for all.

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
        # The table source's order (labels, categorical, numeric): its messages list them so.
        keys = {c: "labels" for c in labels} | {c: "categorical" for c in categorical}
        keys |= {c: "numeric" for c in numeric}
        if user:
            keys.setdefault(str(user), "user")
        split_by = data.get("split_by")
        if split_by:
            keys.setdefault(str(split_by), "split_by")
        nulls = data.get("null_values")
        if isinstance(nulls, str):  # data.null_values=NA: that one string, "" included
            nulls = [nulls]
        fill = data.get("fill_numeric_nulls")
        n_rows = data.get("n_rows")
        # 0 is no limit to polars' head() and to a truth test: refused, as data=table does.
        check_row_limit(n_rows, key="data.n_rows")
        return cls(
            roles=roles,
            separator=None if data.get("separator") is None else str(data.get("separator")),
            null_values=None if nulls is None else [str(v) for v in nulls],  # type: ignore[attr-defined]
            fill_numeric_nulls=None if fill is None else float(fill),  # type: ignore[arg-type]
            split_by=None if not split_by else str(split_by),
            n_rows=n_rows,  # type: ignore[arg-type]
            keys=keys,
        )

    def columns(self) -> list[str]:
        """Every column read: labels, features, user, time."""
        return list(self.keys)

    @property
    def text_columns(self) -> list[str]:
        user = self.roles.user_column
        # The user column is often a categorical feature too: listed once.
        return list(dict.fromkeys([*self.roles.categorical, *([user] if user else [])]))


def _scan_one(path: Path, query: TableQuery) -> pl.LazyFrame:
    fmt = _format(path)
    if fmt is None:
        raise DataError(f"{path} is not a table file")
    sep = query.separator if query.separator is not None else ("\t" if fmt == "tsv" else ",")
    present = _columns(path, fmt, sep, used=query.keys)
    missing = [f"{c!r} (data.{k})" for c, k in query.keys.items() if c not in present]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"the file has columns {present}{separator_hint(present)}"
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
    return lf if query.n_rows is None else lf.head(query.n_rows)


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
        # An id column stored as floats or integers in one file and text in another is
        # one id space: the text the in-memory concatenation gives ("12", not "12.0").
        schemas = [lf.collect_schema() for lf in scans]
        mixed = [c for c in query.text_columns if len({s[c] for s in schemas}) > 1]
        if mixed:
            scans = [lf.with_columns(category_text(c) for c in mixed) for lf in scans]
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
    # (what, column) -> the count of rows with that problem, all counted in one pass.
    checks: dict[tuple[str, str], pl.Expr] = {}
    for name, kind in roles.labels.items():
        col = pl.col(name)
        if kind == "binary":
            checks["empty", name] = col.is_null().sum()
            checks["other", name] = (~binary_label_ok(name) & col.is_not_null()).sum()
        elif not schema[name].is_numeric():
            raise DataError(
                f"{origin}: regression label {name!r} must be numeric, got {schema[name]}"
            )
        else:
            bad = col.is_null() | (col.is_nan() if schema[name].is_float() else pl.lit(False))
            checks["regression", name] = bad.sum()
    for name in roles.numeric:
        dtype = schema[name]
        if not dtype.is_numeric():
            raise DataError(
                f"{origin}: numeric feature {name!r} must be a numeric column, got dtype {dtype}"
            )
        col = pl.col(name)
        checks["nulls", name] = (
            col.is_null() | (col.is_nan() if dtype.is_float() else pl.lit(False))
        ).sum()
        if dtype.is_float():
            checks["range", name] = ((col.abs() > FLOAT32_MAX) & col.is_not_nan()).sum()
    counts = lf.select(
        pl.len().alias("rows"), **{f"c{i}": e for i, e in enumerate(checks.values())}
    ).collect(engine="streaming")
    n_rows, *values = counts.row(0)
    if n_rows == 0:
        raise DataError(f"{origin}: no data rows, only the column names; nothing to prepare")
    found = dict(zip(checks, values, strict=True))
    fills = []
    for (what, name), n in found.items():
        if what == "empty" and (n or found["other", name]):
            _refuse_binary_label(lf, name, schema[name], n, found["other", name], origin)
        if not n or what in ("empty", "other"):
            continue
        if what == "regression":
            raise DataError(f"{origin}: regression label {name!r} has {n} null/NaN values")
        if what == "nulls":
            if query.fill_numeric_nulls is None:
                raise DataError(
                    f"{origin}: numeric feature {name!r} has {n} null/NaN values; "
                    "set data.fill_numeric_nulls=<value> to fill them"
                )
            col = pl.col(name).fill_nan(None) if schema[name].is_float() else pl.col(name)
            fills.append(col.fill_null(query.fill_numeric_nulls).alias(name))
        else:
            raise DataError(
                f"{origin}: numeric feature {name!r} has {n} infinite or out-of-range values "
                f"(|x| > {FLOAT32_MAX:.2g}, the float32 range of the model's inputs); "
                "remove, clip or rescale them"
            )
    return lf.with_columns(fills) if fills else lf


def _refuse_binary_label(
    lf: pl.LazyFrame, name: str, dtype: pl.DataType, empty: int, other: int, origin: str
) -> None:
    """Raise the in-memory path's message for binary label ``name`` with ``empty`` missing
    and ``other`` non-binary values."""
    bad = ~binary_label_ok(name) & pl.col(name).is_not_null()
    examples = _examples(lf, bad, name) if other else []
    problem = binary_label_problem(name, empty=empty, other=other, dtype=dtype, examples=examples)
    # The hint of the table source's message: only values other than 0/1 suggest regression.
    hint = "; a regression label needs data.task_kinds={<label>: regression}" if other else ""
    raise DataError(f"{origin}: {problem}{hint}")


def _examples(lf: pl.LazyFrame, bad: pl.Expr, name: str) -> list[Any]:
    """The first distinct values of column ``name`` where ``bad`` holds, read up to a
    bounded number of bad rows (one streaming pass, on an error path only)."""
    head = lf.filter(bad).select(name).head(_EXAMPLE_ROWS).collect(engine="streaming")
    return head[name].unique(maintain_order=True).head(_EXAMPLES).to_list()


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
    if query.n_rows is not None:
        text = text.head(query.n_rows)

    def bad(name: str) -> pl.Expr:
        return pl.col(name).is_not_null() & pl.col(name).cast(pl.Float64, strict=False).is_null()

    counts = text.select(bad(c).sum() for c in floats).collect(engine="streaming").row(0)
    for name, count in zip(floats, counts, strict=True):
        if count:
            # Streamed up to a bounded number of bad values: their distinct examples.
            return describe_bad_values(
                path, name, pl.Float64(), count, _examples(text, bad(name), name)
            )
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
            fmt = _format(path)
            if RAGGED_ROW_ERROR in line and fmt in ("csv", "tsv"):
                default = "\t" if fmt == "tsv" else ","
                sep = default if query.separator is None else query.separator
                line = ragged_row(path, sep) or line
            return DataError(f"table file {path} cannot be read: {line}")
    return DataError(f"{', '.join(map(str, files))}: {first}")
