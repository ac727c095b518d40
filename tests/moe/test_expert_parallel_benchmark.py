"""benchmarks/expert_parallel.py runs end to end at a tiny size and writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_expert_parallel_benchmark_reports_every_process_count(tmp_path: Path) -> None:
    out = tmp_path / "ep.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), "--out", str(out)]
    cmd += ["--quick", "--no-plot", "--procs", "1", "2", "--tokens", "32", "--repeats", "1"]
    cmd += ["--experts", "8", "--k", "2", "--d-model", "16", "--d-hidden", "8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["processes"], r["dispatch"]) for r in rows] == [
        (1, "dropless"),
        (1, "expert_parallel"),
        (2, "expert_parallel"),
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0
        assert r["max_abs_diff_vs_single"] < 1e-5  # each row computes the single-process layer
    # nothing crosses ranks without a second rank; with two, about half the routed rows do
    assert rows[0]["bytes_per_step"] == 0
    rows_bytes = rows[2]["bytes_per_step"] - 2 * 2 * 8 * 8  # minus each rank's counts
    slots = 2 * 32 * 2  # ranks * tokens * k
    assert 0.2 * slots < rows_bytes / (4 * 16 * 4) < 0.8 * slots  # 4 legs of fp32 rows of D=16
