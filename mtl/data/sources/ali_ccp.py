"""Ali-CCP (Alibaba Click and Conversion Prediction, the ESMM dataset) in its preprocessed CSV form.

The layout is the one torch-rechub's examples and MTReclib-style pipelines read
(and that ``datasets/ali_ccp/prepare.py`` writes from the raw Tianchi files): one
CSV per split, ``ali_ccp_{train,val,test}.csv`` (or ``..._sample.csv``, or
``train/val/test.csv``), with labels ``click`` and ``purchase``, one column per
sparse feature field named by its field id (``101`` user id, ``205`` item id,
``206`` category, ...) and dense columns prefixed ``D`` (``D109_14``, ``D508``, ...).

``conf/data/ali_ccp.yaml`` reads the files ``prepare.py`` writes through the table source
(:mod:`mtl.data.sources.table`), so ``mtl prepare data=ali_ccp`` streams the ~42M train
rows; this loader is the ``source="ali_ccp"`` API of :class:`~mtl.data.datamodule.RecDataModule`,
which infers the roles from any subset of the fields and can derive ``ctcvr``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import SourceData, read_table, require_dir, resolve_path, validate_frame
from mtl.data.validation import check_no_cascade_violations

ALI_CCP_LABELS: tuple[str, ...] = ("click", "purchase")
ALI_CCP_USER_FIELD = "101"
# Dense columns start with "D" and a digit (torch-rechub's layout: D109_14, D508, ...).
_DENSE_RE = re.compile(r"^D\d")
_SPLIT_FILES = {
    "train": ("ali_ccp_train.csv", "ali_ccp_train_sample.csv", "train.csv"),
    "val": ("ali_ccp_val.csv", "ali_ccp_val_sample.csv", "val.csv", "valid.csv"),
    "test": ("ali_ccp_test.csv", "ali_ccp_test_sample.csv", "test.csv"),
}
_HINT = "see datasets/ali_ccp/README.md; run datasets/ali_ccp/prepare.py on the raw Tianchi files"


def _find(root: Path, split: str) -> Path | None:
    return next((root / name for name in _SPLIT_FILES[split] if (root / name).is_file()), None)


def _roles_for(columns: list[str], add_ctcvr: bool) -> ColumnRoles:
    labels = dict.fromkeys(ALI_CCP_LABELS, "binary")
    if add_ctcvr:
        labels["ctcvr"] = "binary"
    numeric = [c for c in columns if _DENSE_RE.match(c)]
    categorical = [c for c in columns if c not in numeric and c not in labels and c != "ctcvr"]
    user = ALI_CCP_USER_FIELD if ALI_CCP_USER_FIELD in columns else None
    return ColumnRoles(categorical=categorical, numeric=numeric, labels=labels, user_column=user)  # type: ignore[arg-type]


def _read_split(
    file: Path, *, n_rows: int | None, fill: float | None, add_ctcvr: bool
) -> pl.DataFrame:
    header = read_table(file, "Ali-CCP file", n_rows=1).columns
    # Some exports call the purchase label "conversion"; accept it under the usual name.
    rename = (
        {"conversion": "purchase"} if "conversion" in header and "purchase" not in header else {}
    )
    roles = _roles_for([rename.get(c, c) for c in header], add_ctcvr=False)
    # Sparse fields are ids: read them as text so no id is mangled by float inference.
    overrides = {c: pl.String for c in roles.categorical} | {c: pl.Float64 for c in roles.numeric}
    df = read_table(file, "Ali-CCP file", n_rows=n_rows, schema_overrides=overrides).rename(rename)
    df = validate_frame(df, roles, origin=str(file), fill_numeric_nulls=fill)
    if add_ctcvr:
        # click * purchase would hide a purchase without a click: the cascade is declared,
        # so such rows are refused rather than relabelled.
        check_no_cascade_violations(df, first="click", then="purchase", origin=str(file))
        df = df.with_columns(
            (pl.col("click").cast(pl.Int8) * pl.col("purchase").cast(pl.Int8)).alias("ctcvr")
        )
    return df


def ali_ccp(
    path: str | os.PathLike[str],
    *,
    add_ctcvr: bool = False,
    n_rows: int | None = None,
    fill_numeric_nulls: float | None = None,
) -> SourceData:
    """Load the preprocessed Ali-CCP splits.

    Args:
        path: directory with the split CSVs (train required; val and test optional).
        add_ctcvr: also expose ``ctcvr = click * purchase`` (ESMM's second target).
        n_rows: read only the first rows of each file.
        fill_numeric_nulls: None (default) raises on null dense values; a number fills them.

    Returns:
        :class:`SourceData`: every non-label, non-dense column is categorical, the
        ``D*`` columns numeric, labels ``click`` and ``purchase`` (and ``ctcvr``),
        user column ``101`` when present.

    Example:
        >>> data = ali_ccp("data/ali_ccp")  # doctest: +SKIP
        >>> data.roles.label_names  # doctest: +SKIP
        ['click', 'purchase']
    """
    root = require_dir(resolve_path(path), "Ali-CCP", _HINT)
    train_file = _find(root, "train")
    if train_file is None:
        raise FileNotFoundError(
            f"no Ali-CCP train file ({' or '.join(_SPLIT_FILES['train'])}) in {root}; {_HINT}"
        )
    kwargs = {"n_rows": n_rows, "fill": fill_numeric_nulls, "add_ctcvr": add_ctcvr}
    train = _read_split(train_file, **kwargs)  # type: ignore[arg-type]
    roles = _roles_for(train.columns, add_ctcvr)
    others: dict[str, pl.DataFrame | None] = {}
    files = {"rows": [str(train_file)]}
    for split in ("val", "test"):
        file = _find(root, split)
        if file is not None:
            files[split] = [str(file)]
        frame = _read_split(file, **kwargs) if file is not None else None  # type: ignore[arg-type]
        if frame is not None and set(frame.columns) != set(train.columns):
            raise ValueError(
                f"{file}: columns differ from {train_file}: missing {sorted(set(train.columns) - set(frame.columns))}, "
                f"extra {sorted(set(frame.columns) - set(train.columns))}"
            )
        others[split] = frame.select(train.columns) if frame is not None else None
    return SourceData(
        name="ali_ccp",
        train=train,
        roles=roles,
        val=others["val"],
        test=others["test"],
        files=files,
    )
