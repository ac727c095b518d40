"""Plots of the ``mtl compare`` report: test metrics and expert diagnostics.

Every diagnostics plot shows each seed on its own: experts are interchangeable
between seeds, so nothing is averaged over seeds by expert index. Within a seed the
experts are sorted by load (total gate weight) within their kind
(:func:`mtl.training.diagnostics_summary.sorted_experts`), which puts "the most used
shared expert" of every seed in the same column. Each level of a multi-level model
(PLE, HoME) has its own labelled panel. Plots are drawn on
:class:`matplotlib.figure.Figure` objects, which render to PNG without a display and
leave pyplot's global state (and backend) alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mtl.training.diagnostics_summary import kind_group, nan_if_none

KIND_COLOURS = {"shared": "tab:blue", "group": "tab:orange", "task": "tab:green"}
MARKERS = (
    ("o", "circle"),
    ("s", "square"),
    ("^", "triangle"),
    ("v", "down triangle"),
    ("D", "diamond"),
)
"""Marker (and its name) of each seed in the per-expert plots."""
SORTED_NOTE = "experts sorted by load within their kind, per seed"
"""How the per-expert plots order experts (their titles say it)."""


def _kind_colours(kinds: Sequence[str]) -> list[str]:
    return [KIND_COLOURS.get(kind_group(k), "tab:gray") for k in kinds]


def _gate_label(gate: str) -> str:
    return "shared unit" if gate == "__shared__" else gate


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _panels(summary: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(title, level summary)`` per model and gated level, levels labelled."""
    out = []
    for model, s in summary.items():
        d = s.get("diagnostics")
        for level in (d or {}).get("levels", []):
            if any(x["kinds"] for x in level["sorted"]):
                title = f"{model} {level['level']}".strip()
                out.append((title, level))
    return out


