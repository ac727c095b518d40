"""``mtl compare`` on prepared shards: the split is the prepared one, shared by every run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from mtl.cli import main
from mtl.data.shards.datamodule import ShardsDataModule
from mtl.data.shards.prepare import prepare


def test_compare_runs_on_shards(tmp_path: Path) -> None:
    n = 600
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    pl.DataFrame(
        {
            "user": rng.integers(0, 30, n),
            "item": rng.integers(0, 40, n),
            "x": x,
            "click": (x > 0).astype(int),
            "like": rng.integers(0, 2, n),
        }
    ).write_parquet(tmp_path / "rows.parquet")
    data = {
        "path": str(tmp_path / "rows.parquet"),
        "labels": ["click", "like"],
        "categorical": ["user", "item"],
        "numeric": ["x"],
        "user": "user",
        "split_seed": 3,  # not the shuffle seed: compare must keep the prepared split
    }
    shards = tmp_path / "shards"
    prepare(data, shards, row_group_rows=100, log=lambda _: None)
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "models=[mmoe,ple]",
            "seeds=1",
            "data=shards",
            f"data.path={shards}",
            "data.batch_size=128",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in results["runs"]] == [("mmoe", 0), ("ple", 0)]
    dm = ShardsDataModule(path=shards)
    for run in results["runs"]:
        assert run["split"]["rows"] == {s: dm.rows(s) for s in ("train", "val", "test")}
        assert "(split_seed 3)" in run["split"]["how"]
        assert run["test"]["auc/click"] > 0.7  # click follows x: trained on the streamed rows
    assert (out / "report.md").is_file()
