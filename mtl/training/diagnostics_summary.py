"""Expert diagnostics of several runs (seeds), combined without matching experts by index.

Experts are interchangeable between seeds: expert 3 of seed 0 has nothing to do with
expert 3 of seed 1, so a mean over seeds by expert index blurs a specialised gate
into a uniform one. Here every statistic is computed within one seed first and only
then combined:

* :func:`level_summary`: a seed's level as scalars that do not depend on the experts'
  order (collapse spread, degraded count, each gate's share on its own / category /
  global experts); over seeds they are given as mean ± std (:func:`summarise_diagnostics`);
* :func:`sorted_experts`: a seed's per-expert values with the experts sorted by load
  (total gate weight) within their kind, the order plots use to put seeds side by side.

Input is :meth:`mtl.training.diagnostics.ExpertDiagnostics.to_dict` of each run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

AGGREGATION = (
    "computed per seed, then mean ± std over seeds of statistics that do not depend on "
    "the experts' order; per-expert plots sort each seed's experts by load within their kind"
)
"""How seeds are combined (the report says it)."""
PER_EXPERT = ("load", "out_mean", "out_std", "zero_frac", "tasks_using")
"""Per-expert values that :func:`sorted_experts` reorders."""


def levels(diag: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's levels from the input up, the final level (``diag`` itself) last.

    Example:
        >>> [d["level"] for d in levels({"level": "top", "lower_levels": [{"level": "meta"}]})]
        ['meta', 'top']
    """
    top = {k: v for k, v in diag.items() if k != "lower_levels"}
    return [*diag.get("lower_levels", []), top]


def nan_if_none(value: Any) -> float:
    """``float(value)``, NaN for a missing (None) statistic."""
    return math.nan if value is None else float(value)


def kind_group(kind: str) -> str:
    """An expert kind's group: ``"task:income"`` -> ``"task"``."""
    return kind.split(":", 1)[0]


def expert_load(d: dict[str, Any]) -> list[float]:
    """Per expert, the sum over the level's gates of its mean gate weight."""
    util = d.get("utilisation") or []
    n = len(d.get("expert_kinds") or [])
    return [sum(row[e] for row in util) for e in range(n)] if util else [math.nan] * n


def expert_order(d: dict[str, Any]) -> list[int]:
    """Expert indices grouped by kind (first appearance), by load (descending) within a kind.

    Ties in load are broken by the other per-expert values, so two seeds whose
    experts are a permutation of each other give the same sorted values.

    Example:
        >>> expert_order({"expert_kinds": ["shared", "shared", "task:a"],
        ...               "utilisation": [[0.2, 0.5, 0.3]]})
        [1, 0, 2]
    """
    kinds = list(d.get("expert_kinds") or [])
    load = expert_load(d)
    rank = {k: i for i, k in enumerate(dict.fromkeys(kinds))}

    def key(e: int) -> tuple[float, ...]:
        values = [
            load[e],
            *(nan_if_none((d.get(k) or [None] * len(kinds))[e]) for k in PER_EXPERT[1:]),
        ]
        return (rank[kinds[e]], *(-v if not math.isnan(v) else math.inf for v in values))

    return sorted(range(len(kinds)), key=key)


def sorted_experts(d: dict[str, Any]) -> dict[str, Any]:
    """Per expert in :func:`expert_order`: ``{"index": original indices, "kinds",
    "gates", "utilisation": (gates x experts), <each of PER_EXPERT>: [...]}``."""
    order = expert_order(d)
    values = {"load": expert_load(d), **{k: d.get(k) for k in PER_EXPERT[1:]}}
    out: dict[str, Any] = {
        "index": order,
        "kinds": [d["expert_kinds"][e] for e in order],
        "gates": list(d.get("tasks") or []),
        "utilisation": [[row[e] for e in order] for row in d.get("utilisation") or []],
    }
    for key, vals in values.items():
        out[key] = None if vals is None else [vals[e] for e in order]
    return out


