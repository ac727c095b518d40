"""Every ranking run records what it trained on: files, rows per split, label rates, the split.

The record (``RecDataModule.split_summary``) goes to ``metrics.json`` (key ``split``),
to the console when a run starts, and to ``results.json``/``report.md`` of ``mtl compare``.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtl.cli import main
from mtl.data.datamodule import SPLITS, RecDataModule
from mtl.data.sources import load_source
from mtl.data.table_datamodule import TableDataModule

SMALL_CTR = [
    "data.source_kwargs.n=2000",
    "data.source_kwargs.n_users=50",
    "data.source_kwargs.n_items=30",
    "data.batch_size=512",
    "model.expert_hidden=[8]",
    "model.tower_hidden=[8]",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


def _check_record(dm: RecDataModule, total: int, frames: dict[str, pl.DataFrame]) -> dict:
    """Rows per split sum to ``total``; each rate is the mean of that split's raw labels."""
    summary = dm.split_summary()
    assert sum(summary["rows"].values()) == total
    assert list(summary["rows"]) == list(SPLITS)
    for task in dm.spec.task_names:
        for split in SPLITS:
            labels = frames[dm.origin[split]][task].to_numpy()[dm.row_index[split]]
            assert summary["rows"][split] == len(labels)
            assert summary["positive_rate"][task][split] == pytest.approx(labels.mean())
    return summary


def _census_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return f.readlines()


def test_synthetic_record_rows_rates_and_split() -> None:
    kwargs = {"n": 1500, "n_users": 40, "n_items": 30, "tasks": ["click", "like"], "seed": 3}
    dm = RecDataModule(source="synthetic_ctr", source_kwargs=kwargs, split_seed=5)
    data = load_source("synthetic_ctr", **kwargs)
    summary = _check_record(dm, 1500, {"train": data.train})
    assert summary["how"] == (
        "synthetic_ctr: 1,500 generated rows (seed 3) split 80/10/10 at random (split_seed 5)"
    )
    assert summary["files"] == {}


def test_regression_tasks_record_the_label_mean() -> None:
    dm = RecDataModule(
        source="synthetic_mmoe", source_kwargs={"n": 500, "d": 4}, split=(0.6, 0.2, 0.2)
    )
    summary = dm.split_summary()
    assert "positive_rate" not in summary
    assert set(summary["label_mean"]) == {"y1", "y2"}
    train = dm.tensors("train").labels_BT[:, 0].double().mean().item()
    assert summary["label_mean"]["y1"]["train"] == pytest.approx(train)
    assert summary["how"].endswith("split 60/20/20 at random (split_seed 0)")


def test_census_test_file_alone_says_it_was_split(census_path: Path) -> None:
    """A folder with only Census's test file: the record says that file was split 80/10/10."""
    dm = RecDataModule(
        source="census_income", path=str(census_path.parent), source_kwargs={"n_rows": 3000}
    )
    data = load_source("census_income", path=str(census_path.parent), n_rows=3000)
    summary = _check_record(dm, 3000, {"train": data.train})
    if not (census_path.parent / "census-income.data.gz").exists():
        assert summary["how"] == (
            f"census: the test file only (no census-income.data.gz in {census_path.parent}) "
            "split 80/10/10 at random (split_seed 0)"
        )
        assert summary["files"] == {"rows": [str(census_path)]}


def test_census_train_and_test_files_record_both(census_path: Path, tmp_path: Path) -> None:
    lines = _census_lines(census_path)
    for name, part in (
        ("census-income.data.gz", lines[:2000]),
        ("census-income.test.gz", lines[2000:2500]),
    ):
        with gzip.open(tmp_path / name, "wt") as f:
            f.writelines(part)
    dm = RecDataModule(source="census_income", path=str(tmp_path), split_seed=2)
    data = load_source("census_income", path=str(tmp_path))
    assert data.test is not None
    summary = _check_record(dm, 2500, {"train": data.train, "test": data.test})
    assert summary["rows"]["test"] == 500
    assert summary["how"] == (
        "census: train from census-income.data.gz, test from census-income.test.gz; "
        "test: the source's own test rows; val: a random 0.111 of the train rows (split_seed 2)"
    )
    assert summary["files"] == {
        "rows": [str(tmp_path / "census-income.data.gz")],
        "test": [str(tmp_path / "census-income.test.gz")],
    }


def test_unused_source_test_rows_are_named(census_path: Path, tmp_path: Path) -> None:
    lines = _census_lines(census_path)
    for name in ("census-income.data.gz", "census-income.test.gz"):
        with gzip.open(tmp_path / name, "wt") as f:
            f.writelines(lines[:400])
    dm = RecDataModule(source="census_income", path=str(tmp_path), use_source_test=False)
    how = dm.split_summary()["how"]
    assert how.endswith(
        "split 80/10/10 at random (split_seed 0); "
        "the source's own test rows unused (use_source_test=false)"
    )


def test_table_record_has_rates_and_keeps_its_split_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 1000
    df = pl.DataFrame(
        {
            "item": [f"i{v}" for v in rng.integers(0, 20, n)],
            "price": rng.normal(size=n),
            "click": (rng.random(n) < 0.3).astype(np.int8),
            "watch": rng.exponential(5.0, n),
        }
    )
    path = tmp_path / "log.csv"
    df.write_csv(path)
    dm = TableDataModule(
        path=str(path),
        labels=["click", "watch"],
        task_kinds={"watch": "regression"},
        categorical=["item"],
        numeric=["price"],
        batch_size=128,
    )
    summary = dm.split_summary()
    assert sum(summary["rows"].values()) == n
    assert summary["how"] == "random 0.8/0.1/0.1 split (split_seed 0)"
    assert summary["files"] == {"rows": [str(path)]}
    for split in SPLITS:
        rows = df[pl.Series(dm.row_index[split])]
        assert summary["positive_rate"]["click"][split] == pytest.approx(rows["click"].mean())
        assert summary["label_mean"]["watch"][split] == pytest.approx(
            rows["watch"].mean(), rel=1e-5
        )


def test_train_writes_and_prints_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mtl.training.train"):
        assert main(["train", *SMALL_CTR, f"output_dir={out}"]) == 0
    record = json.loads((out / "metrics.json").read_text())["split"]
    assert sum(record["rows"].values()) == 2000
    assert set(record["positive_rate"]) == {"click", "like", "conversion"}
    assert record["how"].endswith("split 80/10/10 at random (split_seed 0)")
    said = [r.getMessage() for r in caplog.records if r.name == "mtl.training.train"]
    assert any(m.startswith(f"data synthetic_ctr: {record['how']}; rows train 1,600") for m in said)
    assert any(m.startswith("positive rate (train/val/test): click ") for m in said)


def test_compare_results_and_report_record_the_data(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "models=[mmoe]", "seeds=1", *SMALL_CTR, f"output_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == results["runs"][0]["split"]
    assert sum(results["data"]["rows"].values()) == 2000
    report = (out / "report.md").read_text()
    assert "## Data" in report
    assert f"Split: {results['data']['how']}." in report
    assert "| click positive rate |" in report
