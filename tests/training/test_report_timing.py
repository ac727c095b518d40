"""Training time that compares: each epoch's time recorded by a run, its median reported,
the load average and the run order noted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtl.cli import main
from mtl.training import rec_module, train
from mtl.training.report import models_table, summarise
from mtl.training.timing import median_epoch_time, timing_summary

TINY = [
    "data.source_kwargs.n=1500",
    "data.source_kwargs.n_users=40",
    "data.source_kwargs.n_items=30",
    "data.batch_size=256",
    "model.num_experts=2",
    "model.expert_hidden=[8]",
    "model.tower_hidden=[4]",
    "trainer.enable_progress_bar=false",
    "num_threads=1",
]


def _run(model: str, seed: int, epoch_times: list[float], load: float) -> dict:
    return {
        "model": model,
        "seed": seed,
        "tasks": {"a": "binary"},
        "test": {"auc/a": 0.7},
        "params": {"total": 10, "model": 8},
        "train_time_s": sum(epoch_times),
        "epoch_times_s": epoch_times,
        "epochs": len(epoch_times),
        "diagnostics": None,
        "load_avg": {"start": [load, 1.0, 1.0], "end": [load + 1, 1.0, 1.0]},
    }


def test_a_run_records_the_time_of_each_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock read only by the run's timers, whose i-th reading is i**2 seconds: the
    # recorded times are exact whatever the load, and each difference names its readings.
    readings = iter(float(i * i) for i in range(100))
    clock = SimpleNamespace(perf_counter=lambda: next(readings))
    monkeypatch.setattr(rec_module, "time", clock)
    monkeypatch.setattr(train, "time", clock)
    out = tmp_path / "run"
    assert main(["train", *TINY, "trainer.max_epochs=2", f"output_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # readings: fit start 0, epoch 0 from 1 to 4, epoch 1 from 9 to 16, fit end 25
    assert m["epoch_times_s"] == [4.0 - 1.0, 16.0 - 9.0]
    assert m["train_time_s"] == 25.0 - 0.0  # the whole fit, its epochs inside it


def test_epoch_time_is_the_median_and_unordered_runs_are_noted() -> None:
    runs = [_run("mmoe", 0, [6.0, 2.0, 2.0], 1.0), _run("mmoe", 1, [6.0, 3.0, 3.0], 2.0)]
    assert [median_epoch_time(r) for r in runs] == [2.0, 3.0]
    row = models_table(summarise(runs))[1]
    assert row[2] == "2.50 ± 0.71"  # medians 2 and 3 over seeds: the slow first epoch is out
    assert row[3] == "11.0 ± 1.4"  # the whole fit (10 and 12 s), for comparison
    sequential = timing_summary(runs, None)
    assert any("not interleaved" in n for n in sequential["notes"])
    assert sequential["load_avg_1m"] == [1.0, 3.0]
    interleaved = timing_summary(runs, "interleaved by seed")
    assert not any("not interleaved" in n for n in interleaved["notes"])
    assert math.isnan(median_epoch_time({"epochs": 1}))
