"""data=table: any CSV/TSV/Parquet/NDJSON file, folder or glob trains with no code.

Files are generated in tmp_path; models are tiny and runs single-threaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtl.cli import main
from mtl.data.sources import load_source
from mtl.data.sources.table import table
from mtl.data.table_datamodule import TableDataModule
from mtl.data.validation import DataError

FAST = ["trainer.enable_progress_bar=false", "num_threads=1", "trainer.max_epochs=1"]
COLUMNS = [
    "data.labels=[click,like]",
    "data.categorical=[user_id,item_id]",
    "data.numeric=[price]",
    "data.user=user_id",
    "data.batch_size=256",
]


def _clicks(n: int = 2000, seed: int = 0) -> pl.DataFrame:
    """A click log whose labels depend on the item, with shuffled integer times."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 40, n)
    price = rng.normal(size=n)
    click = (rng.random(n) < 0.15 + 0.5 * (item % 4 == 0)).astype(np.int8)
    return pl.DataFrame(
        {
            "ts": rng.permutation(n) + 1_700_000_000,
            "user_id": rng.integers(0, 60, n),
            "item_id": [f"i{v}" for v in item],
            "price": price,
            "click": click,
            "like": click * (rng.random(n) < 0.4).astype(np.int8),
            "watch_s": rng.exponential(30.0, n),
        }
    )


