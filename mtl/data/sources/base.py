"""What every source returns, and the checks that give its files clear error messages.

A source reads raw files (or generates data) into polars frames and declares the
column roles. Problems are reported with the file, the column and what was
expected, because a stack trace from deep inside polars or torch does not tell a
user which of their 80 columns is broken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.numeric_range import check_in_range
from mtl.data.validation import check_row_limit, read_error

_EXAMPLES = 5
_BINARY_TEXT = ["0", "1", "0.0", "1.0", "true", "false"]


@dataclass
class SourceData:
    """Frames and roles produced by a source.

    Args:
        name: source name (registry key).
        train: rows for training (the data module may carve validation/test from it).
        roles: column roles (features, labels and their kinds, user column).
        val: the source's own validation rows, or None.
        test: the source's own test rows, or None.
        files: the files read, by the frame they fill: ``"rows"`` (``train``), ``"val"``,
            ``"test"``; empty for generated data.
        description: where the rows came from, for the run's record (e.g. that a folder
            held only one of a dataset's files, so the data module splits it); None
            when ``files`` says it all.

    Example:
        >>> roles = ColumnRoles(numeric=["x"], labels={"y": "regression"})
        >>> SourceData(name="toy", train=pl.DataFrame({"x": [0.0], "y": [1.0]}), roles=roles).test is None
        True
    """

    name: str
    train: pl.DataFrame
    roles: ColumnRoles
    val: pl.DataFrame | None = None
    test: pl.DataFrame | None = None
    files: dict[str, list[str]] = field(default_factory=dict)
    description: str | None = None


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """Expand ``~`` and env vars; resolve a relative path against the launch directory.

    Under a Hydra run that changed directory, relative paths still mean the
    directory the user launched from (Hydra's ``to_absolute_path``).
    """
    text = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    if os.path.isabs(text):
        return Path(text)
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(text))
    except Exception:  # hydra missing or not initialised: plain cwd semantics
        return Path(text).resolve()


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """Raise ``FileNotFoundError`` naming ``what`` and ``path`` unless it is a non-empty file."""
    if not path.is_file():
        extra = f"; {hint}" if hint else ""
        raise FileNotFoundError(f"{what} not found: {path}{extra}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} is empty: {path}")
    return path


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """Raise ``FileNotFoundError`` unless ``path`` is a directory."""
    if not path.is_dir():
        extra = f"; {hint}" if hint else ""
        raise FileNotFoundError(f"{what} directory not found: {path}{extra}")
    return path


def read_table(path: Path, what: str, **read_kwargs: Any) -> pl.DataFrame:
    """Read a CSV (optionally gzipped) or Parquet file and refuse an empty result.

    Raises:
        DataError: the file is truncated, empty after decompression, or has a value
            that does not parse as its column's dtype (see :func:`read_error`).
    """
    require_file(path, what)
    check_row_limit(read_kwargs.get("n_rows"))
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path, n_rows=read_kwargs.get("n_rows"))
        else:
            df = pl.read_csv(path, **read_kwargs)
    except (pl.exceptions.PolarsError, OSError, EOFError) as exc:
        raise read_error(path, what, exc, read_kwargs) from exc
    if df.height == 0:
        raise ValueError(f"{what} has no data rows: {path}")
    return df


def binary_label_ok(name: str) -> pl.Expr:
    """Whether each value of label column ``name`` is a binary 0/1 (as number, text or boolean).

    Example:
        >>> pl.DataFrame({"y": [1, 0, 2, None]}).select(binary_label_ok("y"))["y"].to_list()
        [True, True, False, False]
    """
    col = pl.col(name)
    return col.cast(pl.String).is_in(_BINARY_TEXT) & col.is_not_null()


def binary_label_problem(
    name: str, *, empty: int, other: int, dtype: pl.DataType, examples: list[Any]
) -> str:
    """What is wrong with binary label column ``name``: its ``empty`` values and its ``other``
    non-binary values (of ``dtype``, with ``examples``), each counted when there are any.

    Empty labels are counted apart: "58 other values, e.g. [None]" hides that they are missing.

    Example:
        >>> binary_label_problem("click", empty=3, other=1, dtype=pl.Int64(), examples=[2])
        "label column 'click' must be binary 0/1 but has 3 empty values and 1 other values (dtype Int64), e.g. [2]"
    """
    parts = [f"{empty} empty values"] if empty else []
    if other:
        parts.append(f"{other} other values (dtype {dtype}), e.g. {examples}")
    return f"label column {name!r} must be binary 0/1 but has {' and '.join(parts)}"


def validate_frame(
    df: pl.DataFrame,
    roles: ColumnRoles,
    *,
    origin: str,
    fill_numeric_nulls: float | None = None,
) -> pl.DataFrame:
    """Check a raw frame against its roles; return it (with numeric nulls filled if asked).

    Checks: every role column exists; binary labels hold only 0/1 (no nulls);
    regression labels and numeric features are numeric; numeric features have no
    null/NaN unless ``fill_numeric_nulls`` gives a fill value, and no infinite value or
    one beyond float32's range (:func:`~mtl.data.numeric_range.check_in_range`).

    Args:
        df: the raw frame.
        roles: its column roles.
        origin: file or split name for the error messages.
        fill_numeric_nulls: None (default) raises on null/NaN numeric features;
            a number replaces them by it.

    Raises:
        ValueError: naming ``origin``, the column and the expected type.
    """
    for name, kind in roles.labels.items():
        if name not in df.columns:
            expected = "binary 0/1" if kind == "binary" else "numeric"
            raise ValueError(
                f"{origin}: missing label column {name!r} (expected {expected}); columns are {df.columns}"
            )
    missing = [c for c in roles.columns() if c not in df.columns]
    if missing:
        raise ValueError(f"{origin}: missing feature columns {missing}; columns are {df.columns}")

    for name, kind in roles.labels.items():
        col = df.get_column(name)
        if kind == "binary":
            ok = df.select(binary_label_ok(name)).to_series()
            if not ok.all():
                bad = col.filter(~ok).drop_nulls()
                examples = bad.unique(maintain_order=True).head(_EXAMPLES).to_list()
                problem = binary_label_problem(
                    name, empty=col.null_count(), other=len(bad), dtype=col.dtype, examples=examples
                )
                raise ValueError(f"{origin}: {problem}")
        elif not col.dtype.is_numeric():
            raise ValueError(
                f"{origin}: regression label {name!r} must be numeric, got dtype {col.dtype}"
            )
        elif col.null_count() or (col.dtype.is_float() and col.is_nan().any()):
            raise ValueError(f"{origin}: regression label {name!r} has null/NaN values")

    fills = []
    for name in roles.numeric:
        col = df.get_column(name)
        if not col.dtype.is_numeric():
            examples = col.head(_EXAMPLES).to_list()
            raise ValueError(
                f"{origin}: numeric feature {name!r} must be a numeric column, got dtype {col.dtype} (e.g. {examples})"
            )
        check_in_range(col, origin)
        n_bad = col.null_count() + (int(col.is_nan().sum()) if col.dtype.is_float() else 0)
        if n_bad and fill_numeric_nulls is None:
            raise ValueError(
                f"{origin}: numeric feature {name!r} has {n_bad} null/NaN values of {df.height} rows; "
                "pass fill_numeric_nulls=<value> to fill them"
            )
        if n_bad:
            filled = pl.col(name).fill_nan(None) if col.dtype.is_float() else pl.col(name)
            fills.append(filled.fill_null(float(fill_numeric_nulls)).alias(name))  # type: ignore[arg-type]
    return df.with_columns(fills) if fills else df
