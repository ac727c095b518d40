"""The benchmark scripts run end to end in their smallest settings and write sane JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        *("--variants", "dense", "loop", "experts_only", "--repeats", "1", "--no-memory"),
    )
    (point,) = result["points"]
    assert point["max_abs_diff_vs_mtl"]["loop"] < 1e-4  # the per-expert loop computes the same
    for name in ("mtl", "dense", "loop", "experts_only"):
        assert point["variants"][name]["tokens_per_s"] > 0
    assert set(point["ratios"]) == {"mtl_vs_dense", "mtl_vs_loop", "mtl_vs_experts_only"}
    # the plot of every round's ratios lands next to the JSON
    assert (tmp_path / "moe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_train_reports_every_preset_against_dense(tmp_path: Path) -> None:
    result = _run(
        "lm_train.py",
        tmp_path / "lm.json",
        *("--quick", "--presets", "lm_dense", "lm_mixtral", "--steps", "2", "--no-plot"),
    )
    assert not (tmp_path / "lm.png").exists()
    rows = {r["preset"]: r for r in result["results"]}
    assert set(rows) == {"lm_dense", "lm_mixtral"}
    assert rows["lm_dense"]["vs_dense"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["last_train_ce"])
    assert rows["lm_mixtral"]["params_total"] > rows["lm_mixtral"]["params_active"]


def test_lm_train_compile_times_a_compiled_twin_of_every_model(tmp_path: Path) -> None:
    result = _run(
        "lm_train.py",
        tmp_path / "lm.json",
        *("--presets", "lm_mixtral", "--steps", "2", "--compile"),
    )
    rows = {(r["preset"], r["compiled"]): r for r in result["results"]}
    assert set(rows) == {(p, c) for p in ("lm_dense", "lm_mixtral") for c in (False, True)}
    assert result["config"]["compile"] is True
    for preset in ("lm_dense", "lm_mixtral"):
        eager, compiled = rows[(preset, False)], rows[(preset, True)]
        # same initial weights and batches: the twin trains to the same loss
        assert compiled["last_train_ce"] == pytest.approx(eager["last_train_ce"], abs=1e-4)
        ratio = eager["median_step_s"] / compiled["median_step_s"]
        assert compiled["vs_eager"] == pytest.approx(ratio)
        assert "vs_eager" not in eager
    assert rows[("lm_dense", True)]["vs_dense"] == 1.0
    assert (tmp_path / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rec_train_compiled_variant_needs_three_epochs(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rec_train.py"), "--quick"]
    cmd += ["--variants", "mtl_compile", "--epochs", "2", "--out", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mtl_compile needs --epochs 3 or more" in proc.stderr
    assert not (tmp_path / "r.json").exists()


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
    assert not (tmp_path / "rec.png").exists()  # no rechub row: nothing to pair, no plot
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


def test_time_interleaved_divides_each_round_by_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # a clock that advances only when a step runs: the timings are exact, whatever the load
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    counts = {"a": 0, "b": 0}

    def step(name: str) -> None:
        counts[name] += 1
        now[0] += 0.002  # 2 ms of work per call

    fns = {"a": lambda: step("a"), "b": lambda: step("b")}
    cpu = torch.device("cpu")
    assert common.calls_for(fns, cpu) == {"a": 1, "b": 1}  # CPU: one call per round
    # elsewhere enough 2 ms calls to fill ~25 ms ("meta" stands in for a GPU: no sync)
    assert all(5 <= n <= 13 for n in common.calls_for(fns, torch.device("meta")).values())
    counts.update(a=0, b=0)
    times = common.time_interleaved(fns, repeats=3, warmup=1, device=cpu, calls={"a": 4, "b": 1})
    assert counts == {"a": 1 + 3 * 4, "b": 1 + 3}
    # per-call seconds, not per-round: both 2 ms although a ran 4 calls a round
    for ts in times.values():
        assert ts == pytest.approx([0.002] * 3), times


def test_experts_only_runs_the_layers_experts_on_its_routed_rows() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from moe_layer import ExpertsOnly

    from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate

    torch.manual_seed(0)
    E, k, D = 4, 2, 8
    layer = MoELayer(
        gate=TopKGate(d_model=D, num_experts=E, k=k),
        experts=SwiGLUExperts(num_experts=E, d_model=D, d_hidden=16),
        dispatch=DroplessDispatch(),
    )
    x = torch.randn(10, D)
    experts_TK = layer.gate(x).experts_TK
    # reference: every (token, slot) row through its expert, summed per token
    expected = torch.zeros(10, D)
    for t in range(10):
        for j in range(k):
            e = int(experts_TK[t, j])
            expected[t] += layer.experts.forward_grouped(
                x[t : t + 1], torch.eye(E, dtype=torch.long)[e]
            )[0]
    out = ExpertsOnly(layer, k)(x)
    # the floor sums each token's k rows in expert order, so compare the totals
    torch.testing.assert_close(out.sum(0), expected.sum(0), rtol=1e-5, atol=1e-5)
