"""UCI Census-Income (KDD) as used in the MMoE paper (Ma et al., KDD 2018, sec. 6.3).

Files have no header: 41 attributes then the income class, separated by ", ".
The two tasks are ``income`` (income class ``50000+.``) and ``never_married``
(``marital stat == "Never married"``); marital status is therefore not a
feature, and ``instance weight`` (a sampling weight, "ignore" in the UCI
description) is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import SourceData, read_table, resolve_path, validate_frame
from mtl.data.validation import unparsable_values

# The 42 columns in file order, named as in the UCI ``census-income.names`` description.
CENSUS_COLUMNS: tuple[str, ...] = (
    "age",
    "class of worker",
    "detailed industry recode",
    "detailed occupation recode",
    "education",
    "wage per hour",
    "enroll in edu inst last wk",
    "marital stat",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "tax filer stat",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "instance weight",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "num persons worked for employer",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veteran's admin",
    "veterans benefits",
    "weeks worked in year",
    "year",
    "income class",
)

# Attributes marked "continuous" in census-income.names (instance weight excepted);
# every other attribute, including the integer-coded recodes, is nominal.
CENSUS_NUMERIC: tuple[str, ...] = (
    "age",
    "wage per hour",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "num persons worked for employer",
    "weeks worked in year",
)
# Money amounts are heavy-tailed (mostly 0, up to 99,999); log1p keeps the
# standardised values in a range an MLP handles.
_MONEY = ("wage per hour", "capital gains", "capital losses", "dividends from stocks")
_NOT_FEATURES = ("marital stat", "instance weight", "income class")
CENSUS_CATEGORICAL: tuple[str, ...] = tuple(
    c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC and c not in _NOT_FEATURES
)
TRAIN_FILE, TEST_FILE = "census-income.data.gz", "census-income.test.gz"
_HINT = "see datasets/census_income/README.md for where to get census-income.{data,test}.gz"


def read_census_file(path: Path, *, n_rows: int | None = None) -> pl.DataFrame:
    """Read one raw census file (gzipped or not) into all-string columns, whitespace stripped.

    Example:
        >>> df = read_census_file(Path("census-income.test.gz"))  # doctest: +SKIP
        >>> df.width  # doctest: +SKIP
        42
    """
    what = "Census-Income file"
    # Read everything as text first: the raw file's "?" markers would make
    # schema inference guess wrong, and the separator leaves a leading space.
    df = read_table(
        path, what, has_header=False, infer_schema=False, n_rows=n_rows, quote_char=None
    )
    if df.width != len(CENSUS_COLUMNS):
        raise ValueError(
            f"{what} {path} has {df.width} comma-separated columns, expected {len(CENSUS_COLUMNS)} "
            "(41 attributes + income class); is this the census-income KDD file?"
        )
    df = df.rename(dict(zip(df.columns, CENSUS_COLUMNS, strict=True)))
    return df.with_columns(pl.all().str.strip_chars())


def _to_model_frame(raw: pl.DataFrame, path: Path, log_money: bool) -> pl.DataFrame:
    income = pl.col("income class")
    bad = raw.filter(~income.is_in(["50000+.", "- 50000."])).get_column("income class")
    if len(bad):
        raise ValueError(
            f"{path}: column 'income class' must be '50000+.' or '- 50000.', found {len(bad)} other values, "
            f"e.g. {bad.unique().head(5).to_list()}"
        )
    numeric = []
    for name in CENSUS_NUMERIC:
        value = pl.col(name).cast(pl.Float64, strict=False)
        numeric.append((value.log1p() if log_money and name in _MONEY else value).alias(name))
    bad_num = raw.select(
        [pl.col(c).cast(pl.Float64, strict=False).is_null().sum().alias(c) for c in CENSUS_NUMERIC]
    )
    bad_counts = {c: n for c, n in bad_num.row(0, named=True).items() if n}
    if bad_counts:
        first = next(iter(bad_counts))
        _, examples = unparsable_values(raw.get_column(first), pl.Float64())
        raise ValueError(
            f"{path}: numeric columns have non-numeric values (column: count) {bad_counts}, "
            f"e.g. {first!r}: {examples}"
        )
    return raw.select(
        *CENSUS_CATEGORICAL,
        *numeric,
        (income == "50000+.").cast(pl.Int8).alias("income"),
        (pl.col("marital stat") == "Never married").cast(pl.Int8).alias("never_married"),
    )


def census_roles() -> ColumnRoles:
    """Column roles of the frames :func:`census_income` returns."""
    return ColumnRoles(
        categorical=list(CENSUS_CATEGORICAL),
        numeric=list(CENSUS_NUMERIC),
        labels={"income": "binary", "never_married": "binary"},
    )


def census_income(
    path: str | os.PathLike[str],
    *,
    log_money: bool = True,
    n_rows: int | None = None,
) -> SourceData:
    """Load Census-Income (KDD) for the two MMoE tasks.

    Args:
        path: ``census-income.test.gz`` or ``census-income.data.gz`` (plain or gzipped),
            or a directory holding either or both. With both, the ``.data`` file is
            ``train`` and the ``.test`` file is ``test``; with one file it is all
            ``train`` and the data module splits it.
        log_money: apply ``log1p`` to wage, capital gains/losses and dividends.
        n_rows: read only the first rows of each file (quick runs).

    Returns:
        :class:`SourceData` with 32 categorical and 7 numeric features and binary
        labels ``income`` and ``never_married``.

    Raises:
        FileNotFoundError: the path or the directory's files are missing.
        ValueError: a file has the wrong number of columns or bad values.

    Example:
        >>> data = census_income("../shared/data/census-income-kdd")  # doctest: +SKIP
        >>> data.roles.label_names  # doctest: +SKIP
        ['income', 'never_married']
    """
    root = resolve_path(path)
    if root.is_dir():
        candidates = {
            kind: [root / name, root / name.removesuffix(".gz")]
            for kind, name in (("train", TRAIN_FILE), ("test", TEST_FILE))
        }
        found = {
            kind: next((p for p in paths if p.is_file()), None)
            for kind, paths in candidates.items()
        }
        if found["train"] is None and found["test"] is None:
            raise FileNotFoundError(
                f"no {TRAIN_FILE} or {TEST_FILE} (gzipped or not) in directory {root}; {_HINT}"
            )
        files = [p for p in (found["train"], found["test"]) if p is not None]
        # One file of the two: it is all the rows, and the data module splits it.
        if found["train"] is None:
            description = f"census: the test file only (no {TRAIN_FILE} in {root})"
        elif found["test"] is None:
            description = f"census: the train file only (no {TEST_FILE} in {root})"
        else:
            description = (
                f"census: train from {found['train'].name}, test from {found['test'].name}"
            )
    elif root.exists():
        files = [root]
        description = f"census: the one file {root.name}"
    else:
        raise FileNotFoundError(f"Census-Income file not found: {root}; {_HINT}")

    roles = census_roles()
    frames = []
    for file in files:
        frame = _to_model_frame(read_census_file(file, n_rows=n_rows), file, log_money)
        frames.append(validate_frame(frame, roles, origin=str(file)))
    test = frames[1] if len(frames) == 2 else None
    return SourceData(
        name="census_income",
        train=frames[0],
        roles=roles,
        test=test,
        files={k: [str(p)] for k, p in zip(("rows", "test"), files, strict=False)},
        description=description,
    )
