"""benchmarks/multi_gate_sparse.py runs end to end at a tiny size and writes sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_multi_gate_sparse_benchmark_agrees_and_reports_a_speed_up(tmp_path: Path) -> None:
    out = tmp_path / "sparse.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gate_sparse.py"), "--out", str(out)]
    cmd += ["--quick", "--threads", "1", "--batch", "128", "--repeats", "2", "--no-plot"]
    cmd += ["--experts", "8", "--k", "1", "2", "--d-in", "16", "--hidden", "16"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(p["experts"], p["k"], p["batch"]) for p in result["points"]] == [
        (8, 1, 128),
        (8, 2, 128),
    ]
    for p in result["points"]:
        assert p["max_abs_logit_diff"] < 1e-4  # both variants compute the same logits
        for name in ("sparse", "dense"):
            assert len(p["variants"][name]["times_s"]) == 2
            assert p["variants"][name]["rows_per_s"] > 0
        dense, sparse = p["variants"]["dense"]["median_s"], p["variants"]["sparse"]["median_s"]
        assert p["speedup_sparse_vs_dense"] == pytest.approx(dense / sparse)
    assert "sparse speed-up" in done.stdout
