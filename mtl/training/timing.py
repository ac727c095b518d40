"""Training time that compares: median epoch times and the machine's load during the runs.

A run's total time mixes a slow first epoch (warm-up, allocation) with the rest and
depends on what else the machine was doing, so ``mtl compare`` reports each run's
median epoch time (:func:`median_epoch_time`), records the load average before and
after each run (:func:`load_average`), and says how the runs were ordered
(:func:`timing_summary`): models run one after the other see different load, runs
interleaved by seed share it.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), None where unsupported.

    Example:
        >>> avg = load_average()
        >>> avg is None or len(avg) == 3
        True
    """
    try:
        return [float(v) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def median_epoch_time(run: dict[str, Any]) -> float:
    """Median over a run's epochs of its epoch wall time (validation included); NaN if unknown.

    Example:
        >>> median_epoch_time({"epoch_times_s": [9.0, 2.0, 2.5, 2.0]})
        2.25
    """
    times = [float(t) for t in run.get("epoch_times_s") or []]
    return statistics.median(times) if times else math.nan


def timing_summary(runs: Sequence[dict[str, Any]], run_order: str | None) -> dict[str, Any]:
    """The machine's cores, the range of 1-minute load averages over the runs, and notes.

    Args:
        runs: results of ``train``, each with ``load_avg: {"start", "end"}`` when recorded.
        run_order: how the runs were ordered, e.g. ``"interleaved by seed"``; None: in the
            order given, each model's seeds one after the other.

    Returns:
        ``{"cpu_count", "load_avg_1m": [min, max] | None, "run_order", "notes": [str]}``.

    Example:
        >>> runs = [{"load_avg": {"start": [1.0, 1, 1], "end": [3.0, 2, 1]}}]
        >>> t = timing_summary(runs, None)
        >>> t["load_avg_1m"], t["run_order"]
        ([1.0, 3.0], 'sequential: each model with all its seeds, one model after the other')
    """
    loads = [
        r["load_avg"][k][0]
        for r in runs
        for k in ("start", "end")
        if (r.get("load_avg") or {}).get(k)
    ]
    cpus = os.cpu_count() or 1
    order = run_order or "sequential: each model with all its seeds, one model after the other"
    notes = [f"Run order: {order}."]
    if not run_order:
        notes.append(
            "The runs were not interleaved: a change in the machine's load between models "
            "shows as a time difference between them."
        )
    load_range = [min(loads), max(loads)] if loads else None
    if load_range:
        notes.append(
            f"1-minute load average {load_range[0]:.1f}-{load_range[1]:.1f} on {cpus} cores "
            "(before and after each run)."
        )
        if load_range[1] > cpus:
            notes.append("The machine was loaded beyond its cores: times are slower and noisier.")
    else:
        notes.append("No load average was recorded.")
    return {"cpu_count": cpus, "load_avg_1m": load_range, "run_order": order, "notes": notes}
