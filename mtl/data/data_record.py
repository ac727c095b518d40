"""What a ranking run was trained on: files, rows per split, label rates, how it split.

:meth:`mtl.data.datamodule.RecDataModule.split_summary` assembles the record from
these helpers; ``train`` writes it to ``metrics.json`` (key ``split``), prints
:func:`summary_lines` when the run starts, and ``mtl compare`` puts it in
``results.json`` and ``report.md``. A run that silently split a test file 80/10/10
reads like one trained on the real train file; the record makes that visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtl.data.features import TaskKind

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def fractions_text(fractions: Sequence[float]) -> str:
    """``(0.8, 0.1, 0.1) -> "80/10/10"`` (percentages).

    Example:
        >>> fractions_text((0.8, 0.1, 0.1)), fractions_text((0.7, 0.15, 0.15))
        ('80/10/10', '70/15/15')
    """
    return "/".join(f"{100 * f:.4g}" for f in fractions)


def describe_split(
    *,
    head: str,
    given: Sequence[str],
    fractions: Sequence[float],
    split_seed: int,
    unused: Sequence[str] = (),
) -> str:
    """One sentence on how the train/val/test rows were made.

    Args:
        head: where the rows came from (the source's description, or ``"<source>: the rows"``).
        given: the splits (``"val"``, ``"test"``) taken from the source's own rows.
        fractions: the (train, val, test) fractions of the random split.
        split_seed: its seed.
        unused: the source's own splits left unused (``use_source_test=false``).

    Example:
        >>> describe_split(head="census: the test file", given=[], fractions=(0.8, 0.1, 0.1),
        ...                split_seed=0)
        'census: the test file split 80/10/10 at random (split_seed 0)'
        >>> describe_split(head="ali_ccp: the rows", given=["test"], fractions=(0.8, 0.1, 0.1),
        ...                split_seed=3)
        "ali_ccp: the rows; test: the source's own test rows; val: a random 0.111 of the train rows (split_seed 3)"
    """
    fracs = dict(zip(SPLIT_NAMES, fractions, strict=True))
    carved = [s for s in ("val", "test") if s not in given]
    if len(carved) == 2:
        how = f"{head} split {fractions_text(fractions)} at random (split_seed {split_seed})"
    elif carved:
        share = fracs[carved[0]] / (fracs["train"] + fracs[carved[0]])
        how = (
            f"{head}; {given[0]}: the source's own {given[0]} rows; "
            f"{carved[0]}: a random {share:.3g} of the train rows (split_seed {split_seed})"
        )
    else:
        how = f"{head}; val and test: the source's own val and test rows"
    if unused:
        how += f"; the source's own {' and '.join(unused)} rows unused (use_source_test=false)"
    return how


def label_rates(
    labels: Mapping[str, torch.Tensor], tasks: Mapping[str, TaskKind]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per split and task, the mean label: the positive rate of a binary task.

    Args:
        labels: per split, its ``(N, n_tasks)`` label tensor (columns in ``tasks`` order).
        tasks: task name -> ``"binary"`` or ``"regression"``.

    Returns:
        ``{"positive_rate": {task: {split: rate}}}`` for the binary tasks and
        ``{"label_mean": {task: {split: mean}}}`` for the regression tasks (each key
        only when such a task exists).

    Example:
        >>> rates = label_rates({"train": torch.tensor([[1.0], [0.0]]), "test": torch.tensor([[1.0]])},
        ...                     {"click": "binary"})
        >>> rates["positive_rate"]["click"]
        {'train': 0.5, 'test': 1.0}
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t, (task, kind) in enumerate(tasks.items()):
        key = "positive_rate" if kind == "binary" else "label_mean"
        out.setdefault(key, {})[task] = {
            split: float(y[:, t].double().mean()) if len(y) else float("nan")
            for split, y in labels.items()
        }
    return out


def summary_lines(source: str, summary: Mapping[str, Any]) -> list[str]:
    """The record in two console lines: how it split and the rows; the label rates.

    Example:
        >>> summary_lines("census_income", {"how": "census: the test file split 80/10/10 at random "
        ...     "(split_seed 0)", "rows": {"train": 8, "val": 1, "test": 1},
        ...     "positive_rate": {"income": {"train": 0.125, "val": 0.0, "test": 1.0}}})
        ['data census_income: census: the test file split 80/10/10 at random (split_seed 0); rows train 8, val 1, test 1', 'positive rate (train/val/test): income 0.125/0/1']
    """
    rows = ", ".join(f"{s} {n:,}" for s, n in summary["rows"].items())
    lines = [f"data {source}: {summary['how']}; rows {rows}"]
    rates = [
        f"{title} (train/val/test): "
        + ", ".join(
            f"{task} " + "/".join(f"{v:.4g}" for v in per_split.values())
            for task, per_split in summary[key].items()
        )
        for key, title in (("positive_rate", "positive rate"), ("label_mean", "label mean"))
        if summary.get(key)
    ]
    if rates:
        lines.append("; ".join(rates))
    return lines


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The record as a Markdown paragraph and table, for ``report.md``.

    Example:
        >>> print(summary_markdown({"how": "x split 80/10/10 at random (split_seed 0)",
        ...     "files": {"rows": ["a.csv"]}, "rows": {"train": 8, "val": 1, "test": 1},
        ...     "positive_rate": {"click": {"train": 0.5, "val": 0.0, "test": 1.0}}}))
        Split: x split 80/10/10 at random (split_seed 0).
        <BLANKLINE>
        Files read: rows: `a.csv`.
        <BLANKLINE>
        | | train | val | test |
        |---|---|---|---|
        | rows | 8 | 1 | 1 |
        | click positive rate | 0.5 | 0 | 1 |
    """
    files = summary.get("files") or {}
    read = (
        "; ".join(f"{k}: " + ", ".join(f"`{p}`" for p in v) for k, v in files.items())
        if files
        else "none (generated data)"
    )
    splits = list(summary["rows"])
    table = [
        "| | " + " | ".join(splits) + " |",
        "|---" * (len(splits) + 1) + "|",
        "| rows | " + " | ".join(f"{summary['rows'][s]:,}" for s in splits) + " |",
    ]
    for key, title in (("positive_rate", "positive rate"), ("label_mean", "label mean")):
        for task, per_split in (summary.get(key) or {}).items():
            cells = " | ".join(f"{per_split[s]:.4g}" for s in splits)
            table.append(f"| {task} {title} | {cells} |")
    return f"Split: {summary['how']}.\n\nFiles read: {read}.\n\n" + "\n".join(table)
