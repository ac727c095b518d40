"""The benchmark scripts run end to end in their smallest settings and write sane JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_moe_layer_variants_agree_and_report_throughput(tmp_path: Path) -> None:
    result = _run(
        "moe_layer.py",
        tmp_path / "moe.json",
        *("--quick", "--tokens", "256", "--shapes", "8,2,64,32"),
        *("--variants", "dense", "loop", "--repeats", "1", "--no-memory"),
    )
    (point,) = result["points"]
    assert point["max_abs_diff_vs_mtl"]["loop"] < 1e-4  # the per-expert loop computes the same
    for name in ("mtl", "dense", "loop"):
        assert point["variants"][name]["tokens_per_s"] > 0
    assert set(point["ratios"]) == {"mtl_vs_dense", "mtl_vs_loop"}


def test_lm_train_reports_every_preset_against_dense(tmp_path: Path) -> None:
    result = _run(
        "lm_train.py",
        tmp_path / "lm.json",
        *("--quick", "--presets", "lm_dense", "lm_mixtral", "--steps", "2"),
    )
    rows = {r["preset"]: r for r in result["results"]}
    assert set(rows) == {"lm_dense", "lm_mixtral"}
    assert rows["lm_dense"]["vs_dense"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["last_train_ce"])
    assert rows["lm_mixtral"]["params_total"] > rows["lm_mixtral"]["params_active"]


def test_rec_train_trains_mtl_mmoe_on_the_synthetic_log(tmp_path: Path) -> None:
    result = _run(
        "rec_train.py",
        tmp_path / "rec.json",
        *("--quick", "--datasets", "synthetic", "--epochs", "1", "--variants", "mtl"),
        *("--seeds", "2"),
    )
    (point,) = result["points"]
    (row,) = point["results"]
    assert point["seeds"] == 2
    assert row["impl"] == "mtl" and row["samples_per_s"] > 0
    assert [len(t) for t in row["epoch_times_by_seed"]] == [1, 1]
    first, second = row["test_auc_by_seed"]
    # one epoch on 20k rows learns something on every task, from either seed
    for aucs in (first, second):
        assert all(0.52 < auc <= 1.0 for auc in aucs.values()), aucs
    # the seeds train different models, and the reported AUC is their mean and spread
    assert first != second
    for task, mean in row["test_auc"].items():
        assert mean == pytest.approx((first[task] + second[task]) / 2)
        assert row["test_auc_std"][task] == pytest.approx(
            abs(first[task] - second[task]) / math.sqrt(2)
        )
