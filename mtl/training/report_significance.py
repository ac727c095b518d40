"""The first table of the ``mtl compare`` report: test AUC with intervals and paired tests.

Reads each run's saved test scores (``test_scores.npz``) and applies
:mod:`mtl.training.significance`: per binary task, every model's AUC with its 95%
interval (:func:`~mtl.training.significance.seed_mean_auc` over its seeds) and, for every
pair of models, a paired test on the same test rows
(:func:`~mtl.training.significance.seed_paired_test`), with a verdict in words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtl.training.results import TEST_SCORES_FILE, read_test_scores
from mtl.training.significance import seed_mean_auc, seed_paired_test

LEVEL = 0.95
"""Confidence level of the AUC intervals."""
ALPHA = 0.05
"""Significance level of the paired tests."""
SIGNIFICANCE_NOTES = """\
AUC intervals and paired tests use DeLong's variance on the test rows, which every run shares.
With several seeds the AUC is the mean over seeds and the difference the mean of the per-seed
paired differences; their variance adds the between-seed variance over the number of seeds
(training randomness), with a t reference (Welch-Satterthwaite degrees of freedom). With one
seed it is DeLong's paired z test. Per-seed DeLong tests are in results.json
(`significance.tasks.<task>.pairs[].per_seed`)."""


def _run_scores(run: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The run's test scores per task, or None when it kept none (runs from older versions)."""
    path = Path(str(run.get("output_dir", ""))) / str(run.get("test_scores", TEST_SCORES_FILE))
    return read_test_scores(path) if run.get("output_dir") and path.is_file() else None


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.1 else f"p={p:.2f}"


def _verdict(a: str, b: str, task: str, diff: float, p: float) -> str:
    """``"home > mmoe on income: +0.0031, p=0.020, significant"`` (the larger AUC first)."""
    first, second, gap = (a, b, diff) if diff >= 0 else (b, a, -diff)
    if p < ALPHA:
        return f"{first} > {second} on {task}: +{gap:.4f}, {_p(p)}, significant"
    return f"{first} vs {second} on {task}: +{gap:.4f}, {_p(p)}, not significant at {ALPHA:.0%}"


def significance(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per binary task: each model's test AUC with its interval, and every pair's paired test.

    Reads each run's ``test_scores.npz``. A model's AUC is :func:`seed_mean_auc` over
    its seeds; a pair is tested by :func:`seed_paired_test` on the seeds both have.

    Returns:
        ``{"level", "alpha", "tasks": {task: {"auc": {model: {...}}, "pairs": [...]}},
        "notes": [...]}``; ``notes`` says what could not be tested and why.
    """
    by_model: dict[str, dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
    notes: list[str] = []
    for run in runs:
        scores = _run_scores(run)
        if scores is None:
            notes.append(f"{run['model']} seed {run['seed']}: no test scores saved")
            continue
        by_model.setdefault(run["model"], {})[int(run["seed"])] = scores
    kinds = {t: k for run in runs for t, k in run.get("tasks", {}).items()}
    tasks: dict[str, Any] = {}
    for task in [t for t, k in kinds.items() if k == "binary"]:
        seeds = {m: {s: v[task] for s, v in d.items() if task in v} for m, d in by_model.items()}
        seeds = {m: d for m, d in seeds.items() if d}
        labels = next((y for d in seeds.values() for _, y in d.values()), None)
        if labels is None:
            continue
        if any(not np.array_equal(y, labels) for d in seeds.values() for _, y in d.values()):
            notes.append(f"{task}: the runs' test rows differ, no paired test")
            continue
        if len(np.unique(labels)) < 2:
            notes.append(f"{task}: the test split holds one class, no AUC")
            continue
        auc = {}
        for model, d in seeds.items():
            r = seed_mean_auc([p for p, _ in d.values()], labels, level=LEVEL)
            auc[model] = {"auc": r.auc, "low": r.low, "high": r.high, "se": r.se}
            auc[model] |= {"df": r.df, "seeds": sorted(d)}
        pairs = []
        models = list(seeds)
        for i, a in enumerate(models):
            for b in models[i + 1 :]:
                common = sorted(set(seeds[a]) & set(seeds[b]))
                if not common:
                    notes.append(f"{task}: {a} and {b} share no seed, no paired test")
                    continue
                t = seed_paired_test(
                    [seeds[a][s][0] for s in common], [seeds[b][s][0] for s in common], labels
                )
                pairs.append(
                    {
                        "a": a,
                        "b": b,
                        "diff": t.diff,
                        "low": t.low,
                        "high": t.high,
                        "z": t.z,
                        "p_value": t.p_value,
                        "df": t.df,
                        "significant": t.significant(ALPHA),
                        "seeds": common,
                        "verdict": _verdict(a, b, task, t.diff, t.p_value),
                        "per_seed": [
                            {"seed": s, "diff": u.diff, "p_value": u.p_value, "z": u.z}
                            for s, u in zip(common, t.per_seed, strict=True)
                        ],
                    }
                )
        tasks[task] = {"n_rows": len(labels), "n_pos": int(labels.sum()), "auc": auc}
        tasks[task]["pairs"] = pairs
    return {"level": LEVEL, "alpha": ALPHA, "tasks": tasks, "notes": notes}


def significance_table(sig: dict[str, Any]) -> list[list[str]]:
    """Header + per task: a row per model (AUC, interval), then a row per pair (Δ, p, verdict)."""
    pct = f"{sig['level']:.0%}"
    rows = [["task", "model or pair", "test AUC / Δ AUC", f"{pct} interval", "p", "verdict"]]
    for task, t in sig["tasks"].items():
        for model, r in t["auc"].items():
            interval = f"[{r['low']:.4f}, {r['high']:.4f}]"
            rows.append([task, model, f"{r['auc']:.4f}", interval, "", ""])
        for q in t["pairs"]:
            interval = f"[{q['low']:+.4f}, {q['high']:+.4f}]"
            pair, diff, p = f"{q['a']} − {q['b']}", f"{q['diff']:+.4f}", _p(q["p_value"])
            rows.append([task, pair, diff, interval, p, q["verdict"]])
    return rows
