"""AliExpress multi-task search logs (the PLE / AITM / MTReclib benchmark format).

Each country (AliExpress_NL, _ES, _FR, _US) is a directory with ``train.csv`` and
``test.csv``: ``search_id``, ``categorical_1..16`` (integer codes),
``numerical_1..63`` and the labels ``click`` and ``conversion``. A conversion is
recorded only after a click, so ``conversion`` already equals the CTCVR target
``click * conversion`` of ESMM on well-formed data; ``add_ctcvr`` materialises
that product as a third label for models that want it explicitly.

``conf/data/aliexpress.yaml`` reads the same files through the table source
(:mod:`mtl.data.sources.table`), so ``mtl prepare data=aliexpress`` streams them too;
this loader is the ``source="aliexpress"`` API of :class:`~mtl.data.datamodule.RecDataModule`,
with ids as integers and the derived ``ctcvr`` label a table cannot express.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import (
    SourceData,
    read_table,
    require_dir,
    require_file,
    resolve_path,
    validate_frame,
)
from mtl.data.validation import check_no_cascade_violations

ALIEXPRESS_CATEGORICAL: tuple[str, ...] = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERIC: tuple[str, ...] = tuple(f"numerical_{i}" for i in range(1, 64))
ALIEXPRESS_LABELS: tuple[str, ...] = ("click", "conversion")
_HINT = "see datasets/aliexpress/README.md (expected a directory such as AliExpress_NL/ with train.csv and test.csv)"


def aliexpress_roles(*, add_ctcvr: bool = False) -> ColumnRoles:
    """Column roles of the frames :func:`aliexpress` returns."""
    labels = dict.fromkeys(ALIEXPRESS_LABELS, "binary")
    if add_ctcvr:
        labels["ctcvr"] = "binary"
    return ColumnRoles(
        categorical=list(ALIEXPRESS_CATEGORICAL),
        numeric=list(ALIEXPRESS_NUMERIC),
        labels=labels,  # type: ignore[arg-type]
    )


def _read_split(
    file: Path, roles: ColumnRoles, *, n_rows: int | None, fill: float | None
) -> pl.DataFrame:
    require_file(file, "AliExpress file", _HINT)
    # Fix dtypes up front: in a small file a numerical column can be all integers,
    # and categorical codes must not become floats.
    overrides = {c: pl.Float64 for c in ALIEXPRESS_NUMERIC} | {
        c: pl.Int64 for c in ALIEXPRESS_CATEGORICAL
    }
    df = read_table(file, "AliExpress file", n_rows=n_rows, schema_overrides=overrides)
    df = validate_frame(
        df, aliexpress_roles(add_ctcvr=False), origin=str(file), fill_numeric_nulls=fill
    )
    if "ctcvr" in roles.labels:
        # click * conversion would hide a conversion without a click: the cascade is declared,
        # so such rows are refused rather than relabelled.
        check_no_cascade_violations(df, first="click", then="conversion", origin=str(file))
        df = df.with_columns(
            (pl.col("click").cast(pl.Int8) * pl.col("conversion").cast(pl.Int8)).alias("ctcvr")
        )
    return df.select(roles.columns() + (["search_id"] if "search_id" in df.columns else []))


def aliexpress(
    path: str | os.PathLike[str],
    *,
    add_ctcvr: bool = False,
    n_rows: int | None = None,
    fill_numeric_nulls: float | None = None,
) -> SourceData:
    """Load one AliExpress country directory.

    Args:
        path: directory with ``train.csv`` and ``test.csv`` (``test.csv`` optional:
            without it the data module splits ``train.csv``).
        add_ctcvr: also expose the label ``ctcvr = click * conversion``.
        n_rows: read only the first rows of each file (quick runs).
        fill_numeric_nulls: None (default) raises on null numeric values; a number fills them.

    Returns:
        :class:`SourceData` with 16 categorical and 63 numeric features, labels
        ``click``, ``conversion`` (and ``ctcvr``); ``search_id`` is kept as a column
        but is not a feature.

    Example:
        >>> data = aliexpress("../shared/data/aliexpress-sample")  # doctest: +SKIP
        >>> data.roles.label_names  # doctest: +SKIP
        ['click', 'conversion']
    """
    root = require_dir(resolve_path(path), "AliExpress", _HINT)
    roles = aliexpress_roles(add_ctcvr=add_ctcvr)
    train = _read_split(root / "train.csv", roles, n_rows=n_rows, fill=fill_numeric_nulls)
    has_test = (root / "test.csv").exists()
    test = (
        _read_split(root / "test.csv", roles, n_rows=n_rows, fill=fill_numeric_nulls)
        if has_test
        else None
    )
    files = {"rows": [str(root / "train.csv")]}
    if has_test:
        files["test"] = [str(root / "test.csv")]
    return SourceData(
        name="aliexpress",
        train=train,
        roles=roles,
        test=test,
        files=files,
        description=None if has_test else f"aliexpress: train.csv only (no test.csv in {root})",
    )
