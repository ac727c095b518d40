"""``mtl prepare``: the shards encode every row as the in-memory path does, split as told,
are reused on a second run, and refuse bad input with a message naming what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mtl.cli import main
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.prepare import MANIFEST_FILE, prepare
from mtl.data.table_datamodule import TableDataModule
from mtl.data.validation import DataError

N = 3000
COLUMNS = {
    "labels": ["click", "buy"],
    "categorical": ["user", "item", "city"],
    "numeric": ["rid", "price"],
    "user": "user",
}


def _frame(n: int = N, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    # Skewed items so that min_count and max_vocab both cut; nulls in ids and numerics.
    item = rng.zipf(1.6, n) % 400
    city = rng.integers(0, 30, n)
    price = rng.lognormal(2.0, 1.0, n)
    return pl.DataFrame(
        {
            "rid": np.arange(n, dtype=np.float64),  # a unique row id, to align rows across paths
            "user": rng.integers(0, 200, n),
            "item": [None if i % 13 == 0 else f"it{i}" for i in item],
            "city": [None if c == 7 else int(c) for c in city],
            "price": [None if i % 50 == 0 else float(p) for i, p in enumerate(price)],
            "ts": rng.integers(
                0, 500, n
            ),  # many ties: the time cuts fall inside runs of equal times
            "click": rng.integers(0, 2, n),
            "buy": rng.integers(0, 2, n),
        }
    )


def _write(df: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.write_csv(path)
    else:
        df.write_parquet(path)
    return path


def _in_memory(data: dict) -> TableDataModule:
    dm = TableDataModule(**data, batch_size=256)
    dm.setup("fit")
    return dm


def _shard_frame(out: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(out / split / "*.parquet")


def _assert_same_encoding(tm: TableDataModule, sm: ShardsDataModule, out: Path) -> None:
    mem, shard = tm.fitted, sm.fitted
    assert shard.spec.categorical == mem.spec.categorical
    assert shard.spec.tasks == mem.spec.tasks and shard.spec.user_column == mem.spec.user_column
    for name, vocab in mem.vocabularies.items():
        assert shard.vocabularies[name].to_list() == vocab.to_list(), name
    for a, b in zip(shard.spec.numeric, mem.spec.numeric, strict=True):
        assert a.name == b.name
        assert a.mean == pytest.approx(b.mean, rel=1e-12) and a.std == pytest.approx(
            b.std, rel=1e-12
        )
    cols = sm.columns()
    rid = next(i for i, f in enumerate(mem.spec.numeric) if f.name == "rid")
    for split in ("train", "val", "test"):
        t = tm.tensors(split)
        frame = _shard_frame(out, split)
        assert frame.height == len(t) == sm.rows(split)
        # Rows may be in another order (the time split sorts them): align on the row id.
        mem_order = torch.argsort(t.num_BF[:, rid])
        shard_order = np.argsort(frame[cols.num[rid]].to_numpy(), kind="stable")
        cat = frame.select(cols.cat).to_numpy()[shard_order]
        assert frame.select(cols.cat).dtypes == [pl.Int32] * len(cols.cat)
        np.testing.assert_array_equal(cat, t.cat_BF[mem_order].numpy())
        num = frame.select(cols.num).to_numpy()[shard_order]
        np.testing.assert_allclose(num, t.num_BF[mem_order].numpy(), rtol=1e-6, atol=1e-6)
        labels = frame.select(cols.labels).to_numpy()[shard_order]
        np.testing.assert_array_equal(labels, t.labels_BT[mem_order].numpy())
        user = frame["user"].to_numpy()[shard_order]
        np.testing.assert_array_equal(user, t.user_B[mem_order].numpy())
    # the data record agrees too
    mem_record, shard_record = tm.split_summary(), sm.split_summary()
    assert shard_record["rows"] == mem_record["rows"]
    for task, rates in mem_record["positive_rate"].items():
        assert shard_record["positive_rate"][task] == pytest.approx(rates, rel=1e-9)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_time_split_shards_encode_like_the_in_memory_path(tmp_path: Path, suffix: str) -> None:
    path = _write(_frame(), tmp_path / f"rows{suffix}")
    data = {
        **COLUMNS,
        "path": str(path),
        "split_by": "ts",
        "min_count": 3,
        "max_vocab": 40,
        "fill_numeric_nulls": -1.0,
    }
    out = tmp_path / "shards"
    prepare(data, out, row_group_rows=256, shard_rows=1024, log=lambda _: None)
    tm, sm = _in_memory(data), ShardsDataModule(path=out)
    # the caps did cut: items rarer than 3 are out, and at most 40 are kept
    assert tm.spec.categorical[1].vocab_size == 40
    _assert_same_encoding(tm, sm, out)
    assert sm.split_summary()["time_range"] == tm.split_summary()["time_range"]
    # several shard files of at most shard_rows rows
    assert len(sm.manifest["splits"]["train"]["shards"]) == 3


def test_split_files_shards_encode_like_the_in_memory_path(tmp_path: Path) -> None:
    df = _frame()
    paths = {
        name: _write(part, tmp_path / f"{name}.parquet")
        for name, part in zip(
            ("train", "val", "test"), (df[:2000], df[2000:2500], df[2500:]), strict=True
        )
    }
    data = {
        **COLUMNS,
        **{k: str(v) for k, v in paths.items()},
        "min_count": 2,
        "fill_numeric_nulls": 0.0,
    }
    out = tmp_path / "shards"
    prepare(data, out, row_group_rows=300, shard_rows=600, log=lambda _: None)
    _assert_same_encoding(_in_memory(data), ShardsDataModule(path=out), out)


def test_hash_split_is_deterministic_and_near_the_fractions(tmp_path: Path) -> None:
    path = _write(_frame(), tmp_path / "rows.parquet")
    data = {**COLUMNS, "path": str(path), "fill_numeric_nulls": 0.0, "split": [0.7, 0.2, 0.1]}

    def rows_of(out: Path, seed: int) -> dict[str, set[int]]:
        prepare(data | {"split_seed": seed}, out, row_group_rows=500, log=lambda _: None)
        sm = ShardsDataModule(path=out)
        rid, f = sm.columns().num[0], sm.spec.numeric[0]
        return {
            s: set(np.rint(_shard_frame(out, s)[rid].to_numpy() * f.std + f.mean).astype(int))
            for s in ("train", "val", "test")
        }

    a, b, c = rows_of(tmp_path / "a", 0), rows_of(tmp_path / "b", 0), rows_of(tmp_path / "c", 1)
    assert a == b  # same seed, same split
    assert a != c  # another seed, another split
    for split in (a, c):  # a partition of the rows: each row in one split
        assert set().union(*split.values()) == set(range(N))
        assert sum(len(v) for v in split.values()) == N
    for split, frac in zip(("train", "val", "test"), (0.7, 0.2, 0.1), strict=False):
        share = len(a[split]) / N  # binomial: 4 standard deviations
        assert abs(share - frac) < 4 * (frac * (1 - frac) / N) ** 0.5, split
    how = ShardsDataModule(path=tmp_path / "c").split_how()
    assert "70/20/10 at random by a hash of the row index (split_seed 1)" in how


def test_second_run_reuses_the_shards_and_a_changed_input_rewrites_them(tmp_path: Path) -> None:
    path = _write(_frame(), tmp_path / "rows.parquet")
    data = {**COLUMNS, "path": str(path), "fill_numeric_nulls": 0.0}
    out = tmp_path / "shards"
    prepare(data, out, row_group_rows=500, log=lambda _: None)
    files = [*sorted(out.glob("*/*.parquet")), out / MANIFEST_FILE]
    stamps = [f.stat().st_mtime_ns for f in files]
    lines: list[str] = []
    prepare(data, out, row_group_rows=500, log=lines.append)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert any("reusing" in line for line in lines)
    # another option rewrites
    prepare(data | {"min_count": 2}, out, row_group_rows=500, log=lines.append)
    assert (out / MANIFEST_FILE).stat().st_mtime_ns != stamps[-1]
    stamp = (out / MANIFEST_FILE).stat().st_mtime_ns
    # a touched input (same size, new mtime) rewrites
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare(data | {"min_count": 2}, out, row_group_rows=500, log=lines.append)
    assert (out / MANIFEST_FILE).stat().st_mtime_ns != stamp


def test_missing_column_is_named_with_the_files_columns(tmp_path: Path) -> None:
    path = _write(_frame(), tmp_path / "rows.parquet")
    data = {**COLUMNS, "path": str(path), "numeric": ["rid", "prize"]}
    with pytest.raises(DataError, match=r"missing column 'prize' \(data.numeric\).*'price'"):
        prepare(data, tmp_path / "out", log=lambda _: None)


def test_null_numerics_without_a_fill_are_refused(tmp_path: Path) -> None:
    path = _write(_frame(), tmp_path / "rows.parquet")
    with pytest.raises(
        DataError, match=r"numeric feature 'price' has 60 null/NaN.*fill_numeric_nulls"
    ):
        prepare({**COLUMNS, "path": str(path)}, tmp_path / "out", log=lambda _: None)


def test_non_binary_label_is_refused(tmp_path: Path) -> None:
    path = _write(_frame().with_columns(pl.col("buy") * 2), tmp_path / "rows.parquet")
    data = {**COLUMNS, "path": str(path), "fill_numeric_nulls": 0.0}
    n_bad = int((_frame()["buy"] == 1).sum())  # the 1s became 2s
    with pytest.raises(DataError) as info:
        prepare(data, tmp_path / "out", log=lambda _: None)
    assert str(info.value) == (
        f"{path}: label column 'buy' must be binary 0/1 but has {n_bad} other values "
        "(dtype Int64), e.g. [2]; a regression label needs data.task_kinds={<label>: regression}"
    )
    assert str(info.value) == _table_error(data)


def test_a_folder_that_is_not_prepared_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a prepared shard folder.*mtl prepare"):
        ShardsDataModule(path=tmp_path).setup("fit")
    with pytest.raises(FileNotFoundError, match="shard folder not found"):
        ShardsDataModule(path=tmp_path / "nope").setup("fit")


def test_cli_prepares_and_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(_frame(), tmp_path / "rows.csv")
    args = [
        "prepare",
        "data=table",
        f"data.path={path}",
        "data.labels=[click,buy]",
        "data.categorical=[user,item]",
        "data.numeric=[rid,price]",
        "data.fill_numeric_nulls=0",
        "data.split_by=ts",
        f"out={tmp_path / 'shards'}",
        "row_group_rows=1000",
    ]
    assert main(args) == 0
    assert "wrote train/part-00000.parquet: 2,400 rows" in capsys.readouterr().out
    assert ShardsDataModule(path=tmp_path / "shards").rows("train") == 2400
    bad = [a.replace("data.numeric=[rid,price]", "data.numeric=[rid,cost]") for a in args]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'cost' (data.numeric)" in err
    assert main(["prepare", "data=synthetic_ctr", f"out={tmp_path / 'x'}"]) == 2
    assert "data=table" in capsys.readouterr().err


def _table_error(data: dict) -> str:
    with pytest.raises(DataError) as info:
        _in_memory(data)
    return str(info.value)


def test_csv_numeric_text_is_named_as_the_in_memory_path_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {5: "n/a", 17: "abc", 40: "n/a"}
    df = _frame().with_columns(
        pl.Series("price", [bad.get(i, "1.5") for i in range(N)], dtype=pl.String)
    )
    path = _write(df, tmp_path / "rows.csv")
    data = {**COLUMNS, "path": str(path), "fill_numeric_nulls": 0.0}
    expected = (
        f"{path}: column 'price' must hold numbers (Float64), but 3 value(s) do not parse, "
        "e.g. ['n/a', 'abc']"
    )
    with pytest.raises(DataError) as info:
        prepare(data, tmp_path / "out", log=lambda _: None)
    assert str(info.value) == expected == _table_error(data)
    args = [
        "prepare",
        "data=table",
        f"data.path={path}",
        "data.labels=[click,buy]",
        "data.categorical=[user,item]",
        "data.numeric=[rid,price]",
        f"out={tmp_path / 'cli'}",
    ]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_another_read_failure_names_the_file_in_one_line(tmp_path: Path) -> None:
    _write(_frame(), tmp_path / "a.csv")
    # a label polars reads as integers from the first rows, and text far below them
    bad = _frame(seed=1).with_columns(pl.col("click").cast(pl.String))
    _write(
        bad.with_columns(
            click=pl.when(pl.col("rid") == 2000).then(pl.lit("yes")).otherwise(pl.col("click"))
        ),
        tmp_path / "b.csv",
    )
    data = {**COLUMNS, "path": str(tmp_path / "*.csv"), "fill_numeric_nulls": 0.0}
    with pytest.raises(DataError, match=r"^table file .*b\.csv cannot be read: [^\n]+$"):
        prepare(data, tmp_path / "out", log=lambda _: None)


def test_header_only_input_is_named(tmp_path: Path) -> None:
    empty = _write(_frame()[:0], tmp_path / "empty.csv")
    assert empty.read_text().count("\n") == 1  # a header, no rows
    data = {**COLUMNS, "path": str(empty)}
    with pytest.raises(DataError, match=rf"^{empty}: no data rows"):
        prepare(data, tmp_path / "out", log=lambda _: None)
    rows = _write(_frame(), tmp_path / "rows.parquet")
    empty_test = _write(_frame()[:0], tmp_path / "test.parquet")
    data = {**COLUMNS, "path": str(rows), "test": str(empty_test), "fill_numeric_nulls": 0.0}
    with pytest.raises(DataError, match=rf"^{empty_test}: no data rows"):
        prepare(data, tmp_path / "out", log=lambda _: None)


def test_unseen_categories_warn_as_in_memory_and_the_oov_shares_are_recorded(
    tmp_path: Path,
) -> None:
    from mtl.data.data_warnings import UnseenCategoriesWarning

    df = _frame()
    # test: items all new, cities all missing (not a warning: nothing to see), users known
    test = df[2500:].with_columns(
        ("new" + pl.col("item").fill_null("x")).alias("item"), pl.lit(None, pl.Int64).alias("city")
    )
    paths = {
        "train": _write(df[:2000], tmp_path / "train.parquet"),
        "val": _write(df[2000:2500], tmp_path / "val.parquet"),
        "test": _write(test, tmp_path / "test.parquet"),
    }
    data = {**COLUMNS, **{k: str(v) for k, v in paths.items()}, "fill_numeric_nulls": 0.0}
    data["min_count"] = 2
    out = tmp_path / "shards"
    with pytest.warns(UnseenCategoriesWarning) as shard_warnings:
        manifest = prepare(data, out, log=lambda _: None)
    with pytest.warns(UnseenCategoriesWarning) as mem_warnings:
        tm = _in_memory(data)
    assert [str(w.message).split(": ", 1)[1] for w in shard_warnings] == [
        str(w.message).split(": ", 1)[1] for w in mem_warnings
    ]
    assert str(shard_warnings[0].message).startswith(f"test split of {paths['test']}: 100% ")
    assert "['item']" in str(shard_warnings[0].message)
    assert manifest["unseen_categories"] == {"test": ["item"]}
    # the share of ids at index 0, against the in-memory encoding
    for j, f in enumerate(tm.spec.categorical):
        for split in ("train", "val", "test"):
            share = float((tm.tensors(split).cat_BF[:, j] == 0).double().mean())
            assert manifest["oov_share"][f.name][split] == pytest.approx(share, abs=1e-12)
    # each run on the shards is told again
    with pytest.warns(UnseenCategoriesWarning, match=r"test split of .*\['item'\]"):
        ShardsDataModule(path=out).setup("fit")
