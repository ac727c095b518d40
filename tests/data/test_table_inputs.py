"""data=table with the inputs users type: one column name without brackets, ids stored as
floats in one file and as text in another, and messages that say what to change.

Helpers added for these cases are imported inside the tests, so a test fails on its own
when its behaviour is missing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtl.data.data_warnings import UnseenCategoriesWarning
from mtl.data.features import fit_features
from mtl.data.shards.encoding import fit_lazy
from mtl.data.shards.scan import TableQuery
from mtl.data.table_datamodule import TableDataModule
from mtl.data.tabular import category_codes
from mtl.data.validation import DataError


def _frame(n: int = 300, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": [f"u{v}" for v in rng.integers(0, 20, n)],
            "item_id": rng.integers(0, 30, n),
            "price": rng.normal(size=n),
            "click": rng.integers(0, 2, n),
        }
    )


def _module(**kwargs: object) -> TableDataModule:
    dm = TableDataModule(batch_size=64, **kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _caught(fn: object) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()  # type: ignore[operator]
    return caught


# ---------------------------------------------------------------- one name, no brackets


def test_one_name_without_brackets_is_that_column(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    _frame().write_csv(path)
    dm = _module(path=str(path), labels="click", categorical="user_id", numeric="price")
    assert dm.spec.task_names == ["click"]
    assert [f.name for f in dm.spec.categorical] == ["user_id"]
    assert [f.name for f in dm.spec.numeric] == ["price"]


def test_one_task_kind_without_brackets(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    _frame().with_columns(watch=pl.col("price").abs()).write_parquet(path)
    dm = _module(path=str(path), labels="watch", categorical="user_id", task_kinds="regression")
    assert [t.kind for t in dm.spec.tasks] == ["regression"]


def test_the_shard_query_takes_one_name_without_brackets() -> None:
    q = TableQuery.from_config({"labels": "click", "categorical": "item_id", "numeric": "price"})
    assert q.roles.labels == {"click": "binary"}
    assert q.roles.categorical == ["item_id"] and q.roles.numeric == ["price"]


@pytest.mark.parametrize("bad", [{"a": 1}, 1.5, [["a"]]])
def test_a_value_that_is_no_name_is_refused_naming_the_key(tmp_path: Path, bad: object) -> None:
    from mtl.data.features import names_list

    with pytest.raises(ValueError, match=r"^data\.categorical must be a column name or a list"):
        names_list(bad, key="data.categorical")
    with pytest.raises(ValueError, match=r"^data\.categorical must be a column name"):
        TableDataModule(path=str(tmp_path / "x.csv"), labels=["click"], categorical=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ids as floats and as text


def test_whole_floats_are_known_by_their_integer_text() -> None:
    from mtl.data.vocabulary import category_text

    df = pl.DataFrame({"f": [12.0, -3.0, 0.5, None], "s": ["12", "a", "12.0", None]})
    for got in (
        df.select(category_text("f"), category_text("s")),
        df.lazy().select(category_text("f"), category_text("s")).collect(engine="streaming"),
    ):
        assert got["f"].to_list() == ["12", "-3", "0.5", None]
        assert got["s"].to_list() == ["12", "a", "12.0", None]  # text stays as written


def test_float_ids_in_train_match_text_ids_in_test(tmp_path: Path) -> None:
    train, test = _frame(seed=0), _frame(n=100, seed=1)
    train.with_columns(pl.col("item_id").cast(pl.Float64)).write_parquet(tmp_path / "train.parquet")
    test.with_columns(pl.col("item_id").cast(pl.String)).write_parquet(tmp_path / "test.parquet")
    made: dict[str, TableDataModule] = {}
    caught = _caught(
        lambda: made.setdefault(
            "dm",
            _module(
                train=str(tmp_path / "train.parquet"),
                test=str(tmp_path / "test.parquet"),
                labels=["click"],
                categorical=["item_id"],
            ),
        )
    )
    assert not [w for w in caught if issubclass(w.category, UnseenCategoriesWarning)]
    # Reference: the vocabulary is the sorted decimal text of the train ids, 1-based.
    vocab = sorted({str(v) for v in train["item_id"].to_list()})
    expected = [vocab.index(str(v)) + 1 if str(v) in vocab else 0 for v in test["item_id"]]
    assert sum(e > 0 for e in expected) > 90  # the test ids are known in train
    assert made["dm"].tensors("test").cat_BF[:, 0].tolist() == expected


def test_float_and_text_ids_in_one_split_are_one_id_space(tmp_path: Path) -> None:
    df = _frame()
    df[:150].with_columns(pl.col("item_id").cast(pl.Float64)).write_parquet(tmp_path / "a.parquet")
    df[150:].with_columns(pl.col("item_id").cast(pl.String)).write_parquet(tmp_path / "b.parquet")
    dm = _module(path=str(tmp_path / "*.parquet"), labels=["click"], categorical=["item_id"])
    assert dm.fitted.vocabularies["item_id"].to_list() == sorted(
        {str(v) for v in df["item_id"].to_list()}
    )


def test_the_streaming_fit_and_encoding_read_float_ids_the_same_way() -> None:
    from mtl.data.features import ColumnRoles

    train = _frame().with_columns(pl.col("item_id").cast(pl.Float64))
    roles = ColumnRoles(categorical=["item_id"], labels={"click": "binary"})
    lazy = fit_lazy(train.lazy(), roles)
    eager = fit_features(train, labels=roles.labels, categorical=["item_id"], numeric=[])
    expected = sorted({str(int(v)) for v in train["item_id"].to_list()})
    assert lazy.vocabularies["item_id"].to_list() == expected
    assert eager.vocabularies["item_id"].to_list() == expected
    test = pl.LazyFrame({"item_id": [float(expected[3]), None, 1e6]})
    codes = test.select(category_codes("item_id", lazy.vocabularies["item_id"], pl.Int32))
    assert codes.collect(engine="streaming")["item_id"].to_list() == [4, 0, 0]


def test_mtl_prepare_encodes_float_train_ids_like_text_test_ids(tmp_path: Path) -> None:
    from mtl.data.shards.prepare import prepare

    train, test = _frame(seed=0), _frame(n=100, seed=1)
    train.with_columns(pl.col("item_id").cast(pl.Float64)).write_parquet(tmp_path / "train.parquet")
    test.write_csv(tmp_path / "test.csv")  # ids read as text from CSV
    data = {
        "train": str(tmp_path / "train.parquet"),
        "test": str(tmp_path / "test.csv"),
        "labels": "click",
        "categorical": "item_id",
        "numeric": ["price"],
    }
    prepare(data, tmp_path / "shards", log=lambda _: None)
    codes = pl.read_parquet(tmp_path / "shards" / "test" / "*.parquet")["cat.item_id"]
    vocab = sorted({str(v) for v in train["item_id"].to_list()})
    expected = [vocab.index(str(v)) + 1 if str(v) in vocab else 0 for v in test["item_id"]]
    assert codes.to_list() == expected


def test_ids_that_cannot_match_warn_naming_both_dtypes(tmp_path: Path) -> None:
    train = _frame().with_columns(item_id=pl.col("item_id").cast(pl.Float64) + 0.5)
    test = _frame(n=50, seed=1).with_columns(item_id=pl.format("{}.50", pl.col("item_id")))
    train.write_parquet(tmp_path / "train.parquet")
    test.write_parquet(tmp_path / "test.parquet")
    caught = _caught(
        lambda: _module(
            train=str(tmp_path / "train.parquet"),
            test=str(tmp_path / "test.parquet"),
            labels=["click"],
            categorical=["item_id"],
        )
    )
    messages = [str(w.message) for w in caught if issubclass(w.category, UnseenCategoriesWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("test split of table: 100% of the ids")
    assert "'item_id' is String here but Float64 in train" in messages[0]


# ---------------------------------------------------------------- messages


def test_a_row_limit_of_zero_names_the_data_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^data\.n_rows must be a positive integer"):
        TableDataModule(path=str(tmp_path / "x.csv"), labels=["click"], categorical=["c"], n_rows=0)


@pytest.mark.parametrize(("value", "which"), [(0, "positive"), (1, "negative")])
def test_a_binary_label_of_one_class_warns_naming_the_task(
    tmp_path: Path, value: int, which: str
) -> None:
    from mtl.data.data_warnings import DataWarning

    path = tmp_path / "rows.parquet"
    _frame().with_columns(like=pl.lit(value)).write_parquet(path)
    caught = _caught(
        lambda: _module(path=str(path), labels=["click", "like"], categorical=["user_id"])
    )
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    # One warning per split, for 'like' only ('click' has both classes).
    assert len(messages) == 3, messages
    assert all(f"binary task 'like' has no {which} labels" in m for m in messages)
    assert "AUC is undefined" in messages[0] and messages[0].startswith("train split of table")


@pytest.mark.parametrize(
    ("separator", "fix"),
    [(";", """'data.separator=";"'"""), ("|", """'data.separator="|"'"""), ("\t", ".tsv")],
)
def test_a_file_read_as_one_column_names_its_separator(
    tmp_path: Path, separator: str, fix: str
) -> None:
    path = tmp_path / "rows.csv"
    _frame().write_csv(path, separator=separator)
    with pytest.raises(DataError, match="the file was read as one column") as err:
        _module(path=str(path), labels=["click"], categorical=["user_id"])
    assert fix in str(err.value)


def test_a_label_with_empty_values_counts_them_apart(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    click = [None, None, None, 2] + [0, 1] * 48
    _frame(n=100).with_columns(click=pl.Series(click)).write_csv(path)
    with pytest.raises(DataError) as err:
        _module(path=str(path), labels=["click"], categorical=["user_id"])
    message = str(err.value)
    assert "must be binary 0/1 but has 3 empty values and 1 other values" in message
    assert "[2]" in message and "None" not in message


def test_a_label_with_only_empty_values_bad_says_so(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    _frame(n=100).with_columns(click=pl.Series([None] * 5 + [0, 1] * 47 + [0])).write_csv(path)
    with pytest.raises(DataError, match=r"must be binary 0/1 but has 5 empty values$"):
        _module(path=str(path), labels=["click"], categorical=["user_id"])


def test_a_column_of_row_ids_warns_with_the_keys_that_cap_it(tmp_path: Path) -> None:
    from mtl.data.data_warnings import DataWarning

    n = 2000
    df = _frame(n=n).with_columns(rid=pl.format("r{}", pl.int_range(n)))
    path = tmp_path / "rows.parquet"
    df.write_parquet(path)

    def warned(**kwargs: object) -> list[str]:
        caught = _caught(
            lambda: _module(
                path=str(path), labels=["click"], categorical=["rid", "item_id"], **kwargs
            )
        )
        return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]

    messages = warned()
    assert len(messages) == 1, messages
    train_rows = round(0.8 * n)
    assert f"'rid' {train_rows:,} distinct values in {train_rows:,} rows" in messages[0]
    assert "data.max_vocab" in messages[0] and "data.min_count" in messages[0]
    assert "item_id" not in messages[0]
    assert warned(max_vocab=100) == []
    assert warned(min_count=2) == []
