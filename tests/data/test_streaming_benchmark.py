"""benchmarks/streaming.py runs end to end at a tiny size and writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # three training processes, each importing torch and Lightning
def test_streaming_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "streaming.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "streaming.py"),
        *("--rows", "3000", "--subset-rows", "2000", "--chunk-rows", "1000"),
        *("--batch-size", "256", "--repeats", "1", "--min-count", "1"),
        *("--workdir", str(tmp_path / "work"), "--out", str(out)),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    # the generator wrote the rows in chunk files
    assert len(list((tmp_path / "work" / "raw").glob("part-*.parquet"))) == 3
    sub, full = result["subset"], result["full"]
    (memory,) = sub["runs"]["memory"]
    (shards,) = sub["runs"]["shards"]
    # the streaming epoch served every train row of the prepared subset once
    assert shards["rows"] == sub["train_rows"]
    assert full["generated_rows"] == 3000 and full["rows"] == full["train_rows"]
    assert abs(full["train_rows"] / 3000 - 0.98) < 0.02  # the 98/1/1 hash split
    for run in (memory, shards, full):
        assert run["samples_per_s"] > 0 and 2**20 < run["peak_rss_bytes"] < 4 * 2**30
    assert sub["prepare_peak_rss_bytes"] > 2**20
    assert sub["shards_vs_memory_samples_per_s"] == pytest.approx(
        shards["samples_per_s"] / memory["samples_per_s"]
    )
    assert "| streaming (data=shards) |" in done.stdout.replace("  ", " ").replace("  ", " ")
