"""Bad data inputs end in one clear line naming the file, column, key or value, never a traceback.

Each case is built from small generated files in ``tmp_path`` (gzipped here when the
case needs it); the AliExpress cases start from a copy of the shared sample.
"""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from mtl.cli import main
from mtl.data.data_warnings import UnseenCategoriesWarning
from mtl.data.datamodule import RecDataModule
from mtl.data.features import fit_features
from mtl.data.sources import load_source
from mtl.data.sources.aliexpress import aliexpress
from mtl.data.sources.base import read_table
from mtl.data.sources.census import CENSUS_COLUMNS, CENSUS_NUMERIC
from mtl.data.sources.kuairand import kuairand
from mtl.data.tabular import encode
from mtl.data.validation import DataError
from mtl.training.build import build_datamodule, build_net
from mtl.training.config import compose_config

SYNTHETIC = {"n": 600, "n_users": 30, "n_items": 20}


def _census_text(n: int) -> str:
    """``n`` rows in the raw census-income layout: 42 comma-separated fields, no header."""
    rows = []
    for i in range(n):
        fields = []
        for name in CENSUS_COLUMNS:
            if name in CENSUS_NUMERIC:
                fields.append(str(i % 50))
            elif name == "marital stat":
                fields.append("Never married" if i % 3 else "Married-civilian spouse present")
            elif name == "income class":
                fields.append("50000+." if i % 4 == 0 else "- 50000.")
            else:
                fields.append(f"v{i % 5}")
        rows.append(", ".join(fields))
    return "\n".join(rows) + "\n"


def _ali_dir(root: Path, sample: Path, **edits: pl.Expr) -> Path:
    """A copy of the AliExpress sample in ``root``, with ``edits`` applied to train.csv as text."""
    root.mkdir(parents=True, exist_ok=True)
    train = pl.read_csv(sample / "train.csv", infer_schema=False)
    train.with_columns(**edits).write_csv(root / "train.csv")
    shutil.copy(sample / "test.csv", root / "test.csv")
    return root


def _set(column: str, i: int, value: str) -> dict[str, pl.Expr]:
    """Edit of one text column: ``value`` on row ``i``, unchanged elsewhere."""
    return {
        column: pl.when(pl.int_range(pl.len()) == i).then(pl.lit(value)).otherwise(pl.col(column))
    }


