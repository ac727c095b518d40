"""The dataset presets over the table source (``conf/data/aliexpress.yaml``, ``ali_ccp.yaml``):
they name the columns of the files the dataset recipes write, read the same rows and split as
the dataset loaders, encode the same in memory and as ``mtl prepare`` shards, and train."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.cli import main
from mtl.data.datamodule import SPLITS, RecDataModule
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.scan import TableQuery, scan_files, split_column
from mtl.data.sources.aliexpress import (
    ALIEXPRESS_CATEGORICAL,
    ALIEXPRESS_LABELS,
    ALIEXPRESS_NUMERIC,
)
from mtl.data.sources.table import split_files
from mtl.training.config import compose_config

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
FAST = ["trainer.enable_progress_bar=false", "num_threads=1"]
SMALL_MMOE = [
    "model=mmoe",
    "model.num_experts=2",
    "model.expert_hidden=[16]",
    "model.tower_hidden=[8]",
]


def _data_config(overrides: list[str]) -> dict[str, Any]:
    data = OmegaConf.to_container(compose_config("train", overrides).data, resolve=True)
    assert isinstance(data, dict)
    return data


def _preset(name: str, *overrides: str) -> RecDataModule:
    dm = instantiate(compose_config("train", [f"data={name}", *overrides]).data)
    dm.setup("fit")
    return dm


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _rate(rows: list[dict[str, str]], label: str) -> float:
    return sum(int(r[label]) for r in rows) / len(rows)


def _sorted_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.lexsort(matrix.T[::-1])]


def _assert_same_encoding(mem: RecDataModule, shards: ShardsDataModule) -> None:
    """Same vocabularies, numeric statistics and encoded rows (as multisets) in every split."""
    a, b = mem.fitted, shards.fitted
    assert b.spec.categorical == a.spec.categorical and b.spec.tasks == a.spec.tasks
    assert b.spec.user_column == a.spec.user_column
    for name, vocab in a.vocabularies.items():
        assert b.vocabularies[name].to_list() == vocab.to_list(), name
    for x, y in zip(b.spec.numeric, a.spec.numeric, strict=True):
        assert x.name == y.name
        assert x.mean == pytest.approx(y.mean, rel=1e-12) and x.std == pytest.approx(
            y.std, rel=1e-12
        )
    cols = shards.columns()
    for split in SPLITS:
        t = mem.tensors(split)
        frame = pl.read_parquet(shards.path / split / "*.parquet")
        assert frame.height == len(t) == shards.rows(split), split
        shard = frame.select(*cols.cat, *cols.num, *cols.labels).to_numpy().astype(np.float64)
        ours = np.concatenate([t.cat_BF.numpy(), t.num_BF.numpy(), t.labels_BT.numpy()], axis=1)
        np.testing.assert_allclose(
            _sorted_rows(shard), _sorted_rows(ours.astype(np.float64)), rtol=1e-6, atol=1e-6
        )


# ----------------------------------------------------------------------- split_files
def test_a_folder_with_file_names_inside_it(tmp_path: Path) -> None:
    assert split_files(tmp_path, train="a.csv", test="sub/b.csv") == {
        "train": str(tmp_path / "a.csv"),
        "test": str(tmp_path / "sub/b.csv"),
    }
    assert split_files("rows.csv", val="v.csv") == {"path": "rows.csv", "val": "v.csv"}
    with pytest.raises(FileNotFoundError, match=f"data.path: folder not found: {tmp_path / 'x'} "):
        split_files(tmp_path / "x", train="a.csv")
    (tmp_path / "f.csv").write_text("a\n1\n")
    with pytest.raises(FileNotFoundError, match=r"f\.csv is not a folder; with data\.train=a\.csv"):
        split_files(tmp_path / "f.csv", train="a.csv")
    with pytest.raises(ValueError, match=r"needs data\.path"):
        split_files(None, test="t.csv")


# ------------------------------------------------------------------------ AliExpress
def test_aliexpress_preset_names_the_files_columns_and_splits_as_the_loader(
    aliexpress_dir: Path,
) -> None:
    data = _data_config(["data=aliexpress", f"data.path={aliexpress_dir}"])
    header = next(csv.reader((aliexpress_dir / "train.csv").open()))
    assert data["categorical"] == list(ALIEXPRESS_CATEGORICAL)
    assert data["numeric"] == list(ALIEXPRESS_NUMERIC)
    assert data["labels"] == list(ALIEXPRESS_LABELS)
    assert set(header) == {"search_id", *data["categorical"], *data["numeric"], *data["labels"]}

    dm = _preset("aliexpress", f"data.path={aliexpress_dir}", "data.batch_size=32")
    loader = RecDataModule(source="aliexpress", path=str(aliexpress_dir), batch_size=32)
    loader.setup("fit")
    assert dm.source == "aliexpress"  # messages and run records name the dataset
    for split in SPLITS:  # the same rows in each split: test.csv whole, val 1/9 of train.csv
        assert dm.origin[split] == loader.origin[split]
        np.testing.assert_array_equal(dm.row_index[split], loader.row_index[split])
        np.testing.assert_array_equal(
            dm.tensors(split).labels_BT.numpy(), loader.tensors(split).labels_BT.numpy()
        )
        np.testing.assert_allclose(
            dm.tensors(split).num_BF.numpy(), loader.tensors(split).num_BF.numpy(), rtol=1e-6
        )
    # ids are read as text by the preset and as integers by the loader: one code per id each
    raw = _csv_rows(aliexpress_dir / "test.csv")
    codes = dm.tensors("test").cat_BF.numpy()
    for j, name in enumerate(ALIEXPRESS_CATEGORICAL):
        vocab = dm.fitted.vocabularies[name].to_list()
        seen = [vocab[c - 1] if c else None for c in codes[:, j]]
        assert all(s is None or s == r[name] for s, r in zip(seen, raw, strict=True)), name
    record = dm.split_summary()
    assert record["rows"] == {"train": 89, "val": 11, "test": 100}
    assert record["files"] == {
        "rows": [str(aliexpress_dir / "train.csv")],
        "test": [str(aliexpress_dir / "test.csv")],
    }
    assert record["positive_rate"]["click"]["test"] == pytest.approx(_rate(raw, "click"))


def test_aliexpress_prepare_encodes_like_the_in_memory_preset(
    aliexpress_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    assert main(["prepare", "data=aliexpress", f"data.path={aliexpress_dir}", f"out={out}"]) == 0
    shards = ShardsDataModule(path=out)
    # The shards carve val by a hash of the row index: give the in-memory preset the same rows.
    data = _data_config(["data=aliexpress", f"data.path={aliexpress_dir}"])
    query = TableQuery.from_config(data)
    _, lf = scan_files(aliexpress_dir / "train.csv", query, key="train")
    fracs = dict(zip(SPLITS, data["split"], strict=True))
    code = split_column(lf, carved=["val"], fractions=fracs, split_by=None, seed=0, origin="t")
    split = lf.select(code.alias("s")).collect()["s"].to_numpy()
    raw = pl.read_csv(aliexpress_dir / "train.csv", infer_schema=False)  # the text as it is
    mem_dir = tmp_path / "mem"
    mem_dir.mkdir()
    raw.filter(split == 0).write_csv(mem_dir / "train.csv")
    raw.filter(split == 1).write_csv(mem_dir / "val.csv")
    shutil.copy(aliexpress_dir / "test.csv", mem_dir / "test.csv")
    mem = _preset("aliexpress", f"data.path={mem_dir}", "data.val=val.csv")
    assert 0 < int((split == 1).sum()) < raw.height
    _assert_same_encoding(mem, shards)
    assert shards.split_summary()["how"].startswith(f"aliexpress {aliexpress_dir / 'train.csv'}")


def test_aliexpress_preset_trains_mmoe_in_memory_and_from_shards(
    aliexpress_dir: Path, tmp_path: Path
) -> None:
    test_rows = _csv_rows(aliexpress_dir / "test.csv")
    shards = tmp_path / "shards"
    assert main(["prepare", "data=aliexpress", f"data.path={aliexpress_dir}", f"out={shards}"]) == 0
    runs = {
        "memory": ["data=aliexpress", f"data.path={aliexpress_dir}"],
        "shards": ["data=shards", f"data.path={shards}"],
    }
    for name, data in runs.items():
        out = tmp_path / name
        common = ["data.batch_size=16", "trainer.max_epochs=1", f"output_dir={out}"]
        assert main(["train", *data, *common, *SMALL_MMOE, *FAST]) == 0, name
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["model"] == "mmoe" and metrics["global_step"] > 0
        record = metrics["split"]
        assert record["rows"]["test"] == len(test_rows)
        assert record["rows"]["train"] + record["rows"]["val"] == 100
        for task in ALIEXPRESS_LABELS:
            assert record["positive_rate"][task]["test"] == pytest.approx(_rate(test_rows, task))
        assert 0.0 <= metrics["test"]["auc/click"] <= 1.0
    assert json.loads((tmp_path / "memory" / "metrics.json").read_text())["data"] == "aliexpress"


# --------------------------------------------------------------------------- Ali-CCP
def _recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", DATASETS / name / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ali_ccp_split(columns: list[str], n: int, offset: int) -> pl.DataFrame:
    i = np.arange(offset, offset + n)
    cols: dict[str, Any] = {
        "click": (i % 3 == 0).astype(int),
        "purchase": (i % 9 == 0).astype(int),
    }
    for k, name in enumerate(columns[2:]):
        if name.startswith("D"):
            cols[name] = (i % (k + 2)).astype(float) / 4
        else:  # ids, some absent (empty) as prepare.py writes them
            cols[name] = [None if (j + k) % 17 == 0 else str((j * (k + 3)) % 23) for j in i]
    return pl.DataFrame(cols).select(columns)


def test_ali_ccp_preset_reads_the_recipes_files_in_memory_and_as_shards(tmp_path: Path) -> None:
    columns = list(_recipe("ali_ccp").OUTPUT_COLUMNS)
    data = _data_config(["data=ali_ccp", f"data.path={tmp_path}"])
    assert [*data["labels"], *data["categorical"], *data["numeric"]] == columns
    assert data["user"] == "101" and all(isinstance(c, str) for c in data["categorical"])
    root = tmp_path / "ali_ccp"
    root.mkdir()
    sizes = {"train": 300, "val": 60, "test": 90}
    offset = 0
    for split, n in sizes.items():
        _ali_ccp_split(columns, n, offset).write_csv(root / f"ali_ccp_{split}.csv")
        offset += n
    mem = _preset("ali_ccp", f"data.path={root}")
    assert mem.source == "ali_ccp" and mem.spec.user_column == "101"
    assert {s: len(mem.tensors(s)) for s in SPLITS} == sizes  # the files' own splits
    loader = RecDataModule(source="ali_ccp", path=str(root), embed_dim=16)
    loader.setup("fit")
    assert loader.spec.categorical == mem.spec.categorical  # the loader infers the same roles
    for split in SPLITS:
        np.testing.assert_array_equal(
            mem.tensors(split).cat_BF.numpy(), loader.tensors(split).cat_BF.numpy()
        )
    out = tmp_path / "shards"
    assert main(["prepare", "data=ali_ccp", f"data.path={root}", f"out={out}"]) == 0
    _assert_same_encoding(mem, ShardsDataModule(path=out))