def level_summary(d: dict[str, Any]) -> dict[str, Any]:
    """One seed's level as order-free scalars (collapse, degradation, underfitting).

    ``std_min_max``: smallest over largest expert output std (1 = one scale, near 0 = an
    expert collapsed to a constant); ``std_cv``: std / mean over experts of the output
    std; ``mean_spread``: std over experts of the output mean, over the mean output std;
    ``zero_frac_max``: ReLU-type experts only (None otherwise).

    Example:
        >>> s = level_summary({"level": "", "activation": "swish", "expert_kinds": ["shared"] * 2,
        ...     "out_mean": [0.0, 0.0], "out_std": [1.0, 0.01], "zero_frac": None,
        ...     "shared": [True, True], "degraded": [False, True], "kind_shares": {}})
        >>> s["std_min_max"], s["zero_frac_max"], s["degraded"]
        (0.01, None, 1)
    """
    kinds = [kind_group(k) for k in d.get("expert_kinds") or []]
    std = [v for v in d.get("out_std") or [] if v is not None]
    mean = [v for v in d.get("out_mean") or [] if v is not None]
    zero = d.get("zero_frac")
    zero = None if zero is None else [v for v in zero if v is not None]  # None: no row computed
    top = max(std, default=0.0)
    avg_std = statistics.fmean(std) if std else math.nan
    spread = statistics.pstdev(mean) / avg_std if len(mean) > 1 and avg_std > 0 else math.nan
    return {
        "level": d.get("level", ""),
        "activation": d.get("activation"),
        "experts": {k: kinds.count(k) for k in ("shared", "group", "task")},
        "zero_frac_max": max(zero) if zero else None,
        "zero_frac_mean": statistics.fmean(zero) if zero else None,
        "std_min_max": min(std) / top if len(std) > 1 and top > 0 else math.nan,
        "std_cv": statistics.pstdev(std) / avg_std if len(std) > 1 and avg_std > 0 else math.nan,
        "mean_spread": spread,
        "degraded": sum(bool(x) for x in d.get("degraded") or []),
        "shared": sum(bool(x) for x in d.get("shared") or []),
        "shares": d.get("kind_shares") or {},
    }


SCALARS = ("zero_frac_max", "zero_frac_mean", "std_min_max", "std_cv", "mean_spread", "degraded")
"""The order-free scalars that :func:`summarise_diagnostics` averages over seeds."""


def _mean_std(values: Sequence[Any]) -> list[float] | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def summarise_diagnostics(
    diags: Sequence[dict[str, Any]], seeds: Sequence[int] | None = None
) -> dict[str, Any] | None:
    """Per level: each seed's :func:`level_summary` and :func:`sorted_experts`, and the
    mean ± std over seeds of the order-free scalars and gate shares.

    Args:
        diags: one :meth:`~mtl.training.diagnostics.ExpertDiagnostics.to_dict` per seed.
        seeds: the seeds, in ``diags``' order (default 0, 1, ...).

    Returns:
        ``{"aggregation", "seeds", "tasks", "expert_kinds", "levels": [{"level",
        "activation", "experts", "per_seed": [...], "sorted": [...], "stats": {scalar:
        [mean, std] | None}, "shares": {gate: {part: [mean, std] | None}}}]}``; None
        without diagnostics. Levels are matched by position (same model config).

    Example:
        >>> d = {"level": "", "activation": "relu", "tasks": ["a"], "expert_kinds": ["shared"] * 2,
        ...      "utilisation": [[0.9, 0.1]], "out_mean": [1.0, 0.5], "out_std": [1.0, 0.5],
        ...      "zero_frac": [0.1, 0.3], "tasks_using": [1, 0], "shared": [False, False],
        ...      "degraded": [False, False], "kind_shares": {}}
        >>> swapped = {**d, "utilisation": [[0.1, 0.9]], "out_mean": [0.5, 1.0],
        ...            "out_std": [0.5, 1.0], "zero_frac": [0.3, 0.1], "tasks_using": [0, 1]}
        >>> s = summarise_diagnostics([d, swapped])
        >>> s["levels"][0]["stats"]["std_min_max"], s["levels"][0]["sorted"][1]["zero_frac"]
        ([0.5, 0.0], [0.1, 0.3])
    """
    diags = [d for d in diags if d]
    if not diags:
        return None
    seeds = list(range(len(diags))) if seeds is None else list(seeds)
    per_seed = [levels(d) for d in diags]
    n_levels = min(len(x) for x in per_seed)
    out_levels = []
    for i in range(n_levels):
        runs = [x[i] for x in per_seed]
        summaries = [
            {"seed": seed, **level_summary(d)} for seed, d in zip(seeds, runs, strict=False)
        ]
        gates = list(dict.fromkeys(g for s in summaries for g in s["shares"]))
        shares = {
            g: {
                part: _mean_std([s["shares"].get(g, {}).get(part) for s in summaries])
                for part in ("own", "group", "shared")
            }
            for g in gates
        }
        out_levels.append(
            {
                "level": summaries[0]["level"],
                "activation": summaries[0]["activation"],
                "experts": summaries[0]["experts"],
                "per_seed": summaries,
                "sorted": [
                    {"seed": seed, **sorted_experts(d)}
                    for seed, d in zip(seeds, runs, strict=False)
                ],
                "stats": {k: _mean_std([s[k] for s in summaries]) for k in SCALARS},
                "shares": shares,
            }
        )
    return {
        "aggregation": AGGREGATION,
        "seeds": seeds,
        "tasks": diags[0].get("tasks", []),
        "expert_kinds": diags[0].get("expert_kinds", []),
        "levels": out_levels,
    }
