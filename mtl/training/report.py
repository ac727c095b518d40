"""Comparison report of ``mtl compare``: tables (Markdown + terminal), results.json, plots.

Input is the list of per-run results of :func:`mtl.training.train.train`
(one per model x seed). The first table gives each binary task's test AUC with its
95% interval per model and a paired test for every pair of models, from the runs'
saved test scores (:func:`significance`, :mod:`mtl.training.significance`). Metrics
are aggregated per model as mean ± sample std over seeds; expert diagnostics are
computed per seed and combined without matching experts by index
(:mod:`mtl.training.diagnostics_summary`); training time as the median epoch time
of each run, with the machine's load average (:mod:`mtl.training.timing`). The plots
are in :mod:`mtl.training.report_plots`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl.data.data_record import summary_markdown
from mtl.training.diagnostics_summary import summarise_diagnostics
from mtl.training.report_plots import write_plots
from mtl.training.report_significance import SIGNIFICANCE_NOTES, significance, significance_table
from mtl.training.results import write_json
from mtl.training.timing import median_epoch_time, timing_summary

METRICS_SHOWN = ("auc", "gauc", "logloss", "mse")
DIAGNOSTICS_NOTES = """\
Every statistic is computed within one seed (experts are interchangeable between seeds, so none
is averaged by expert index), then given as mean ± std over seeds; one row per gated level.
- collapse (HoME): each expert's output mean and std over the test rows and units. std min/max:
  smallest over largest expert std (1 = one scale; near 0 = an expert collapsed to a constant);
  std CV: std / mean of the experts' stds; mean spread: std of the experts' means over their mean std.
- zero-act max: largest fraction of activations with |y| < 1e-6, for ReLU-type experts only
  (dead units); Swish/GELU experts are never exactly zero, so it is n/a for them.
- degraded shared, per seed: shared (global or group) experts that at most one consumer gate (task,
  or category at HoME's meta level; not PLE's shared-unit gate) weights above 1/E_allowed, out of
  all shared experts. With near-uniform gates (see the heatmaps) this count is noise around the
  threshold.
- own share: weight a gate puts on its own experts (task-specific; a category's at HoME's meta
  level); n/a: the model has none. A sparse task leaning on shared experts has a low own share."""


SIZES_NOTES = """\
Parameters of each model's network without embeddings (every model shares the embedding
tables), with the sizes its runs used (its config after overrides). Sized by: the dataset
experiment the model was composed with (`sizes_from`, e.g. census_home for data=census_income),
or its own model config. A width scale other than 1:
`match_params=true` multiplied every width of the model by it, to reach the reference count
within 5% (the first model's, or `match_params_to`)."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: metric mean/std over seeds, params, times, and per-seed diagnostics.

    Args:
        runs: results of ``train``, each with ``model``, ``seed``, ``test``,
            ``params``, ``train_time_s``, ``epochs``, ``diagnostics`` (and
            ``epoch_times_s`` for the median epoch time).

    Returns:
        ``{model: {"seeds", "tasks", "metrics": {"auc/click": (mean, std)}, "params",
        "train_time_s": (mean, std), "epoch_time_s": (mean, std) over seeds of each
        run's median epoch time, "epochs", "diagnostics": see
        :func:`~mtl.training.diagnostics_summary.summarise_diagnostics`}}``.

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
            "epoch_time_s": _mean_std([median_epoch_time(r) for r in items]),
            "epochs": _mean_std([float(r["epochs"]) for r in items])[0],
            "diagnostics": summarise_diagnostics(
                [r["diagnostics"] for r in items if r.get("diagnostics")],
                [r["seed"] for r in items if r.get("diagnostics")],
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
    """Header + one row per model: parameters, median epoch time, train time, epochs,
    mean AUC (GAUC) over tasks."""
    means = [
        k for k in ("auc_mean", "gauc_mean") if any(k in s["metrics"] for s in summary.values())
    ]
    header = ["model", "params (model / total)", "epoch time s (median)", "train time s"]
    rows = [[*header, "epochs", *[f"mean {k.split('_')[0].upper()}" for k in means]]]
    for model, s in summary.items():
        p = s["params"]
        row = [
            model,
            f"{_count(p['model'])} / {_count(p['total'])}",
            _fmt(*s.get("epoch_time_s", (math.nan, math.nan)), digits=2),
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


def _ms(value: list[float] | None, digits: int = 3) -> str:
    return "n/a" if value is None else _fmt(value[0], value[1], digits)


def diagnostics_table(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per model and gated level: collapse, degradation, underfitting.

    Each number is computed per seed, then mean ± std over seeds
    (:func:`~mtl.training.diagnostics_summary.summarise_diagnostics`); the degraded
    count is listed seed by seed.
    """
    header = ["model", "level", "experts (shared/group/task)", "activation", "std min/max"]
    header += ["std CV", "mean spread", "zero-act max (ReLU only)", "degraded shared per seed"]
    rows = [[*header, "own share per gate"]]
    for model, s in summary.items():
        d = s["diagnostics"]
        if d is None:
            rows.append([model, "", "no gates", *["n/a"] * (len(header) - 2)])
            continue
        for lv in d["levels"]:
            st, n = lv["stats"], lv["experts"]
            act = lv["activation"] or "unknown"
            relu = st["zero_frac_max"] is not None
            own = [
                f"{'shared unit' if g == '__shared__' else g} {_ms(v['own'])}"
                for g, v in lv["shares"].items()
                if v["own"] is not None
            ]
            degraded = ", ".join(f"{x['degraded']}/{x['shared']}" for x in lv["per_seed"])
            rows.append(
                [
                    model,
                    lv["level"] or "experts",
                    f"{n['shared']}/{n['group']}/{n['task']}",
                    act,
                    _ms(st["std_min_max"]),
                    _ms(st["std_cv"]),
                    _ms(st["mean_spread"]),
                    _ms(st["zero_frac_max"]) if relu else f"n/a ({act})",
                    degraded if any(x["shared"] for x in lv["per_seed"]) else "no shared",
                    "; ".join(own) or "n/a",
                ]
            )
    return rows


def sizes_table(sizes: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Header + one row per model: parameters without embeddings, the experiment that set
    its sizes (``sizes_from``), width scale, sizes used."""
    rows = [["model", "params (model)", "sized by", "width scale", "sizes"]]
    for model, s in sizes.items():
        used = ", ".join(f"{k}={v}" for k, v in s["sizes"].items())
        source = f"experiment={s['experiment']}" if s.get("experiment") else "its model config"
        rows.append([model, str(s["params"]), source, f"{s['scale']:.3g}", used])
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
        "config", "sizes", "data", "timing"}`` (``timing``: :func:`~mtl.training.timing.timing_summary`) (``significance``: see :func:`significance`; ``sizes``:
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
    timing = timing_summary(runs, (config or {}).get("run_order"))
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
        "Epoch time: median over each run's epochs (validation included), mean ± std over "
        "seeds; train time: the whole fit. " + " ".join(timing["notes"]),
        *(["## Sizes", to_markdown(sizes_table(sizes)), SIZES_NOTES] if sizes else []),
        "## Test metrics per task",
        to_markdown(task_rows),
        "Δ: mean ± std over seeds of the per-seed difference to the first model (same split and seed).",
        "## Expert diagnostics (test split, per seed, then over seeds)",
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
        "timing": timing,
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
