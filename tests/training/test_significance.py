"""DeLong AUC variance, intervals and paired tests against references computed another way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from mtl.training.report import write_report
from mtl.training.results import TEST_SCORES_FILE, write_test_scores
from mtl.training.significance import (
    delong_covariance,
    midranks,
    seed_mean_auc,
    seed_paired_test,
    two_sided_p,
)


def _scores(
    rng: np.random.Generator, y: np.ndarray, shift: float, shared: np.ndarray
) -> np.ndarray:
    """Binormal scores: positives shifted by ``shift``; ``shared`` row noise correlates models."""
    return shift * y + shared + rng.normal(size=y.shape[0])


def _draw(
    rng: np.random.Generator, n: int = 1500, rate: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < rate).astype(np.float64)
    return y, rng.normal(size=n)


def _stratified_bootstrap(
    scores: list[np.ndarray], y: np.ndarray, reps: int, rng: np.random.Generator
) -> np.ndarray:
    """``(reps, K)`` AUCs of positives and negatives resampled separately (counts fixed,
    as DeLong's variance assumes); AUC by counting negatives below each positive."""
    pos, neg = np.flatnonzero(y > 0.5), np.flatnonzero(y < 0.5)
    out = np.empty((reps, len(scores)))
    for r in range(reps):
        p = rng.choice(pos, pos.size)
        q = rng.choice(neg, neg.size)
        for k, s in enumerate(scores):
            ns = np.sort(s[q])
            below = np.searchsorted(ns, s[p], side="left")
            ties = np.searchsorted(ns, s[p], side="right") - below
            out[r, k] = (below + 0.5 * ties).sum() / (pos.size * neg.size)
    return out


def test_midranks_average_tied_ranks() -> None:
    assert midranks([2.0, 2.0, 1.0, 2.0]).tolist() == [3.0, 3.0, 1.0, 3.0]


def test_delong_variance_and_covariance_match_a_large_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y, shared = _draw(rng, n=1200)
    a, b = _scores(rng, y, 1.0, shared), _scores(rng, y, 1.3, shared)
    _, cov = delong_covariance([a, b], y)
    boot = _stratified_bootstrap([a, b], y, reps=3000, rng=rng)
    ref = np.cov(boot.T)
    # Relative SE of a 3000-sample variance is ~2.6%: 8% is three of them.
    assert cov[0, 0] == pytest.approx(ref[0, 0], rel=0.08)
    assert cov[1, 1] == pytest.approx(ref[1, 1], rel=0.08)
    diff_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert diff_var == pytest.approx(float(np.var(boot[:, 0] - boot[:, 1], ddof=1)), rel=0.08)
    # Shared row noise correlates the two AUCs: pairing must shrink the variance.
    assert diff_var < 0.8 * (cov[0, 0] + cov[1, 1])


@pytest.mark.parametrize("ties", [False, True])
def test_auc_equals_torchmetrics_binary_auroc(ties: bool) -> None:
    rng = np.random.default_rng(1)
    y, shared = _draw(rng, n=800)
    s = _scores(rng, y, 0.8, shared)
    if ties:
        s = np.round(s * 2) / 2  # a few score levels: many positive/negative ties
    ref = BinaryAUROC(thresholds=None)(torch.tensor(s, dtype=torch.float64), torch.tensor(y).long())
    assert seed_mean_auc([s], y).auc == pytest.approx(float(ref), abs=1e-6)
    from_tensors = seed_mean_auc([torch.tensor(s)], torch.tensor(y))
    assert from_tensors.auc == pytest.approx(float(ref), abs=1e-6)


def test_ties_count_one_half_and_constant_scores_give_auc_one_half() -> None:
    y = np.array([1, 0, 1, 0, 0])
    # Pairs (positive, negative): 1/2 + 1 + 1 for the first positive, 0 + 1/2 + 1/2 for the second.
    assert seed_mean_auc([[1.0, 1.0, 0.0, 0.0, 0.0]], y).auc == pytest.approx(3.5 / 6)
    flat = seed_mean_auc([np.ones(5)], y)
    assert flat.auc == 0.5 and flat.se == 0.0
    t = seed_paired_test([np.ones(5)], [np.ones(5)], y)
    assert t.p_value == 1.0 and not t.significant()


def test_interval_covers_the_true_auc_at_about_its_level() -> None:
    """Binormal with shift d: true AUC = Phi(d / sqrt(2))."""
    rng = np.random.default_rng(2)
    true_auc = 0.5 * math.erfc(-0.8 / 2)  # Phi(0.8 / sqrt 2)
    covered = 0
    for _ in range(200):
        y = (rng.random(600) < 0.3).astype(float)
        r = seed_mean_auc([0.8 * y + rng.normal(size=600)], y)
        covered += r.low <= true_auc <= r.high
    assert 0.90 <= covered / 200 <= 0.99


def test_planted_difference_is_significant_and_a_null_one_is_not() -> None:
    rng = np.random.default_rng(3)
    null_rejects = planted_rejects = 0
    draws = 200
    for _ in range(draws):
        y, shared = _draw(rng, n=1000)
        a = _scores(rng, y, 1.0, shared)
        null_rejects += seed_paired_test([a], [_scores(rng, y, 1.0, shared)], y).significant()
        planted_rejects += seed_paired_test([_scores(rng, y, 1.4, shared)], [a], y).significant()
    assert 0.01 <= null_rejects / draws <= 0.10
    assert planted_rejects / draws >= 0.9


def _seed_runs(
    rng: np.random.Generator, y: np.ndarray, shared: np.ndarray, shift: float, seeds: int
) -> list[np.ndarray]:
    # Training randomness: every seed's model separates the classes a little differently.
    return [_scores(rng, y, shift + 0.15 * rng.normal(), shared) for _ in range(seeds)]


def test_seed_test_holds_its_level_where_the_test_row_variance_alone_does_not() -> None:
    """With seed-to-seed variation, a test that sees only the test rows rejects a true
    null far too often; the seed-level test keeps its level and finds a planted gap."""
    rng = np.random.default_rng(4)
    draws, seeds = 200, 3
    rejects = naive = planted = 0
    for _ in range(draws):
        y, shared = _draw(rng, n=1000)
        a, b = _seed_runs(rng, y, shared, 1.0, seeds), _seed_runs(rng, y, shared, 1.0, seeds)
        t = seed_paired_test(a, b, y)
        rejects += t.significant()
        # The same mean difference judged by its test-row (DeLong) variance alone.
        auc, cov = delong_covariance([*a, *b], y)
        c = np.r_[np.full(seeds, 1 / seeds), np.full(seeds, -1 / seeds)]
        naive += two_sided_p(float(c @ auc) / math.sqrt(float(c @ cov @ c))) < 0.05
        c_planted = _seed_runs(rng, y, shared, 1.8, seeds)
        planted += seed_paired_test(c_planted, a, y).significant()
    assert 0.01 <= rejects / draws <= 0.10
    assert naive / draws > 0.15
    assert planted / draws >= 0.8


def test_seed_mean_auc_widens_with_seed_spread_and_matches_one_seed() -> None:
    rng = np.random.default_rng(5)
    y, shared = _draw(rng)
    s = _scores(rng, y, 1.0, shared)
    one, same = seed_mean_auc([s], y), seed_mean_auc([s, s], y)
    assert same.auc == pytest.approx(one.auc) and same.se == pytest.approx(one.se)
    assert one.df == math.inf and same.df == math.inf  # no seed spread: the normal reference
    spread = seed_mean_auc([s, _scores(rng, y, 0.5, shared)], y)
    assert spread.df < 10 and spread.high - spread.low > 2 * (one.high - one.low)


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="both classes"):
        seed_mean_auc([[0.1, 0.2]], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        delong_covariance([[0.1, 0.2], [0.1]], [0, 1])
    with pytest.raises(ValueError, match="pairs seeds"):
        seed_paired_test([[0.1, 0.2]], [], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        seed_mean_auc([[0.1, math.nan]], [0, 1])


# ---------------------------------------------------------------- the compare report
def _fake_runs(tmp_path: Path, shifts: dict[str, float], seeds: int = 2) -> list[dict]:
    """Runs of ``mtl compare`` without training: scores written as a run writes them."""
    rng = np.random.default_rng(6)
    y, shared = _draw(rng, n=3000)
    runs = []
    for model, shift in shifts.items():
        for seed in range(seeds):
            out = tmp_path / model / f"seed{seed}"
            scores = {
                "income": (torch.tensor(_scores(rng, y, shift, shared)), torch.tensor(y)),
                "spend": (
                    torch.tensor(rng.normal(size=y.size)),
                    torch.tensor(rng.normal(size=y.size)),
                ),
            }
            write_test_scores(out / TEST_SCORES_FILE, scores)
            runs.append(
                {
                    "model": model,
                    "seed": seed,
                    "tasks": {"income": "binary", "spend": "regression"},
                    "test": {"auc/income": 0.7, "mse/spend": 1.0},
                    "params": {"total": 100, "model": 80},
                    "train_time_s": 1.0,
                    "epochs": 1,
                    "diagnostics": None,
                    "output_dir": str(out),
                    "test_scores": TEST_SCORES_FILE,
                }
            )
    return runs


def test_report_first_table_gives_intervals_and_says_which_differences_are_significant(
    tmp_path: Path,
) -> None:
    runs = _fake_runs(tmp_path, {"mmoe": 1.0, "home": 1.5, "ple": 1.0})
    results = write_report(tmp_path, runs, echo=False)
    report = (tmp_path / "report.md").read_text()
    first = report.split("\n## ")[1]
    assert first.startswith("Test AUC with intervals")
    rows = [r for r in first.splitlines() if r.startswith("| income |")]
    mmoe = next(r for r in rows if r.startswith("| income | mmoe |"))
    auc, interval = (c.strip() for c in mmoe.split("|")[3:5])
    low, high = (float(v) for v in interval.strip("[]").split(","))
    assert low < float(auc) < high
    assert "home > mmoe on income: +0." in first and "significant" in first
    assert "mmoe vs ple on income" in first or "ple vs mmoe on income" in first
    assert "not significant at 5%" in first
    assert "spend" not in first  # regression tasks have no AUC
    sig = results["significance"]["tasks"]["income"]
    by_pair = {(q["a"], q["b"]): q for q in sig["pairs"]}
    assert set(by_pair) == {("mmoe", "home"), ("mmoe", "ple"), ("home", "ple")}
    assert by_pair["mmoe", "home"]["significant"] and by_pair["mmoe", "home"]["diff"] < 0
    assert not by_pair["mmoe", "ple"]["significant"]
    assert [s["seed"] for s in by_pair["mmoe", "ple"]["per_seed"]] == [0, 1]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["significance"]["tasks"]["income"]["auc"]["home"]["low"] == pytest.approx(
        sig["auc"]["home"]["low"]
    )


def test_report_without_saved_scores_says_so(tmp_path: Path) -> None:
    runs = _fake_runs(tmp_path, {"mmoe": 1.0, "home": 1.0}, seeds=1)
    (Path(runs[1]["output_dir"]) / TEST_SCORES_FILE).unlink()
    results = write_report(tmp_path, runs, echo=False)
    assert results["significance"]["notes"] == ["home seed 0: no test scores saved"]
    assert not results["significance"]["tasks"]["income"]["pairs"]
    assert "home seed 0: no test scores saved" in (tmp_path / "report.md").read_text()
