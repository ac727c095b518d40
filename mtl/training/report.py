"""Comparison report of ``mtl compare``: tables (Markdown + terminal), results.json, plots.

Input is the list of per-run results of :func:`mtl.training.train.train`
(one per model x seed). The first table gives each binary task's test AUC with its
95% interval per model and a paired test for every pair of models, from the runs'
saved test scores (:func:`significance`, :mod:`mtl.training.significance`). Metrics
are aggregated per model as mean ± sample std over seeds; diagnostics as the mean
over seeds. Plots are drawn on
:class:`matplotlib.figure.Figure` objects, which render to PNG without a display
and leave pyplot's global state (and backend) alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mtl.data.data_record import summary_markdown
from mtl.training.diagnostics import mean_diagnostics
from mtl.training.results import TEST_SCORES_FILE, read_test_scores, write_json
from mtl.training.significance import seed_mean_auc, seed_paired_test

METRICS_SHOWN = ("auc", "gauc", "logloss", "mse")
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
KIND_COLOURS = {"shared": "tab:blue", "group": "tab:orange", "task": "tab:green"}
DIAGNOSTICS_NOTES = """\
- zero-act: fraction of expert activations with |y| < 1e-6 (max / mean over experts); values near 1
  mean a collapsed (dead) expert.
- scale CV: std / mean of the experts' mean |y|; large = experts on very different scales.
- degraded shared: shared (global or group) experts that at most one task weights above 1/E_allowed
  (E_allowed: experts the task's gate can reach), out of all shared experts. With near-uniform gates
  (see the heatmaps) this count is noise around the threshold.
- own share: gate weight a task puts on its own task-specific experts (n/a: the model has none)."""


SIZES_NOTES = """\
Parameters of each model's network without embeddings (every model shares the embedding
tables), with the sizes its runs used (its config after overrides). A width scale other than 1:
`match_params=true` multiplied every width of the model by it, to reach the reference count
within 5% (the first model's, or `match_params_to`)."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _kind_group(kind: str) -> str:
    return kind.split(":", 1)[0]


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: metric mean/std over seeds, params, time, and mean diagnostics.

    Args:
        runs: results of ``train``, each with ``model``, ``seed``, ``test``,
            ``params``, ``train_time_s``, ``epochs``, ``diagnostics``.

    Returns:
        ``{model: {"seeds", "tasks", "metrics": {"auc/click": (mean, std)}, "params",
        "train_time_s": (mean, std), "epochs", "diagnostics": {...} | None}}``.

    Example:
        >>> runs = [{"model": "m", "seed": s, "tasks": {"a": "binary"}, "test": {"auc/a": v},
        ...          "params": {"total": 10, "model": 8}, "train_time_s": 1.0, "epochs": 2,
        ...          "diagnostics": None} for s, v in ((0, 0.7), (1, 0.8))]
        >>> round(summarise(runs)["m"]["metrics"]["auc/a"][0], 2)
        0.75
    """
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_model.setdefault(run["model"], []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for model, items in by_model.items():
        keys = list(dict.fromkeys(k for r in items for k in r["test"]))
        metrics = {k: _mean_std([r["test"].get(k, math.nan) for r in items]) for k in keys}
        out[model] = {
            "seeds": [r["seed"] for r in items],
            "per_seed": {k: {r["seed"]: r["test"].get(k, math.nan) for r in items} for k in keys},
            "tasks": items[0]["tasks"],
            "metrics": metrics,
            "params": items[0]["params"],
            "train_time_s": _mean_std([r["train_time_s"] for r in items]),
            "epochs": _mean_std([float(r["epochs"]) for r in items])[0],
            "diagnostics": mean_diagnostics(
                [r["diagnostics"] for r in items if r.get("diagnostics")]
            ),
        }
    return out


# ------------------------------------------------------------------------ tables
def _fmt(mean: float | None, std: float | None = None, digits: int = 4) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _stat(s: dict[str, Any], key: str) -> str:
    return _fmt(*s["metrics"].get(key, (math.nan, math.nan)))


def _tasks(summary: dict[str, dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(t for s in summary.values() for t in s["tasks"]))


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def models_table(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per model: parameters, train time, epochs, mean AUC (GAUC) over tasks."""
    means = [
        k for k in ("auc_mean", "gauc_mean") if any(k in s["metrics"] for s in summary.values())
    ]
    header = ["model", "params (model / total)", "train time s", "epochs"]
    rows = [header + [f"mean {k.split('_')[0].upper()}" for k in means]]
    for model, s in summary.items():
        p = s["params"]
        row = [
            model,
            f"{_count(p['model'])} / {_count(p['total'])}",
            _fmt(*s["train_time_s"], digits=1),
        ]
        rows.append([*row, f"{s['epochs']:.1f}", *[_stat(s, k) for k in means]])
    return rows


def _paired_delta(
    summary: dict[str, dict[str, Any]], model: str, base: str, key: str
) -> tuple[float, float]:
    # Same split and same seeds: the per-seed differences are the honest comparison.
    mine, ref = summary[model]["per_seed"].get(key, {}), summary[base]["per_seed"].get(key, {})
    return _mean_std(
        [mine[k] - ref[k] for k in mine if mine[k] is not None and ref.get(k) is not None]
    )


def task_table(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per (task, model): the task's metrics, mean ± std over seeds.

    With several models, a column gives the per-seed paired difference of the main
    metric (AUC, or MSE for regression) to the first model.
    """
    tasks = _tasks(summary)
    keys = {k for s in summary.values() for k in s["metrics"]}
    metrics = [m for m in METRICS_SHOWN if any(f"{m}/{t}" in keys for t in tasks)]
    main = "auc" if "auc" in metrics else metrics[0] if metrics else "auc"
    models = list(summary)
    base = models[0]
    header = ["task", "model", *[m.upper() if m != "logloss" else "log loss" for m in metrics]]
    if len(models) > 1:
        header.append(f"Δ {main.upper()} vs {base}")
    rows = [header]
    for task in tasks:
        for model in models:
            row = [task, model, *[_stat(summary[model], f"{m}/{task}") for m in metrics]]
            if len(models) > 1 and model == base:
                row.append("")
            elif len(models) > 1:
                mean, std = _paired_delta(summary, model, base, f"{main}/{task}")
                row.append("n/a" if math.isnan(mean) else f"{mean:+.4f} ± {std:.4f}")
            rows.append(row)
    return rows


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


def diagnostics_table(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per model with gates: collapse, degradation and underfitting numbers."""
    tasks = _tasks(summary)
    header = ["model", "experts (shared/group/task)", "zero-act max", "zero-act mean", "scale CV"]
    header += ["degraded shared", *[f"own share {t}" for t in tasks]]
    rows = [header]
    for model, s in summary.items():
        d = s["diagnostics"]
        if d is None:
            rows.append([model, "no gates", *["n/a"] * (len(header) - 2)])
            continue
        kinds = [_kind_group(k) for k in d["expert_kinds"]]
        zf = d["zero_frac"] or [math.nan]
        counts = f"{kinds.count('shared')}/{kinds.count('group')}/{kinds.count('task')}"
        row = [model, counts, _fmt(max(zf), digits=3), _fmt(float(np.mean(zf)), digits=3)]
        row += [
            _fmt(d["scale_cv"], digits=3),
            f"{d['num_degraded_shared']:.1f} / {sum(d['shared'])}",
        ]
        rows.append(row + [_fmt(d["own_share"].get(t), digits=3) for t in tasks])
    return rows


def sizes_table(sizes: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per model: parameters without embeddings, width scale, sizes used."""
    rows = [["model", "params (model)", "width scale", "sizes"]]
    for model, s in sizes.items():
        used = ", ".join(f"{k}={v}" for k, v in s["sizes"].items())
        rows.append([model, str(s["params"]), f"{s['scale']:.3g}", used])
    return rows


def to_markdown(rows: list[list[str]]) -> str:
    """Rows (header first) as a GitHub Markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * len(rows[0])) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def to_text(rows: list[list[str]]) -> str:
    """Rows as an aligned plain-text table for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------- plots
def _kind_colours(kinds: Sequence[str]) -> list[str]:
    return [KIND_COLOURS.get(_kind_group(k), "tab:gray") for k in kinds]


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_gates(model: str, diag: dict[str, Any], path: Path) -> None:
    """Heatmap of mean gate weight, tasks x experts, experts labelled (and coloured) by kind."""
    util = np.asarray(diag["utilisation"])
    tasks, kinds = diag["tasks"], diag["expert_kinds"]
    fig = Figure(figsize=(max(4.5, 0.8 * len(kinds) + 2.5), 0.7 * len(tasks) + 2.4))
    ax = fig.subplots()
    top = max(float(util.max()), 1e-9)
    im = ax.imshow(util, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    for (i, j), v in np.ndenumerate(util):
        colour = "white" if v < 0.6 * top else "black"
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
    # "group:watch" -> "group:\nwatch": two short lines fit under narrow columns.
    ax.set_xticks(
        range(len(kinds)), [f"{e}\n" + k.replace(":", ":\n") for e, k in enumerate(kinds)]
    )
    for tick, colour in zip(ax.get_xticklabels(), _kind_colours(kinds), strict=True):
        tick.set(color=colour, fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("expert (index, kind)")
    ax.set_title(f"{model}: mean gate weight per task (test split)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    _save(fig, path)


def _expert_bars(
    summary: dict[str, dict[str, Any]],
    *,
    key: str,
    path: Path,
    title: str,
    ylabel: str,
    ylim: float,
    only_shared: bool = False,
    hline: float | None = None,
    fmt: str = "{:.2f}",
) -> bool:
    """One panel per model: a bar per expert (coloured by kind) of diagnostics ``key``."""
    panels = []
    for model, s in summary.items():
        d = s["diagnostics"]
        if d is not None and d.get(key) is not None:
            idx = [e for e in range(len(d[key])) if not only_shared or d["shared"][e]]
            if idx:
                panels.append((model, d, idx))
    if not panels:
        return False
    width = max(5.0, 0.55 * max(len(p[2]) for p in panels) + 2.5)
    fig = Figure(figsize=(width, 2.4 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (model, d, idx) in zip(axes[:, 0], panels, strict=True):
        kinds, values = [d["expert_kinds"][e] for e in idx], [d[key][e] for e in idx]
        ax.bar(range(len(idx)), values, color=_kind_colours(kinds))
        for x, v in enumerate(values):
            ax.text(x, v + 0.02 * ylim, fmt.format(v), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0.0, ylim * 1.18)  # a fixed scale: 1e-5 must not look like a dead expert
        ax.set_xticks(range(len(idx)), [str(e) for e in idx], fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(model, fontsize=9, loc="left")
        if hline is not None:
            ax.axhline(hline, color="tab:red", linestyle="--", linewidth=1)
        groups = list(dict.fromkeys(_kind_group(k) for k in kinds))
        handles = [Rectangle((0, 0), 1, 1, color=KIND_COLOURS[g]) for g in groups]
        labels = [f"{g} expert" for g in groups]
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("expert index")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def plot_task_metric(summary: dict[str, dict[str, Any]], metric: str, path: Path) -> bool:
    """Grouped bars: per task, one bar per model with the std over seeds as error bar."""
    keys = {k for s in summary.values() for k in s["metrics"]}
    tasks = [t for t in _tasks(summary) if f"{metric}/{t}" in keys]
    if not tasks:
        return False
    models = list(summary)
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(5.0, 1.6 * len(tasks) * max(1, len(models) / 2)), 3.6))
    ax = fig.subplots()
    ends: list[float] = []
    for m, model in enumerate(models):
        stats = [summary[model]["metrics"].get(f"{metric}/{t}", (math.nan,) * 2) for t in tasks]
        means = [mu for mu, _ in stats]
        errs = [0.0 if math.isnan(sd) else sd for _, sd in stats]
        xs = np.arange(len(tasks)) + (m - (len(models) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=model)
        for x, v, e in zip(xs, means, errs, strict=True):
            if not math.isnan(v):
                ax.text(
                    x, v + e, f"{v:.3f}\n", ha="center", va="bottom", fontsize=7, linespacing=0.6
                )
                ends += [v - e, v + e]
    if metric in ("auc", "gauc") and ends:
        # AUC differences live near the top; a 0-based axis would hide them.
        lo, hi = min(ends), max(ends)
        ax.set_ylim(max(0.0, lo - 0.3 * (hi - lo) - 0.01), min(1.0, hi + 0.25 * (hi - lo) + 0.01))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title(f"test {metric.upper()} per task (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def write_plots(out_dir: Path, summary: dict[str, dict[str, Any]]) -> list[str]:
    """All comparison plots into ``out_dir``; returns the file names written."""
    written = [
        f"{m}.png"
        for m in ("auc", "gauc", "mse")
        if plot_task_metric(summary, m, out_dir / f"{m}.png")
    ]
    for model, s in summary.items():
        d = s["diagnostics"]
        if d is not None and d.get("utilisation") and np.asarray(d["utilisation"]).size:
            plot_gates(model, d, out_dir / f"gates_{model}.png")
            written.append(f"gates_{model}.png")
    n_tasks = max((len(s["tasks"]) for s in summary.values()), default=0)
    bars = {
        "collapse.png": dict(
            key="zero_frac",
            ylabel="zero-activation fraction",
            ylim=1.0,
            title="Expert collapse: fraction of activations with |y| < 1e-6 (test split)",
        ),
        "degradation.png": dict(
            key="tasks_using",
            ylabel="tasks using it",
            ylim=float(n_tasks),
            only_shared=True,
            hline=1.0,
            fmt="{:.1f}",
            title=f"Expert degradation: tasks (of {n_tasks}) giving a shared expert weight > "
            "1/E_allowed\n(mean over seeds; at or below the red line = degraded)",
        ),
    }
    for name, kwargs in bars.items():
        if _expert_bars(summary, path=out_dir / name, **kwargs):  # type: ignore[arg-type]
            written.append(name)
    return written


def write_report(
    out_dir: Path,
    runs: Sequence[dict[str, Any]],
    *,
    config: dict[str, Any] | None = None,
    sizes: dict[str, dict[str, Any]] | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and the plots for ``runs``; print the table.

    Returns:
        The ``results.json`` content: ``{"summary", "significance", "runs", "plots",
        "config", "sizes", "data"}`` (``significance``: see :func:`significance`; ``sizes``:
        :func:`mtl.training.param_match.fair_sizes`, empty when not given; ``data``: what
        the runs trained on, :meth:`~mtl.data.datamodule.RecDataModule.split_summary`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    sig = significance(runs)
    sig_rows = significance_table(sig)
    plots = write_plots(out_dir, summary)
    model_rows, task_rows = models_table(summary), task_table(summary)
    diag_rows = diagnostics_table(summary)
    seeds = sorted({r["seed"] for r in runs})
    tested = (
        "checkpoint with the best validation score"
        if all(r.get("tested", "best checkpoint") == "best checkpoint" for r in runs)
        else "final weights (checkpoint.save_top_k=0 keeps no best checkpoint)"
    )
    data = (config or {}).get("data", {}).get("source", runs[0].get("data", "") if runs else "")
    # Every run of a compare trains on one split, so the first run's record is the data's.
    data_record = runs[0].get("split") if runs else None
    sections = [
        f"# mtl compare: {', '.join(summary)} on {data}",
        f"Seeds {seeds} per model, all on one data split; metrics are on the test split, from the "
        f"{tested}; mean ± sample std over seeds. "
        "Parameter counts: model (experts, gates, towers) / total (with embeddings).",
        "## Test AUC with intervals, and paired tests",
        to_markdown(sig_rows) if len(sig_rows) > 1 else "No binary task with test scores.",
        SIGNIFICANCE_NOTES + "".join(f"\n- {n}" for n in sig["notes"]),
        # After the first table, which the report leads with.
        *(["## Data", summary_markdown(data_record)] if data_record else []),
        "## Models",
        to_markdown(model_rows),
        *(["## Sizes", to_markdown(sizes_table(sizes)), SIZES_NOTES] if sizes else []),
        "## Test metrics per task",
        to_markdown(task_rows),
        "Δ: mean ± std over seeds of the per-seed difference to the first model (same split and seed).",
        "## Expert diagnostics (test split, mean over seeds)",
        to_markdown(diag_rows),
        DIAGNOSTICS_NOTES,
        "## Plots",
        "\n".join(f"![{p}]({p})" for p in plots),
    ]
    (out_dir / "report.md").write_text("\n\n".join(sections) + "\n")
    results = {
        "summary": summary,
        "significance": sig,
        "data": data_record,
        "runs": list(runs),
        "plots": plots,
        "config": config,
        "sizes": sizes or {},
    }
    write_json(out_dir / "results.json", results)
    if echo:
        if len(sig_rows) > 1:
            print(
                f"\nTest AUC ({sig['level']:.0%} interval) and paired tests:\n{to_text(sig_rows)}"
            )
        print(f"\nModels (seeds {seeds}):\n{to_text(model_rows)}")
        if sizes:
            print(f"\nSizes:\n{to_text(sizes_table(sizes))}")
        print(f"\nTest metrics per task (mean ± std over seeds):\n{to_text(task_rows)}")
        print(f"\nExpert diagnostics:\n{to_text(diag_rows)}")
        print(f"\nreport: {out_dir / 'report.md'}")
    return results