# ---------------------------------------------------------------- 1. broken gzip files
_WHOLE = gzip.compress(b"a,b\n" + "".join(f"{i},{i * 7}\n" for i in range(5000)).encode())
_TRUNCATED = _WHOLE[: len(_WHOLE) // 2]


def test_census_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    whole = gzip.compress(_census_text(400).encode())
    path = tmp_path / "census-income.test.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"census-income.test.gz is truncated or not valid gzip"):
        load_source("census_income", path=path)


def test_census_gzip_of_empty_content_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "census-income.test.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=r"census-income.test.gz has no data: its decompressed"):
        load_source("census_income", path=path)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (_TRUNCATED, "truncated or not valid gzip"),
        (b"\x1f\x8b" + b"not gzip at all" * 10, "truncated or not valid gzip"),
        (gzip.compress(b"\n\n"), "has no data"),
    ],
    ids=["truncated", "bad-header", "blank-content"],
)
def test_any_csv_source_reports_broken_gzip(tmp_path: Path, payload: bytes, expected: str) -> None:
    path = tmp_path / "joined.csv.gz"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=expected) as info:
        read_table(path, "KuaiRand joined file")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_cli_prints_one_error_line_for_a_truncated_gzip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = gzip.compress(_census_text(400).encode())
    path = tmp_path / "census-income.test.gz"
    path.write_bytes(whole[: len(whole) // 2])
    rc = main(["train", "data=census_income", f"data.path={path}", f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: Census-Income file") and "truncated" in err[-1]


# ------------------------------------------------------- 2. a string in a numeric column
def test_aliexpress_string_in_numeric_column_names_file_column_and_value(
    tmp_path: Path, aliexpress_dir: Path
) -> None:
    root = _ali_dir(tmp_path / "ali", aliexpress_dir, **_set("numerical_5", 3, "abc"))
    with pytest.raises(DataError) as info:
        aliexpress(root)
    message = str(info.value)
    assert str(root / "train.csv") in message and "'numerical_5'" in message
    assert "numbers" in message and "['abc']" in message and "\n" not in message


def test_census_string_in_numeric_column_gives_an_example(tmp_path: Path) -> None:
    text = _census_text(20).splitlines()
    fields = text[5].split(", ")
    fields[CENSUS_COLUMNS.index("age")] = "forty"
    text[5] = ", ".join(fields)
    path = tmp_path / "census.csv"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"'age': \['forty'\]"):
        load_source("census_income", path=path)


def test_inferred_integer_column_with_a_late_string_names_the_column(tmp_path: Path) -> None:
    path = tmp_path / "joined.csv"
    path.write_text("a,b\n" + "1,2\n" * 50 + "oops,3\n")
    with pytest.raises(DataError, match=r"column 'a' must hold integers .* \['oops'\]"):
        read_table(path, "data file", infer_schema_length=10)


# ----------------------------------------------- 3. a categorical id too large for int64
def test_aliexpress_id_beyond_int64_names_column_and_value(
    tmp_path: Path, aliexpress_dir: Path
) -> None:
    big = "99999999999999999999"
    root = _ali_dir(tmp_path / "ali", aliexpress_dir, **_set("categorical_3", 7, big))
    with pytest.raises(DataError, match=rf"'categorical_3'.*'{big}' is out of the int64 range"):
        aliexpress(root)


@pytest.mark.parametrize("dtype", [pl.UInt64, pl.Int128])
def test_user_ids_beyond_int64_are_encoded(dtype: pl.DataType) -> None:
    huge = 2**64 - 1 if dtype == pl.UInt64 else 10**20
    df = pl.DataFrame(
        {
            "u": pl.Series([1, huge, huge], dtype=dtype),
            "c": pl.Series([5, 10**20, 5], dtype=pl.Int128),
            "y": [0, 1, 1],
        }
    )
    fitted = fit_features(
        df, labels={"y": "binary"}, categorical=["c"], numeric=[], user_column="u"
    )
    tensors = encode(df, fitted)
    assert tensors.user_B is not None
    users = tensors.user_B.tolist()
    assert users[1] == users[2] != users[0]
    assert tensors.cat_BF[:, 0].tolist() == [2, 1, 2]  # "10**20" sorts before "5"


# ------------------------------------------------------ 4. row limits and embedding width
@pytest.mark.parametrize("n_rows", [-5, 0])
def test_nonpositive_n_rows_is_refused(n_rows: int, aliexpress_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"source_kwargs.n_rows .*'aliexpress'.* got {n_rows}"):
        load_source("aliexpress", path=aliexpress_dir, n_rows=n_rows)
    with pytest.raises(ValueError, match=rf"n_rows must be a positive integer .* got {n_rows}"):
        aliexpress(aliexpress_dir, n_rows=n_rows)
    path = tmp_path / "census.csv"
    path.write_text(_census_text(10))
    with pytest.raises(ValueError, match=r"source_kwargs.n_rows of data source 'census_income'"):
        load_source("census_income", path=path, n_rows=n_rows)
    with pytest.raises(ValueError, match=r"n_rows must be a positive integer"):
        kuairand(tmp_path, n_rows=n_rows)


@pytest.mark.parametrize("embed_dim", [0, -3])
def test_nonpositive_embed_dim_is_refused(embed_dim: int) -> None:
    with pytest.raises(
        ValueError, match=rf"embed_dim must be a positive integer .*got {embed_dim}"
    ):
        RecDataModule(source="synthetic_ctr", source_kwargs=SYNTHETIC, embed_dim=embed_dim)
    train = pl.DataFrame({"c": ["a", "b"], "y": [0, 1]})
    with pytest.raises(ValueError, match=r"embed_dim\['c'\] must be a positive integer"):
        fit_features(train, labels={"y": "binary"}, embed_dim={"c": 0})


def test_cli_refuses_embed_dim_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "data.embed_dim=0", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "embed_dim must be a positive integer" in err[-1]


# ----------------------------------------------------------------- 5. duplicate labels
def test_duplicate_labels_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels lists \['click'\] more than once"):
        RecDataModule(source="synthetic_ctr", source_kwargs=SYNTHETIC, labels=["click", "click"])
    with pytest.raises(ValueError, match=r"categorical lists \['device'\] more than once"):
        RecDataModule(
            source="synthetic_ctr", source_kwargs=SYNTHETIC, categorical=["device", "device"]
        )
    with pytest.raises(ValueError, match=r"tasks lists \['is_click'\] more than once"):
        kuairand("unused", tasks=["is_click", "is_click"])


def test_cli_refuses_duplicate_census_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "census.csv"
    path.write_text(_census_text(10))
    rc = main(
        [
            "train",
            "data=census_income",
            f"data.path={path}",
            "data.labels=[income,income]",
            f"output_dir={tmp_path / 'r'}",
        ]
    )
    assert rc == 2 and "labels lists ['income'] more than once" in capsys.readouterr().err


# ---------------------------------------------------- 6. conversions without clicks
def _orphan_conversions(tmp_path: Path, sample: Path) -> Path:
    edits = {
        "conversion": pl.when(pl.int_range(pl.len()).is_in([4, 9]))
        .then(pl.lit("1"))
        .otherwise(pl.col("conversion")),
        "click": pl.when(pl.int_range(pl.len()).is_in([4, 9]))
        .then(pl.lit("0"))
        .otherwise(pl.col("click")),
    }
    return _ali_dir(tmp_path / "ali", sample, **edits)


def test_declared_ctcvr_cascade_refuses_conversions_without_clicks(
    tmp_path: Path, aliexpress_dir: Path
) -> None:
    root = _orphan_conversions(tmp_path, aliexpress_dir)
    aliexpress(root)  # without the cascade declared, the rows are ordinary labels
    with pytest.raises(DataError, match=r"train.csv: 2 of 100 rows have conversion=1 but click=0"):
        aliexpress(root, add_ctcvr=True)


def test_ali_ccp_declared_cascade_refuses_purchases_without_clicks(tmp_path: Path) -> None:
    df = pl.DataFrame(
        {"click": [1, 0, 0, 1], "purchase": [1, 1, 0, 0], "101": [1, 2, 3, 4], "D508": [0.0] * 4}
    )
    df.write_csv(tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"1 of 4 rows have purchase=1 but click=0"):
        load_source("ali_ccp", path=tmp_path, add_ctcvr=True)


def test_esmm_refuses_conversions_without_clicks(tmp_path: Path, aliexpress_dir: Path) -> None:
    root = _orphan_conversions(tmp_path, aliexpress_dir)
    cfg = compose_config(
        "train",
        [
            "data=aliexpress",
            f"data.path={root}",
            "data.split_seed=0",
            "model=esmm",
            "model.ctr_task=click",
            "model.ctcvr_task=conversion",
            "model.tower_hidden=[8]",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    dm = build_datamodule(cfg)  # the data alone is fine: MMoE may learn these labels
    with pytest.raises(DataError, match=r"split of aliexpress: \d+ of \d+ rows have conversion=1"):
        build_net(cfg, dm)
    # The same data is accepted once the orphan conversions are dropped.
    clean = tmp_path / "clean"
    clean.mkdir()
    train = pl.read_csv(root / "train.csv")
    train.filter(~((pl.col("conversion") == 1) & (pl.col("click") == 0))).write_csv(
        clean / "train.csv"
    )
    shutil.copy(root / "test.csv", clean / "test.csv")
    cfg.data.path = str(clean)
    build_net(cfg, build_datamodule(cfg))


# ------------------------------------------- 7. a split whose ids are all unseen in train
def test_split_with_all_ids_unseen_warns_once_naming_the_column(
    tmp_path: Path, aliexpress_dir: Path
) -> None:
    root = _ali_dir(tmp_path / "ali", aliexpress_dir)
    test = pl.read_csv(root / "test.csv")
    test.with_columns(pl.col("categorical_2") + 10**9).write_csv(root / "test.csv")
    dm = RecDataModule(source="aliexpress", path=str(root), batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    unseen = [w for w in caught if issubclass(w.category, UnseenCategoriesWarning)]
    assert len(unseen) == 1
    message = str(unseen[0].message)
    assert message.startswith("test split of aliexpress") and "['categorical_2']" in message
    assert dm.tensors("test").cat_BF[:, 1].eq(0).all()


def test_no_warning_when_some_ids_are_known(aliexpress_dir: Path) -> None:
    dm = RecDataModule(source="aliexpress", path=str(aliexpress_dir), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenCategoriesWarning)
        dm.setup("fit")


def test_helpers_leave_good_files_alone(tmp_path: Path) -> None:
    path = tmp_path / "ok.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,2.5\n3,4\n"))
    want = pl.DataFrame({"a": [1, 3], "b": [2.5, 4.0]})
    assert_frame_equal(read_table(path, "data file"), want)
