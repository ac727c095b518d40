"""The compare report on small data: every table and plot, per-seed diagnostics of
every level, and the timing section; no training (runs are built as ``train`` builds them)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtl.models.rec import PLE, HoME, MMoE, SharedBottom
from mtl.training.diagnostics import DiagnosticsAccumulator
from mtl.training.report import diagnostics_table, summarise, write_report
from mtl.training.results import TEST_SCORES_FILE, write_test_scores

TASKS = ["income", "married"]
MODELS = {
    "mmoe": lambda: MMoE(d_in=6, tasks=TASKS, num_experts=3, expert_hidden=[8]),
    "ple": lambda: PLE(d_in=6, tasks=TASKS, num_levels=2, expert_hidden=[8]),
    "home": lambda: HoME(d_in=6, tasks=TASKS, expert_hidden=[8], lora_rank=2),
    "shared_bottom": lambda: SharedBottom(d_in=6, tasks=TASKS, bottom_hidden=[8]),
}


def _diagnostics(model: str, seed: int) -> dict[str, Any] | None:
    torch.manual_seed(seed)
    net = MODELS[model]().eval()
    acc = DiagnosticsAccumulator(tasks=TASKS)
    with torch.no_grad():
        acc.update(net(torch.randn(64, 6) * 2))
    d = acc.compute()
    return d.to_dict() if d.utilisation.numel() else None


def _runs(tmp_path: Path, models: list[str], seeds: int = 2) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    y = (rng.random(800) < 0.3).astype(np.float64)
    runs = []
    for model in models:
        for seed in range(seeds):
            out = tmp_path / model / f"seed{seed}"
            scores = {
                t: (torch.tensor(y + rng.normal(size=y.size)), torch.tensor(y)) for t in TASKS
            }
            write_test_scores(out / TEST_SCORES_FILE, scores)
            runs.append(
                {
                    "model": model,
                    "seed": seed,
                    "tasks": dict.fromkeys(TASKS, "binary"),
                    "test": {"auc/income": 0.7 + 0.01 * seed, "auc/married": 0.8},
                    "params": {"total": 100, "model": 80},
                    "train_time_s": 10.0,
                    "epoch_times_s": [6.0, 2.0, 2.0 + seed],
                    "epochs": 3,
                    "diagnostics": _diagnostics(model, seed),
                    "output_dir": str(out),
                    "test_scores": TEST_SCORES_FILE,
                    "load_avg": {"start": [1.0 + seed, 1.0, 1.0], "end": [2.5, 1.0, 1.0]},
                }
            )
    return runs


def test_report_writes_every_table_and_plot_with_every_level_labelled(tmp_path: Path) -> None:
    runs = _runs(tmp_path, list(MODELS))
    results = write_report(tmp_path, runs, config={"run_order": "interleaved by seed"}, echo=False)
    for png in (
        "auc.png",
        "gates_mmoe.png",
        "gates_ple.png",
        "gates_home.png",
        "collapse.png",
        "zero_activations.png",
        "degradation.png",
        "underfitting.png",
    ):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert png in results["plots"]
    assert "gates_shared_bottom.png" not in results["plots"]
    report = (tmp_path / "report.md").read_text()
    diag = report.split("## Expert diagnostics")[1].split("\n## ")[0]
    rows = {
        tuple(c.strip() for c in r.split("|")[1:3]) for r in diag.splitlines() if r.startswith("| ")
    }
    assert {
        ("mmoe", "experts"),
        ("ple", "level 1 of 2"),
        ("ple", "level 2 of 2 (top)"),
        ("home", "level 1 of 2 (meta)"),
        ("home", "level 2 of 2 (top)"),
        ("shared_bottom", ""),
    } <= rows
    home_top = next(r for r in diag.splitlines() if r.startswith("| home | level 2 of 2 (top) |"))
    assert "n/a (swish)" in home_top  # no zero fraction for Swish experts
    mmoe = next(r for r in diag.splitlines() if r.startswith("| mmoe |"))
    assert "n/a" not in mmoe.split("|")[8]  # ReLU experts: zero fraction given
    assert "per seed" in diag and "by expert index" in diag
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["timing"]["run_order"] == "interleaved by seed"
    assert saved["timing"]["load_avg_1m"] == [1.0, 2.5]


def test_diagnostics_table_gives_each_seed_statistic_then_mean_and_std(tmp_path: Path) -> None:
    runs = _runs(tmp_path, ["ple"])
    summary = summarise(runs)
    level = summary["ple"]["diagnostics"]["levels"][0]
    # Reference: the statistic from each seed's own diagnostics, then over seeds.
    per_seed = []
    for run in runs:
        std = run["diagnostics"]["lower_levels"][0]["out_std"]
        per_seed.append(min(std) / max(std))
    assert level["stats"]["std_min_max"] == pytest.approx(
        [statistics.fmean(per_seed), statistics.stdev(per_seed)], rel=1e-6
    )
    own_a = [r["diagnostics"]["lower_levels"][0]["own_share"]["income"] for r in runs]
    assert level["shares"]["income"]["own"] == pytest.approx(
        [statistics.fmean(own_a), statistics.stdev(own_a)], rel=1e-6
    )
    rows = diagnostics_table(summary)
    row = next(r for r in rows if r[:2] == ["ple", "level 1 of 2"])
    mean, std = level["stats"]["std_min_max"]
    assert row[4] == f"{mean:.3f} ± {std:.3f}"
    degraded = [r["diagnostics"]["lower_levels"][0]["num_degraded_shared"] for r in runs]
    assert row[8] == ", ".join(f"{n}/2" for n in degraded)
