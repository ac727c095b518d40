"""Input checks shared by the data sources and the data module, each failing with one clear line.

A polars or torch error raised deep inside a read (``OSError: unexpected end of
file``, ``ComputeError: could not parse ...`` with a page of hints) does not tell a
user which file, column or value to fix. The helpers here turn such failures, and
inputs that would otherwise be accepted silently (duplicate labels, a zero
embedding width, conversions without clicks), into a :class:`DataError` or a
plain ``ValueError`` naming the file, column, key or value and what is expected.
Callers are :mod:`mtl.data.sources` (reading), :mod:`mtl.data.datamodule`
(arguments and splits) and :mod:`mtl.training.build` (labels ESMM relies on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from mtl.data.csv_layout import RAGGED_ROW_ERROR, csv_rows, ragged_row

if TYPE_CHECKING:
    from mtl.data.datamodule import RecDataModule

__all__ = [
    "DataError",
    "check_embed_dim",
    "check_label_cascade",
    "check_no_cascade_violations",
    "check_row_limit",
    "check_unique",
    "describe_bad_values",
    "read_error",
    "refuse_duplicate_names",
    "separator_hint",
    "unparsable_values",
]

_EXAMPLES = 5
_INT64_MAX = 2**63 - 1
# Polars names dtypes in its messages by these short names ("could not parse `x` as dtype `f64`").
_SHORT_DTYPES: dict[str, pl.DataType] = {
    "f32": pl.Float32(),
    "f64": pl.Float64(),
    "i8": pl.Int8(),
    "i16": pl.Int16(),
    "i32": pl.Int32(),
    "i64": pl.Int64(),
    "u8": pl.UInt8(),
    "u16": pl.UInt16(),
    "u32": pl.UInt32(),
    "u64": pl.UInt64(),
}
_PARSE_RE = re.compile(
    r"could not parse `(?P<value>.*?)` as dtype `(?P<dtype>\w+)` at column '(?P<column>[^']*)'"
)
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
# Separators a header read whole as one column most often hides. The override is quoted
# for the shell and for Hydra, which refuses a bare ";".
_OTHER_SEPARATORS = {
    ";": """set 'data.separator=";"'""",
    "|": """set 'data.separator="|"'""",
    "\t": "name the file .tsv (tab-separated) or set data.separator to a tab character",
}


class DataError(ValueError):
    """A data file or value that cannot be used; the message names the file, column and value.

    A ``ValueError``, so the command line prints it as one ``error: ...`` line (exit 2).

    Example:
        >>> isinstance(DataError("train.csv: column 'x' ..."), ValueError)
        True
    """


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _expected(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return f"integers ({dtype})"
    if dtype.is_float():
        return f"numbers ({dtype})"
    return f"{dtype} values"


def unparsable_values(column: pl.Series, dtype: pl.DataType) -> tuple[int, list[str]]:
    """Count the non-null text values of ``column`` that do not parse as ``dtype``, with examples.

    Example:
        >>> unparsable_values(pl.Series("x", ["1.5", "abc", None, "2"]), pl.Float64())
        (1, ['abc'])
    """
    text = column.cast(pl.String)
    bad = text.filter(text.is_not_null() & text.cast(dtype, strict=False).is_null())
    return len(bad), bad.unique(maintain_order=True).head(_EXAMPLES).to_list()


def describe_bad_values(
    path: Path, name: str, dtype: pl.DataType, count: int, examples: list[str]
) -> str:
    """The message for ``count`` values of column ``name`` in ``path`` that do not parse as ``dtype``.

    Example:
        >>> describe_bad_values(Path("d.csv"), "price", pl.Float64(), 2, ["n/a"])
        "d.csv: column 'price' must hold numbers (Float64), but 2 value(s) do not parse, e.g. ['n/a']"
    """
    too_large = [
        v
        for v in examples
        if dtype.is_integer() and _INTEGER_TEXT.match(v) and abs(int(v)) > _INT64_MAX
    ]
    detail = (
        f"; {too_large[0]!r} is out of the int64 range (ids up to {_INT64_MAX})"
        if too_large
        else ""
    )
    return (
        f"{path}: column {name!r} must hold {_expected(dtype)}, but {count} value(s) do not parse, "
        f"e.g. {examples}{detail}"
    )


def _diagnose_parse_error(
    path: Path, exc: BaseException, read_kwargs: Mapping[str, Any]
) -> str | None:
    # Read the file again as text, then try each column that has an expected dtype:
    # this finds every bad column, their counts and examples, not only the first value
    # polars stumbled on.
    overrides = dict(read_kwargs.get("schema_overrides") or {})
    match = _PARSE_RE.search(str(exc))
    if match and match["column"] not in overrides and match["dtype"] in _SHORT_DTYPES:
        overrides[match["column"]] = _SHORT_DTYPES[match["dtype"]]
    keep = {
        k: v
        for k, v in read_kwargs.items()
        if k not in ("schema_overrides", "schema", "infer_schema", "infer_schema_length")
    }
    try:
        text = pl.read_csv(path, infer_schema=False, **keep)
    except Exception:  # the file cannot even be read as text: fall back to polars' own line
        text = None
    if text is not None:
        for name, dtype in overrides.items():
            if name not in text.columns:
                continue
            dtype = dtype() if isinstance(dtype, type) else dtype
            count, examples = unparsable_values(text.get_column(name), dtype)
            if count:
                return describe_bad_values(path, name, dtype, count, examples)
    if match:
        dtype = _SHORT_DTYPES.get(match["dtype"])
        if dtype is not None:
            return describe_bad_values(path, match["column"], dtype, 1, [match["value"]])
    return None


def refuse_duplicate_names(
    path: Path, columns: Sequence[str], separator: str = ",", *, used: Iterable[str] | None = None
) -> None:
    """Refuse CSV file ``path`` if its header names a ``used`` column twice (polars read it
    as ``columns``); None: any column. Repeats among the columns a run ignores do no harm.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = path.write_text("price,id,price\\n1,2,3\\n")
        >>> refuse_duplicate_names(path, pl.read_csv(path).columns)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mtl.data.validation.DataError: ...d.csv: the header names ['price'] more than once; ...
    """
    # Polars reads a second "price" as "price_duplicated_0" and says nothing; the file's own
    # header tells such a repeat from a column really named so.
    if not any("_duplicated_" in c for c in columns):
        return
    with csv_rows(path, separator) as rows:
        header = next(rows, [])
    wanted = None if used is None else set(used)
    repeated = [
        n for n in dict.fromkeys(header) if header.count(n) > 1 and (wanted is None or n in wanted)
    ]
    if repeated:
        raise DataError(
            f"{path}: the header names {repeated} more than once; give each column its own name"
        )


def read_error(
    path: Path, what: str, exc: BaseException, read_kwargs: Mapping[str, Any] | None = None
) -> DataError:
    """The :class:`DataError` to raise for a failed read of ``path`` (a ``what``).

    Covers a truncated or corrupt gzip, a file with no data after decompression, a
    row with more fields than the header (its line, see :func:`ragged_row`) and a
    value that does not parse as its column's dtype (the column, the count and
    examples of bad values); anything else keeps the first line of polars' message.

    Args:
        path: the file being read.
        what: what the file is, for the message (``"AliExpress file"``).
        exc: the exception the reader raised.
        read_kwargs: the keyword arguments of the failed ``pl.read_csv`` call, used to
            read the file again as text to find the bad values.

    Example:
        >>> err = read_error(Path("d.csv.gz"), "data file", OSError("unexpected end of file"))
        >>> str(err).startswith("data file d.csv.gz is truncated or not valid gzip")
        True
    """
    message = _first_line(exc)
    if isinstance(exc, pl.exceptions.NoDataError):
        content = "decompressed content" if path.suffix == ".gz" else "file"
        return DataError(
            f"{what} {path} has no data: its {content} is empty; expected a header and rows"
        )
    if isinstance(exc, (OSError, EOFError)) or "gzip" in message or "decompress" in message:
        return DataError(
            f"{what} {path} is truncated or not valid gzip ({message}); "
            "download or compress it again"
        )
    kwargs = read_kwargs or {}
    if RAGGED_ROW_ERROR in message and path.suffix != ".parquet":
        where = ragged_row(path, kwargs.get("separator", ","), kwargs.get("quote_char", '"'))
        if where is not None:
            return DataError(f"{what} {path} cannot be read: {where}")
    if isinstance(exc, pl.exceptions.ComputeError) and path.suffix != ".parquet":
        diagnosis = _diagnose_parse_error(path, exc, kwargs)
        if diagnosis is not None:
            return DataError(diagnosis)
    return DataError(f"{what} {path} cannot be read: {message}")


def separator_hint(columns: Sequence[str]) -> str:
    """A hint to append to a missing-columns message when a CSV's header was read as one
    column that holds another separator (``;``, ``|`` or a tab); else ``""``.

    Example:
        >>> print(separator_hint(["user_id;item_id;click"]))
        ; the file was read as one column, its separator looks like ";": set 'data.separator=";"'
        >>> separator_hint(["user_id", "click"])
        ''
    """
    if len(columns) != 1:
        return ""
    for sep, fix in _OTHER_SEPARATORS.items():
        if sep in columns[0]:
            shown = "a tab" if sep == "\t" else f'"{sep}"'
            return f"; the file was read as one column, its separator looks like {shown}: {fix}"
    return ""


def check_row_limit(n_rows: Any, *, key: str = "n_rows") -> None:
    """Refuse a row limit that is not a positive integer or None (all rows).

    Polars takes ``n_rows=-5`` as an unsigned overflow and ``head(-5)`` as "all but
    the last 5", so a negative limit either crashes or silently drops rows.

    Example:
        >>> check_row_limit(None); check_row_limit(100)
        >>> check_row_limit(-5)
        Traceback (most recent call last):
        ...
        ValueError: n_rows must be a positive integer or null (all rows), got -5
    """
    if n_rows is None:
        return
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"{key} must be a positive integer or null (all rows), got {n_rows!r}")


def check_embed_dim(embed_dim: Any, *, key: str = "embed_dim", allow_none: bool = True) -> None:
    """Refuse an embedding width that is not a positive integer (or a mapping of them).

    Example:
        >>> check_embed_dim({"item": 8}); check_embed_dim(None)
        >>> check_embed_dim(0)
        Traceback (most recent call last):
        ...
        ValueError: embed_dim must be a positive integer or null (the default rule), got 0
    """
    if embed_dim is None and allow_none:
        return
    if isinstance(embed_dim, Mapping):
        for name, dim in embed_dim.items():
            check_embed_dim(dim, key=f"{key}[{name!r}]", allow_none=False)
        return
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        rule = " or null (the default rule)" if allow_none else ""
        raise ValueError(f"{key} must be a positive integer{rule}, got {embed_dim!r}")


def check_unique(names: Iterable[str], *, key: str) -> None:
    """Refuse a list of names with repeats (a repeated label would silently become one task).

    Example:
        >>> check_unique(["income", "never_married"], key="labels")
        >>> check_unique(["income", "income"], key="labels")
        Traceback (most recent call last):
        ...
        ValueError: labels lists ['income'] more than once; give each name once, got ['income', 'income']
    """
    names = list(names)
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if repeated:
        repeated = list(dict.fromkeys(repeated))
        raise ValueError(f"{key} lists {repeated} more than once; give each name once, got {names}")


def check_no_cascade_violations(df: pl.DataFrame, *, first: str, then: str, origin: str) -> None:
    """Refuse rows where the later label of a cascade is 1 but the first is 0 (a conversion without a click).

    Args:
        df: frame holding both 0/1 label columns.
        first: the label that must come first (``"click"``).
        then: the label that can only follow it (``"conversion"``).
        origin: file or split name for the message.

    Example:
        >>> df = pl.DataFrame({"click": [1, 0, 0], "conversion": [1, 0, 1]})
        >>> try:
        ...     check_no_cascade_violations(df, first="click", then="conversion", origin="t.csv")
        ... except DataError as err:
        ...     print(str(err).split(";")[0])
        t.csv: 1 of 3 rows have conversion=1 but click=0
    """
    bad = df.filter((pl.col(then).cast(pl.Float64) == 1) & (pl.col(first).cast(pl.Float64) == 0))
    if bad.height:
        raise DataError(
            f"{origin}: {bad.height} of {df.height} rows have {then}=1 but {first}=0; "
            f"a {then} is only observed after a {first} (the CTCVR cascade): fix or drop these rows"
        )


def check_label_cascade(dm: RecDataModule, *, first: str, then: Iterable[str], model: str) -> None:
    """Refuse encoded splits where a task of ``then`` is 1 but ``first`` is 0.

    Called where a model that assumes the cascade is built (ESMM: ``pCTCVR = pCTR * pCVR``
    cannot fit a conversion without a click); the data module does not know the model.

    Args:
        dm: a prepared :class:`~mtl.data.datamodule.RecDataModule`.
        first: the click task.
        then: tasks that can only be positive after ``first`` (ctcvr, a supervised cvr).
        model: model name for the message.
    """
    names = dm.spec.task_names
    if first not in names:
        return
    for split in ("train", "val", "test"):
        labels_BT = dm.tensors(split).labels_BT
        first_B = labels_BT[:, names.index(first)]
        for task in then:
            if task not in names:
                continue
            n_bad = int(((labels_BT[:, names.index(task)] == 1) & (first_B == 0)).sum())
            if n_bad:
                raise DataError(
                    f"{split} split of {dm.source}: {n_bad} of {len(labels_BT)} rows have {task}=1 but "
                    f"{first}=0; {model} needs every {task} to follow a {first} (pCTCVR = pCTR * pCVR): "
                    "fix or drop these rows"
                )