def _write(df: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.write_parquet(path)
    elif path.suffix == ".ndjson":
        df.write_ndjson(path)
    else:
        df.write_csv(path, separator="\t" if path.suffix == ".tsv" else ",")
    return path


@pytest.mark.parametrize(
    ("model", "name", "extra"),
    [
        ("mmoe", "log.csv", ["model.expert_hidden=[16]", "model.num_experts=2"]),
        (
            "home",
            "log.parquet",
            ["model.expert_hidden=[16]", "model.lora_rank=4", "model.tower_hidden=[8]"],
        ),
    ],
)
def test_mmoe_and_home_train_through_mtl_train_data_table(
    tmp_path: Path, model: str, name: str, extra: list[str]
) -> None:
    path = _write(_clicks(), tmp_path / name)
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "data=table",
            f"data.path={path}",
            *COLUMNS,
            f"model={model}",
            *extra,
            f"output_dir={out}",
            *FAST,
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "table" and metrics["tasks"] == {"click": "binary", "like": "binary"}
    assert {"auc/click", "gauc/click"} <= set(metrics["test"])
    split = metrics["split"]
    assert split["rows"] == {"train": 1600, "val": 200, "test": 200}
    assert split["how"] == "random 0.8/0.1/0.1 split (split_seed 0)"
    assert split["files"] == {"rows": [str(path)]}


def test_time_split_puts_the_latest_rows_in_test(tmp_path: Path) -> None:
    df = _clicks(1000)
    path = _write(df, tmp_path / "log.csv")
    data = table(path, labels=["click"], categorical=["item_id"], split_by="ts")
    assert data.val is not None and data.test is not None
    assert (data.train.height, data.val.height, data.test.height) == (800, 100, 100)
    assert (
        data.train["ts"].max()
        < data.val["ts"].min()
        <= data.val["ts"].max()
        < data.test["ts"].min()
    )
    assert sorted(data.test["ts"].to_list()) == sorted(df["ts"].to_list())[-100:]

    dm = TableDataModule(
        path=str(path), labels=["click"], categorical=["item_id"], split_by="ts", batch_size=64
    )
    dm.setup("fit")
    summary = dm.split_summary()
    assert summary["how"].startswith("by time on 'ts': the earliest 0.8 of the rows train")
    assert summary["rows"] == {"train": 800, "val": 100, "test": 100}
    assert int(summary["time_range"]["test"][0]) > int(summary["time_range"]["val"][1])


def test_time_split_on_datetime_text_and_a_test_file(tmp_path: Path) -> None:
    df = _clicks(500).with_columns(pl.from_epoch("ts").dt.strftime("%Y-%m-%d %H:%M:%S").alias("ts"))
    rows = _write(df.head(400), tmp_path / "rows.csv")
    test = _write(df.tail(100), tmp_path / "test.csv")
    data = table(rows, labels=["click"], numeric=["price"], test=test, split_by="ts")
    assert data.test is not None and data.test.height == 100
    assert data.val is not None and data.val.height == round(400 * 0.1 / 0.9)
    assert data.train["ts"].max() < data.val["ts"].min()


def test_missing_column_is_one_line_listing_the_file_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(_clicks(200), tmp_path / "log.csv")
    rc = main(
        [
            "train",
            "data=table",
            f"data.path={path}",
            "data.labels=[click,conversion]",
            "data.categorical=[item_id]",
            f"output_dir={tmp_path / 'run'}",
            *FAST,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{path}: missing column 'conversion' (data.labels)" in err
    assert (
        "the file has columns ['ts', 'user_id', 'item_id', 'price', 'click', 'like', 'watch_s']"
        in err
    )


def test_mistyped_columns_name_the_column_and_key(tmp_path: Path) -> None:
    df = _clicks(200)
    path = _write(df.with_columns(pl.col("price").cast(pl.String) + "$"), tmp_path / "log.parquet")
    with pytest.raises(
        DataError,
        match=r"log.parquet: numeric feature 'price' must be a numeric column, got dtype String",
    ):
        table(path, labels=["click"], numeric=["price"])
    csv = _write(df.with_columns(pl.col("price").cast(pl.String) + "$"), tmp_path / "log.csv")
    with pytest.raises(
        DataError, match=r"log.csv: column 'price' must hold numbers .* do not parse"
    ):
        table(csv, labels=["click"], numeric=["price"])
    with pytest.raises(
        DataError, match=r"label column 'watch_s' must be binary 0/1.*data.task_kinds"
    ):
        table(csv, labels=["watch_s"], categorical=["item_id"])
    with pytest.raises(
        DataError, match=r"time column 'item_id' \(data.split_by\) must hold numbers"
    ):
        table(csv, labels=["click"], categorical=["user_id"], split_by="item_id")


def test_folder_and_glob_of_several_files_are_read(tmp_path: Path) -> None:
    df = _clicks(900)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, suffix in enumerate((".csv", ".parquet", ".ndjson")):
        _write(df.slice(300 * i, 300), folder / f"part-{i}{suffix}")
    (folder / "_SUCCESS").write_text("")
    kwargs = {"labels": ["click"], "categorical": ["user_id", "item_id"], "numeric": ["price"]}
    whole = table(folder, **kwargs)
    assert whole.train.height == 900
    assert whole.train["item_id"].to_list() == df["item_id"].to_list()
    assert whole.train.columns == ["click", "user_id", "item_id", "price"]
    globbed = table(folder / "part-*.parquet", **kwargs)
    assert globbed.train.height == 300
    assert globbed.train["price"].to_list() == pytest.approx(df["price"][300:600].to_list())
    with pytest.raises(FileNotFoundError, match=r"data.path: no file matches .*nothing-\*.csv"):
        table(folder / "nothing-*.csv", **kwargs)


def test_separate_files_tsv_nulls_and_regression(tmp_path: Path) -> None:
    df = _clicks(600).with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0)
        .then(None)
        .otherwise(pl.col("price"))
        .alias("price")
    )
    files = {}
    for name, part in (
        ("train", df.head(400)),
        ("val", df.slice(400, 100)),
        ("test", df.tail(100)),
    ):
        path = tmp_path / f"{name}.tsv"
        part.write_csv(path, separator="|", null_value="NA")
        files[name] = str(path)
    dm = TableDataModule(
        **files,
        labels=["click", "watch_s"],
        task_kinds=["binary", "regression"],
        categorical=["item_id"],
        numeric=["price"],
        separator="|",
        null_values=["NA"],
        fill_numeric_nulls=0.0,
        embed_dim={"item_id": 3},
        batch_size=64,
    )
    dm.setup("fit")
    assert [len(dm.tensors(s)) for s in ("train", "val", "test")] == [400, 100, 100]
    assert [t.kind for t in dm.spec.tasks] == ["binary", "regression"]
    assert dm.spec.categorical[0].embed_dim == 3
    assert dm.split_summary()["how"] == "train, val and test from their own files"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    path = _write(_clicks(100), tmp_path / "log.csv")
    with pytest.raises(ValueError, match=r"data=table needs data.labels"):
        TableDataModule(path=str(path), categorical=["item_id"])
    with pytest.raises(ValueError, match=r"data.embed_dim names \['price'\]"):
        TableDataModule(
            path=str(path), labels=["click"], categorical=["item_id"], embed_dim={"price": 4}
        )
    with pytest.raises(ValueError, match=r"data.task_kinds\['click'\] must be one of"):
        load_source("table", path=path, labels=["click"], task_kinds={"click": "ordinal"})
    with pytest.raises(ValueError, match=r"column 'click' is in data.labels and data.numeric"):
        table(path, labels=["click"], numeric=["click"])
    with pytest.raises(FileNotFoundError, match=r"data.path: file or folder not found"):
        table(tmp_path / "nope.csv", labels=["click"])


def test_table_config_keys_are_module_arguments() -> None:
    import inspect

    from omegaconf import OmegaConf

    from mtl.data.datamodule import RecDataModule

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "data" / "table.yaml")
    assert cfg._target_ == "mtl.data.table_datamodule.TableDataModule"
    params = set(inspect.signature(TableDataModule.__init__).parameters)
    params |= set(inspect.signature(RecDataModule.__init__).parameters)
    keys = set(cfg.keys()) - {"_target_"}
    assert keys <= params - {"self", "kwargs", "source", "source_kwargs", "use_source_test"}