def _kind_legend(ax: Axes, kinds: Sequence[str]) -> None:
    groups = list(dict.fromkeys(kind_group(k) for k in kinds))
    handles = [Rectangle((0, 0), 1, 1, color=KIND_COLOURS.get(g, "tab:gray")) for g in groups]
    ax.legend(
        handles,
        [f"{g} expert" for g in groups],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def _rank_labels(kinds: Sequence[str]) -> list[str]:
    """``shared #1, shared #2, task:a #1``: rank by load within the kind."""
    seen: dict[str, int] = {}
    labels = []
    for k in kinds:
        seen[k] = seen.get(k, 0) + 1
        wrapped = k.replace(":", ":\n")  # two short lines fit under narrow columns
        labels.append(f"{wrapped}\n#{seen[k]}")
    return labels


def plot_gates(model: str, diag: dict[str, Any], path: Path) -> None:
    """Mean gate weight per gate and expert: one heatmap per level (rows) and seed (columns)."""
    levels = [lv for lv in diag["levels"] if any(x["utilisation"] for x in lv["sorted"])]
    seeds = diag["seeds"]
    n_e = max(len(x["kinds"]) for lv in levels for x in lv["sorted"])
    n_g = max(len(x["gates"]) for lv in levels for x in lv["sorted"])
    fig = Figure(figsize=(len(seeds) * (0.7 * n_e + 1.8), len(levels) * (0.45 * n_g + 1.9) + 0.6))
    axes = fig.subplots(len(levels), len(seeds), squeeze=False)
    for row, level in enumerate(levels):
        for col, (seed, x) in enumerate(zip(seeds, level["sorted"], strict=True)):
            ax, util = axes[row, col], np.asarray(x["utilisation"], dtype=float)
            top = max(float(util.max()) if util.size else 0.0, 1e-9)
            ax.imshow(util, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
            for (i, j), v in np.ndenumerate(util):
                colour = "white" if v < 0.6 * top else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=colour)
            ax.set_xticks(range(len(x["kinds"])), _rank_labels(x["kinds"]), fontsize=5)
            for tick, colour in zip(ax.get_xticklabels(), _kind_colours(x["kinds"]), strict=True):
                tick.set(color=colour)
            ax.set_yticks(range(len(x["gates"])), [_gate_label(g) for g in x["gates"]], fontsize=7)
            ax.set_title(f"{level['level'] or 'experts'}, seed {seed}", fontsize=8)
    fig.suptitle(
        f"{model}: mean gate weight per gate (test split), each seed on its own\n({SORTED_NOTE})",
        fontsize=9,
    )
    _save(fig, path)


def _sorted_points(
    panels: list[tuple[str, dict[str, Any]]], path: Path, *, title: str, ylabel: str, key: str
) -> bool:
    """Per model-level panel: per expert rank, one marker per seed of ``key`` (+- std)."""
    rows = [(t, lv) for t, lv in panels if any(x.get(key) for x in lv["sorted"])]
    if not rows:
        return False
    width = max(6.0, 0.5 * max(len(x["kinds"]) for _, lv in rows for x in lv["sorted"]) + 3.0)
    fig = Figure(figsize=(width, 2.3 * len(rows) + 0.8))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, (name, level) in zip(axes[:, 0], rows, strict=True):
        runs = level["sorted"]
        offsets = np.linspace(-0.25, 0.25, len(runs)) if len(runs) > 1 else [0.0]
        for s, (x, dx) in enumerate(zip(runs, offsets, strict=True)):
            values = x.get(key) or []
            xs = np.arange(len(values)) + dx
            colours = _kind_colours(x["kinds"])
            if key == "out_mean" and x.get("out_std"):
                ax.errorbar(xs, values, yerr=x["out_std"], fmt="none", ecolor="gray", lw=0.8)
            ax.scatter(xs, values, c=colours, s=14, marker=MARKERS[s % len(MARKERS)][0])
        ax.set_xticks(range(len(runs[0]["kinds"])), _rank_labels(runs[0]["kinds"]), fontsize=5)
        if key == "zero_frac":  # a fixed scale: 0.02 must not look like a dead expert
            ax.set_ylim(-0.03, 1.05)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.set_title(
            f"{name} ({level['activation'] or 'activation unknown'} experts)",
            fontsize=8,
            loc="left",
        )
        _kind_legend(ax, runs[0]["kinds"])
    seeds = ", ".join(
        f"{MARKERS[s % len(MARKERS)][1]}: seed {x['seed']}"
        for s, x in enumerate(rows[0][1]["sorted"])
    )
    axes[-1, 0].set_xlabel(f"expert, ranked by load within its kind ({seeds})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return True


def plot_degradation(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    """Per model-level with shared experts and two or more consumer gates: degraded
    shared experts out of all shared ones, one bar per seed."""
    bars = []
    for name, level in _panels(summary):
        per_seed = level["per_seed"]
        if any(s["shared"] for s in per_seed):
            bars.append((name, per_seed))
    if not bars:
        return False
    fig = Figure(figsize=(max(5.0, 1.3 * len(bars) + 2.5), 3.6))
    ax = fig.subplots()
    n_seeds = max(len(p) for _, p in bars)
    width = 0.8 / n_seeds
    for s in range(n_seeds):
        xs = [i + (s - (n_seeds - 1) / 2) * width for i, (_, p) in enumerate(bars) if s < len(p)]
        fr = [p[s]["degraded"] / max(p[s]["shared"], 1) for _, p in bars if s < len(p)]
        seed = next(p[s]["seed"] for _, p in bars if s < len(p))
        ax.bar(xs, fr, width, label=f"seed {seed}")
        for x, (_, p) in zip(xs, [b for b in bars if s < len(b[1])], strict=True):
            ax.text(
                x,
                p[s]["degraded"] / max(p[s]["shared"], 1) + 0.02,
                f"{p[s]['degraded']}/{p[s]['shared']}",
                ha="center",
                fontsize=6,
            )
    ax.set_xticks(range(len(bars)), [n.replace(" level", "\nlevel") for n, _ in bars], fontsize=7)
    ax.set_ylim(0.0, 1.15)
    ax.set_ylabel("degraded / shared experts")
    ax.set_title(
        "Expert degradation per seed: shared experts that at most one task\n"
        "(or category) weights above 1/E_allowed",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return True


def plot_underfitting(summary: dict[str, dict[str, Any]], path: Path) -> bool:
    """Per model-level with own experts: each gate's weight on its own / category /
    global experts, a stacked bar per gate and seed."""
    rows = []
    for name, level in _panels(summary):
        per_seed = level["per_seed"]
        gates = [g for g in per_seed[0]["shares"] if g != "__shared__"]
        if any(
            not math.isnan(nan_if_none(s["shares"].get(g, {}).get("own")))
            for s in per_seed
            for g in gates
        ):
            rows.append((name, level, gates))
    if not rows:
        return False
    fig = Figure(figsize=(7.0, 2.3 * len(rows) + 0.8))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    parts = (("own", "tab:green"), ("group", "tab:orange"), ("shared", "tab:blue"))
    for ax, (name, level, gates) in zip(axes[:, 0], rows, strict=True):
        labels, bottoms = [], []
        for g in gates:
            for seed_sum in level["per_seed"]:
                labels.append(f"{_gate_label(g)}\nseed {seed_sum['seed']}")
                bottoms.append(seed_sum["shares"].get(g, {}))
        base = np.zeros(len(labels))
        for part, colour in parts:
            vals = np.array(
                [
                    0.0 if math.isnan(nan_if_none(b.get(part))) else nan_if_none(b.get(part))
                    for b in bottoms
                ]
            )
            ax.bar(range(len(labels)), vals, bottom=base, color=colour, label=part)
            base += vals
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("gate weight share", fontsize=7)
        ax.set_title(name, fontsize=8, loc="left")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        "Expert underfitting: each gate's weight on its own experts vs shared ones "
        "(a bar per seed)",
        fontsize=9,
    )
    _save(fig, path)
    return True


def plot_task_metric(summary: dict[str, dict[str, Any]], metric: str, path: Path) -> bool:
    """Grouped bars: per task, one bar per model with the std over seeds as error bar."""
    keys = {k for s in summary.values() for k in s["metrics"]}
    tasks = list(dict.fromkeys(t for s in summary.values() for t in s["tasks"]))
    tasks = [t for t in tasks if f"{metric}/{t}" in keys]
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
    """All comparison plots into ``out_dir``; returns the file names written.

    ``summary``: :func:`mtl.training.report.summarise`'s, its ``diagnostics`` from
    :func:`mtl.training.diagnostics_summary.summarise_diagnostics`.
    """
    written = [
        f"{m}.png"
        for m in ("auc", "gauc", "mse")
        if plot_task_metric(summary, m, out_dir / f"{m}.png")
    ]
    for model, s in summary.items():
        d = s.get("diagnostics")
        if d and any(x["utilisation"] for lv in d["levels"] for x in lv["sorted"]):
            plot_gates(model, d, out_dir / f"gates_{model}.png")
            written.append(f"gates_{model}.png")
    panels = _panels(summary)
    relu = [(t, lv) for t, lv in panels if any(x.get("zero_frac") for x in lv["sorted"])]
    plots = {
        "collapse.png": lambda p: _sorted_points(
            panels,
            p,
            key="out_mean",
            ylabel="output mean ± std",
            title="Expert collapse (HoME): each expert's output mean ± std over the test split\n"
            f"(spread between experts = collapse; {SORTED_NOTE})",
        ),
        "zero_activations.png": lambda p: _sorted_points(
            relu,
            p,
            key="zero_frac",
            ylabel="fraction |y| < 1e-6",
            title="Dead units, ReLU-type experts only: fraction of zero activations\n"
            "(Swish/GELU experts are never exactly zero: left out)\n"
            f"({SORTED_NOTE})",
        ),
        "degradation.png": lambda p: plot_degradation(summary, p),
        "underfitting.png": lambda p: plot_underfitting(summary, p),
    }
    for name, draw in plots.items():
        if draw(out_dir / name):
            written.append(name)
    return written
