"""``mtl prepare`` takes the inputs ``data=table`` takes, and says the same about them: ids
stored as floats in one file and text in another, a one-string ``null_values``, a row limit
of 0, a file read as one column, empty label values, a column of row ids and a label of
one class. Each message or encoding is checked against the in-memory path's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtl.data.data_warnings import DataWarning
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.prepare import prepare
from mtl.data.shards.scan import TableQuery
from mtl.data.table_datamodule import TableDataModule
from mtl.data.validation import DataError

BASE = {"labels": ["click"], "categorical": ["user_id", "item_id"], "numeric": ["price"]}


def _frame(n: int = 300, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": [f"u{v}" for v in rng.integers(0, 20, n)],
            "item_id": rng.integers(0, 400, n),
            "price": rng.normal(size=n),
            "ts": np.arange(n),
            "click": rng.integers(0, 2, n),
        }
    )


def _prepare(data: dict, out: Path) -> dict:
    return prepare(data, out, row_group_rows=100, log=lambda _: None)


def _in_memory(data: dict) -> TableDataModule:
    dm = TableDataModule(**data, batch_size=64)
    dm.setup("fit")
    return dm


def _error(make: object) -> str:
    with pytest.raises(DataError) as info:
        make()  # type: ignore[operator]
    return str(info.value)


def _warned(make: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()  # type: ignore[operator]
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


# ---------------------------------------------------------------- ids as floats and as text


def test_float_and_text_ids_in_the_files_of_one_split_encode_as_in_memory(tmp_path: Path) -> None:
    df = _frame(n=400)
    # The rows of train in two files: item ids as whole floats in one, as text in the other.
    df[:150].with_columns(pl.col("item_id").cast(pl.Float64)).write_parquet(tmp_path / "a.parquet")
    df[150:300].with_columns(pl.col("item_id").cast(pl.String)).write_parquet(
        tmp_path / "b.parquet"
    )
    df[300:350].write_parquet(tmp_path / "val.parquet")
    df[350:].write_parquet(tmp_path / "test.parquet")
    data = BASE | {
        "train": str(tmp_path / "[ab].parquet"),
        "val": str(tmp_path / "val.parquet"),
        "test": str(tmp_path / "test.parquet"),
    }
    _prepare(data, tmp_path / "shards")
    shards = ShardsDataModule(path=tmp_path / "shards")
    shards.setup("fit")
    # Reference: the decimal text of the integer ids of the train rows, sorted.
    vocab = sorted({str(v) for v in df[:300]["item_id"].to_list()})
    assert shards.fitted.vocabularies["item_id"].to_list() == vocab
    assert _in_memory(data).fitted.vocabularies["item_id"].to_list() == vocab
    codes = pl.read_parquet(tmp_path / "shards" / "train" / "*.parquet")["cat.item_id"]
    assert codes.to_list() == [vocab.index(str(v)) + 1 for v in df[:300]["item_id"]]


# ---------------------------------------------------------------- reading options


def test_one_null_values_string_is_that_string(tmp_path: Path) -> None:
    assert TableQuery.from_config(BASE | {"null_values": "NA"}).null_values == ["NA"]
    assert TableQuery.from_config(BASE | {"null_values": ""}).null_values == [""]
    df = _frame().with_columns(
        pl.when(pl.int_range(300) % 40 == 3)
        .then(pl.lit("NA"))
        .otherwise(pl.col("price").cast(pl.String))
        .alias("price"),
        # an id "N" that a null list ["N", "A"] would read as missing
        pl.when(pl.int_range(300) < 50).then(pl.lit("N")).otherwise("user_id").alias("user_id"),
    )
    path = tmp_path / "rows.csv"
    df.write_csv(path)
    data = BASE | {"path": str(path), "null_values": "NA", "split_by": "ts"}
    expected = "numeric feature 'price' has 8 null/NaN values"  # 300 / 40 rows hold "NA"
    assert expected in _error(lambda: _prepare(data, tmp_path / "shards"))
    assert expected in _error(lambda: _in_memory(data))
    manifest = _prepare(data | {"fill_numeric_nulls": 0.0}, tmp_path / "shards")
    assert manifest["oov_share"]["user_id"]["train"] == 0.0  # "N" is an id, not missing


@pytest.mark.parametrize("n_rows", [0, -5, 2.5])
def test_a_row_limit_that_is_not_positive_names_the_data_key(
    tmp_path: Path, n_rows: object
) -> None:
    path = tmp_path / "rows.parquet"
    _frame().write_parquet(path)
    with pytest.raises(ValueError, match=r"^data\.n_rows must be a positive integer") as info:
        _prepare(BASE | {"path": str(path), "n_rows": n_rows}, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    with pytest.raises(ValueError) as mem:
        TableDataModule(**(BASE | {"path": str(path), "n_rows": n_rows}))
    assert str(info.value) == str(mem.value)


def test_a_row_limit_reads_that_many_rows_of_each_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _frame(seed=ord(name)).write_csv(tmp_path / f"{name}.csv")
    data = BASE | {"path": str(tmp_path / "*.csv"), "n_rows": 40, "categorical": ["user_id"]}
    manifest = _prepare(data, tmp_path / "shards")
    assert sum(s["rows"] for s in manifest["splits"].values()) == 80


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("separator", "fix"),
    [(";", """'data.separator=";"'"""), ("|", """'data.separator="|"'"""), ("\t", ".tsv")],
)
def test_a_file_read_as_one_column_names_its_separator(
    tmp_path: Path, separator: str, fix: str
) -> None:
    path = tmp_path / "rows.csv"
    _frame().write_csv(path, separator=separator)
    data = BASE | {"path": str(path)}
    message = _error(lambda: _prepare(data, tmp_path / "shards"))
    assert "the file was read as one column" in message and fix in message
    assert message == _error(lambda: _in_memory(data))


@pytest.mark.parametrize(
    ("click", "tail"),
    [
        (
            [None, None, None, 2, 2, 5],
            "3 empty values and 3 other values (dtype Int64), e.g. [2, 5]",
        ),
        ([None] * 5, "5 empty values"),
        (["yes", "no", "yes"], "3 other values (dtype String), e.g. ['yes', 'no']"),
    ],
)
def test_a_label_with_empty_values_counts_them_apart_as_in_memory(
    tmp_path: Path, click: list, tail: str
) -> None:
    n = 100
    rest = [0, 1] * n
    if isinstance(click[-1], str):  # a text column: the 0/1 as text
        rest = [str(v) for v in rest]
    path = tmp_path / "rows.csv"
    _frame(n=n).with_columns(click=pl.Series([*click, *rest][:n])).write_csv(path)
    data = BASE | {"path": str(path)}
    message = _error(lambda: _prepare(data, tmp_path / "shards"))
    assert f"{path}: label column 'click' must be binary 0/1 but has {tail}" in message
    # the table source's hint, only where values other than 0/1 suggest a regression label
    assert message.endswith("{<label>: regression}") == ("other" in tail)
    assert message == _error(lambda: _in_memory(data))


# ---------------------------------------------------------------- warnings


def test_a_column_of_row_ids_warns_as_in_memory(tmp_path: Path) -> None:
    n = 2000
    df = _frame(n=n).with_columns(rid=pl.format("r{}", pl.int_range(n)))
    df.write_parquet(tmp_path / "rows.parquet")
    data = {
        "labels": ["click"],
        "categorical": ["rid", "item_id"],
        "path": str(tmp_path / "rows.parquet"),
        "split_by": "ts",  # the same train rows on both paths
    }
    shard = _warned(lambda: _prepare(data, tmp_path / "shards"))
    assert len(shard) == 1, shard
    train_rows = round(0.8 * n)
    assert f"'rid' {train_rows:,} distinct values in {train_rows:,} rows" in shard[0]
    assert "item_id" not in shard[0]
    assert shard == _warned(lambda: _in_memory(data))
    assert _warned(lambda: _prepare(data | {"max_vocab": 100}, tmp_path / "capped")) == []
    assert _warned(lambda: _prepare(data | {"min_count": 2}, tmp_path / "cut")) == []


@pytest.mark.parametrize(("value", "which"), [(0, "positive"), (1, "negative")])
def test_a_label_of_one_class_in_a_split_warns_as_in_memory(
    tmp_path: Path, value: int, which: str
) -> None:
    df = _frame().with_columns(like=pl.col("click"))
    df[:200].write_parquet(tmp_path / "train.parquet")
    df[200:250].write_parquet(tmp_path / "val.parquet")
    df[250:].with_columns(like=pl.lit(value)).write_parquet(tmp_path / "test.parquet")
    data = BASE | {
        "labels": ["click", "like"],
        **{s: str(tmp_path / f"{s}.parquet") for s in ("train", "val", "test")},
    }
    shard = _warned(lambda: _prepare(data, tmp_path / "shards"))
    assert shard == [
        f"test split of {tmp_path / 'test.parquet'}: binary task 'like' has no {which} labels "
        f"(all 50 are {value}), so its AUC is undefined"
    ]
    memory = _warned(lambda: _in_memory(data))
    assert [m.split(": ", 1)[1] for m in shard] == [m.split(": ", 1)[1] for m in memory]
    # said again to each run on the shards, as each in-memory run says it
    again = _warned(lambda: ShardsDataModule(path=tmp_path / "shards").setup("fit"))
    assert again == [f"test split of {tmp_path / 'shards'}: {shard[0].split(': ', 1)[1]}"]


# ---------------------------------------------------------------- public names


def test_the_bad_value_message_is_public_and_the_split_stays_importable_from_scan() -> None:
    from mtl.data.shards import scan, split
    from mtl.data.validation import describe_bad_values

    assert describe_bad_values(Path("d.csv"), "n", pl.Int64(), 1, ["99999999999999999999"]) == (
        "d.csv: column 'n' must hold integers (Int64), but 1 value(s) do not parse, "
        "e.g. ['99999999999999999999']; '99999999999999999999' is out of the int64 range "
        "(ids up to 9223372036854775807)"
    )
    assert (scan.ROW, scan.SPLIT, scan.split_column) == (split.ROW, split.SPLIT, split.split_column)
