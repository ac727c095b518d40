"""AliExpress (shared sample), Ali-CCP and KuaiRand (tiny layouts in tmp_path), validation, registry."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from mtl.data.sources import SOURCES, load_source
from mtl.data.sources.aliexpress import aliexpress
from mtl.data.sources.kuairand import kuairand
from mtl.data.validation import DataError


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, df: pl.DataFrame) -> Path:
    df.write_csv(path)
    return path


def test_aliexpress_sample_matches_raw_file(aliexpress_dir: Path) -> None:
    data = aliexpress(aliexpress_dir)
    raw = _csv_rows(aliexpress_dir / "train.csv")
    assert (
        data.train.height == len(raw) == 100 and data.test is not None and data.test.height == 100
    )
    for i in (0, 17, 99):
        row = data.train.row(i, named=True)
        assert row["click"] == int(raw[i]["click"]) and row["conversion"] == int(
            raw[i]["conversion"]
        )
        assert row["categorical_5"] == int(raw[i]["categorical_5"])
        assert row["numerical_9"] == pytest.approx(float(raw[i]["numerical_9"]))
    assert len(data.roles.categorical) == 16 and len(data.roles.numeric) == 63
    assert data.roles.labels == {"click": "binary", "conversion": "binary"}
    assert "search_id" not in data.roles.categorical + data.roles.numeric
    with_ctcvr = aliexpress(aliexpress_dir, add_ctcvr=True)
    df = with_ctcvr.train
    assert df["ctcvr"].to_list() == (df["click"] * df["conversion"]).to_list()
    assert list(with_ctcvr.roles.labels) == ["click", "conversion", "ctcvr"]


def test_aliexpress_validation_errors(aliexpress_dir: Path, tmp_path: Path) -> None:
    raw = pl.read_csv(aliexpress_dir / "train.csv")
    with pytest.raises(FileNotFoundError, match=r"AliExpress directory not found: .*missing_dir"):
        aliexpress(tmp_path / "missing_dir")
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(ValueError, match=r"AliExpress file is empty: .*train.csv"):
        aliexpress(tmp_path)
    _write(tmp_path / "train.csv", raw.drop("conversion"))
    with pytest.raises(
        ValueError, match=r"train.csv: missing label column 'conversion' \(expected binary 0/1\)"
    ):
        aliexpress(tmp_path)
    _write(
        tmp_path / "train.csv",
        raw.with_columns(
            pl.when(pl.int_range(pl.len()) < 3).then(2).otherwise(pl.col("click")).alias("click")
        ),
    )
    with pytest.raises(
        ValueError, match=r"label column 'click' must be binary 0/1 but has 3 other values .*\[2\]"
    ):
        aliexpress(tmp_path)
    nulls = raw.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0)
        .then(None)
        .otherwise(pl.col("numerical_3"))
        .alias("numerical_3")
    )
    _write(tmp_path / "train.csv", nulls)
    with pytest.raises(
        ValueError,
        match=r"numeric feature 'numerical_3' has 10 null/NaN values.*fill_numeric_nulls",
    ):
        aliexpress(tmp_path)
    filled = aliexpress(tmp_path, fill_numeric_nulls=0.0).train
    assert filled["numerical_3"].null_count() == 0 and filled["numerical_3"][0] == 0.0
    assert filled.height == 100 and filled.height == raw.height  # no test.csv here: train only
    _write(tmp_path / "train.csv", raw.with_columns(pl.lit("n/a").alias("numerical_4")))
    with pytest.raises(DataError, match=r"column 'numerical_4' must hold numbers .* \['n/a'\]"):
        aliexpress(tmp_path)


def _ali_ccp_frame(n: int, offset: int = 0) -> pl.DataFrame:
    i = pl.int_range(offset, offset + n, eager=True)
    return pl.DataFrame(
        {
            "click": (i % 3 == 0).cast(pl.Int64),
            "purchase": (i % 9 == 0).cast(pl.Int64),
            "101": i % 7,
            "205": i % 11,
            "206": i % 4,
            "D109_14": i.cast(pl.Float64) / 10,
            "D508": (i % 5).cast(pl.Float64),
        }
    )


def test_ali_ccp_layout(tmp_path: Path) -> None:
    _write(tmp_path / "ali_ccp_train.csv", _ali_ccp_frame(60))
    _write(tmp_path / "ali_ccp_val.csv", _ali_ccp_frame(20, 60))
    _write(tmp_path / "ali_ccp_test.csv", _ali_ccp_frame(30, 80))
    data = load_source("ali_ccp", path=tmp_path, add_ctcvr=True)
    assert (data.train.height, data.val.height, data.test.height) == (60, 20, 30)  # type: ignore[union-attr]
    assert data.roles.categorical == ["101", "205", "206"]
    assert data.roles.numeric == ["D109_14", "D508"]
    assert data.roles.labels == {"click": "binary", "purchase": "binary", "ctcvr": "binary"}
    assert data.roles.user_column == "101"
    assert data.train["101"].dtype == pl.String  # ids read as text, not floats
    assert data.test["purchase"].to_list() == _ali_ccp_frame(30, 80)["purchase"].to_list()  # type: ignore[index]
    assert data.train["ctcvr"].sum() == 7  # rows 0, 9, ..., 54: i % 9 == 0 implies i % 3 == 0


def test_ali_ccp_conversion_alias_and_missing_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Ali-CCP train file"):
        load_source("ali_ccp", path=tmp_path)
    _write(tmp_path / "train.csv", _ali_ccp_frame(30).rename({"purchase": "conversion"}))
    data = load_source("ali_ccp", path=tmp_path)
    assert "purchase" in data.train.columns and data.val is None and data.test is None


def _kuairand_dir(root: Path) -> Path:
    users = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "user_active_degree": ["high_active", "full_active", "UNKNOWN"],
            "follow_user_num": [10, 0, 3],
            "fans_user_num": [1, 2, 3],
            "register_days": [100, 5, 30],
            "onehot_feat0": [0, 1, None],
        }
    )
    videos = pl.DataFrame(
        {
            "video_id": [10, 20],
            "author_id": [7, 8],
            "video_type": ["NORMAL", "AD"],
            "tag": ["28", "10,28"],
            "video_duration": [None, 5000.0],
        }
    )
    log = {
        "user_id": [1, 2, 3, 1],
        "video_id": [10, 20, 10, 20],
        "hourmin": [1500, 900, 2300, 100],
        "time_ms": [0, 1, 2, 3],
        "is_click": [1, 0, 1, 1],
        "is_like": [0, 0, 1, 0],
        "is_follow": [0, 0, 0, 1],
        "is_comment": [0, 0, 0, 0],
        "is_forward": [0, 0, 0, 0],
        "is_hate": [0, 0, 0, 0],
        "long_view": [1, 0, 0, 1],
        "play_time_ms": [9000, 0, 100, 8000],
        "duration_ms": [10000, 5000, 10000, 5000],
        "tab": [1, 2, 1, 4],
    }
    first = pl.DataFrame({**log, "date": [20220410, 20220415, 20220420, 20220421]})
    second = pl.DataFrame({k: v[:2] for k, v in log.items()} | {"date": [20220501, 20220505]})
    _write(root / "user_features_pure.csv", users)
    _write(root / "video_features_basic_pure.csv", videos)
    _write(root / "log_standard_4_08_to_4_21_pure.csv", first)
    _write(root / "log_standard_4_22_to_5_08_pure.csv", second)
    _write(root / "log_random_4_22_to_5_08_pure.csv", second)  # must be ignored
    return root


def test_kuairand_join_and_temporal_split(tmp_path: Path) -> None:
    data = kuairand(_kuairand_dir(tmp_path), tasks=("is_click", "long_view", "is_like"))
    assert data.train.height == 4 and data.test is not None and data.test.height == 2
    assert data.roles.labels == {"is_click": "binary", "long_view": "binary", "is_like": "binary"}
    assert data.roles.user_column == "user_id"
    features = data.roles.categorical + data.roles.numeric
    assert "play_time_ms" not in features and "video_duration" not in features  # leak / null-prone
    assert {"user_id", "video_id", "hour", "user_active_degree", "tag", "author_id"} <= set(
        data.roles.categorical
    )
    row = data.train.row(2, named=True)  # user 3 watched video 10 at 23:00
    assert (row["user_active_degree"], row["hour"], row["tag"]) == ("UNKNOWN", 23, "28")
    assert row["duration_ms"] == pytest.approx(9.21044, rel=1e-5)  # log1p(10000)
    assert data.train["is_like"].to_list() == [0, 0, 1, 0]
    assert kuairand(tmp_path, test_start_date=None).test is None
    with pytest.raises(ValueError, match="leaves 6 train and 0 test rows"):
        kuairand(tmp_path, test_start_date=20230101)
    with pytest.raises(ValueError, match="unknown KuaiRand tasks"):
        kuairand(tmp_path, tasks=("is_watch",))


def test_kuairand_missing_feature_table(tmp_path: Path) -> None:
    _kuairand_dir(tmp_path)
    (tmp_path / "user_features_pure.csv").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"KuaiRand user features not found: .*user_features_pure\.csv"
    ):
        kuairand(tmp_path)


def test_registry_knows_every_source_and_rejects_unknown() -> None:
    assert sorted(SOURCES) == [
        "ali_ccp",
        "aliexpress",
        "census_income",
        "kuairand",
        "synthetic_ctr",
        "synthetic_mmoe",
        "table",
    ]
    with pytest.raises(
        ValueError, match=r"unknown data source 'criteo'; known sources: \['ali_ccp', 'aliexpress'"
    ):
        load_source("criteo")


def test_ali_ccp_datamodule_uses_all_three_files(tmp_path: Path) -> None:
    from mtl.data.datamodule import RecDataModule

    _write(tmp_path / "ali_ccp_train.csv", _ali_ccp_frame(60))
    _write(tmp_path / "ali_ccp_val.csv", _ali_ccp_frame(20, 60))
    _write(tmp_path / "ali_ccp_test.csv", _ali_ccp_frame(30, 200))  # ids unseen in train
    dm = RecDataModule(source="ali_ccp", path=str(tmp_path), batch_size=8)
    assert [len(dm.tensors(s)) for s in ("train", "val", "test")] == [60, 20, 30]
    assert [dm.origin[s] for s in ("train", "val", "test")] == ["train", "val", "test"]
    assert dm.spec.user_column == "101" and dm.spec.task_names == ["click", "purchase"]
    # Every field value 200..229 % k also occurs in train (k <= 11), so no OOV for 101/205/206.
    assert (dm.tensors("test").cat_BF > 0).all()
    # Ids are read as text, so the user key is a hash: equal exactly when the raw ids are equal.
    keys = dm.tensors("test").user_B.tolist()  # type: ignore[union-attr]
    raw = [i % 7 for i in range(200, 230)]
    assert len(set(keys)) == len(set(raw)) == len(set(zip(keys, raw, strict=True))) == 7
