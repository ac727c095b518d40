"""The data record of written shards: label rates, OOV id shares, unseen categories.

Read back from the shards (small int32/float32 columns) once ``mtl prepare`` wrote
them, in one streaming pass per split; the raw rows are read again only for a
val/test column whose ids all encode to the unknown index 0, to tell ids unseen in
train (warned about, as the in-memory path's
:func:`~mtl.data.data_warnings.warn_unseen_categories` does) from missing ones. A
binary label of one class in a split is warned about from its rate, as the
in-memory path's :func:`~mtl.data.data_warnings.warn_one_class_labels` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mtl.data.data_warnings import DataWarning, UnseenCategoriesWarning, one_class_label_message
from mtl.data.features import FittedFeatures
from mtl.data.shards.folder import column_names
from mtl.data.validation import DataError

__all__ = ["shard_record", "warn_one_class", "warn_unseen"]


def shard_record(
    out: Path,
    splits: Mapping[str, Any],
    fitted: FittedFeatures,
    *,
    raw: Mapping[str, pl.LazyFrame],
    origins: Mapping[str, str],
) -> dict[str, Any]:
    """The manifest's data record of the shards just written to ``out``.

    Args:
        out: the prepared folder.
        splits: per split, its ``rows`` and ``shards`` (the manifest's ``splits``).
        fitted: the encoding the shards were written with.
        raw: the val and test rows before encoding.
        origins: the files of ``rows`` (and of ``val``/``test`` when read from their own).

    Returns:
        ``positive_rate`` (binary tasks) or ``label_mean`` as ``{task: {split: value}}``;
        ``oov_share``, the share of ids at the unknown index 0 (unseen in train, rarer
        than ``min_count``, or missing), as ``{column: {split: share}}``; and
        ``unseen_categories``, ``{split: [column, ...]}``, where a val/test column
        holds values of which none is known from train (each warned about with an
        :class:`~mtl.data.validation.UnseenCategoriesWarning`). A split's binary
        label of one class is warned about (:func:`warn_one_class`).

    Raises:
        DataError: a standardised numeric is beyond the float32 range.

    Example:
        >>> shard_record(out, manifest["splits"], fitted, raw=raw,
        ...              origins={"rows": "clicks.parquet"})["oov_share"]  # doctest: +SKIP
        {'item': {'train': 0.012, 'val': 0.031, 'test': 0.034}}
    """
    spec = fitted.spec
    cats = [f.name for f in spec.categorical]
    record: dict[str, Any] = {}
    for name, split in splits.items():
        lf = pl.scan_parquet([out / s["path"] for s in split["shards"]])
        stats = lf.select(
            *[
                pl.col(column_names("label", t)).cast(pl.Float64).mean().alias(t)
                for t in spec.task_names
            ],
            *[
                (~pl.col(column_names("num", f.name)).is_finite()).sum().alias(f"bad.{f.name}")
                for f in spec.numeric
            ],
            *[(pl.col(column_names("cat", c)) == 0).sum().alias(f"oov.{c}") for c in cats],
        ).collect(engine="streaming")
        row = stats.row(0, named=True)
        for f in spec.numeric:
            if row[f"bad.{f.name}"]:
                raise DataError(
                    f"{name} split: numeric feature {f.name!r} has {row[f'bad.{f.name}']} rows beyond "
                    f"the float32 range once standardised with the train split's mean {f.mean:g} "
                    f"and std {f.std:g}; remove, clip or rescale them"
                )
        for task in spec.tasks:
            key = "positive_rate" if task.kind == "binary" else "label_mean"
            record.setdefault(key, {}).setdefault(task.name, {})[name] = float(row[task.name])
        for c in cats:
            record.setdefault("oov_share", {}).setdefault(c, {})[name] = (
                row[f"oov.{c}"] / split["rows"]
            )
        all_oov = [c for c in cats if row[f"oov.{c}"] == split["rows"]]
        if name != "train" and all_oov:
            unseen = _warn_unseen(
                raw[name], all_oov, origin=f"{name} split of {origins.get(name) or origins['rows']}"
            )
            if unseen:
                record.setdefault("unseen_categories", {})[name] = unseen
    warn_one_class(
        record.get("positive_rate") or {},
        {name: split["rows"] for name, split in splits.items()},
        origins={
            name: f"{name} split of {origins.get(name) or origins['rows']}" for name in splits
        },
    )
    return record


def warn_one_class(
    positive_rate: Mapping[str, Mapping[str, float]],
    rows: Mapping[str, int],
    *,
    origins: Mapping[str, str],
) -> dict[str, list[str]]:
    """Warn, as the in-memory path's :func:`~mtl.data.data_warnings.warn_one_class_labels`
    does, for each split whose binary label is all 0 or all 1, read from its rate.

    Args:
        positive_rate: the manifest's ``{task: {split: rate}}`` of the binary tasks.
        rows: rows per split.
        origins: per split, its name in the message (``"val split of t.csv"``).

    Returns:
        ``{split: [task, ...]}`` of the labels warned about.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     warn_one_class({"click": {"train": 0.2, "val": 0.0}}, {"train": 8, "val": 2},
        ...                    origins={"train": "train split", "val": "val split"})
        {'val': ['click']}
    """
    warned: dict[str, list[str]] = {}
    for split, n in rows.items():
        for task, rates in positive_rate.items():
            if split not in rates:
                continue
            # A mean of 0/1 labels is exactly 0 or 1 when all agree: the count it stands for.
            message = one_class_label_message(task, rates[split] * n, n, origin=origins[split])
            if message is not None:
                warnings.warn(message, DataWarning, stacklevel=2)
                warned.setdefault(split, []).append(task)
    return warned


def _warn_unseen(raw: pl.LazyFrame, columns: Sequence[str], *, origin: str) -> list[str]:
    """Of ``columns`` (every id of the split at index 0), those holding some value: every
    such value is unseen in train. Warns as the in-memory path's ``warn_unseen_categories``."""
    present = raw.select(pl.col(c).is_not_null().any() for c in columns).collect(engine="streaming")
    unseen = [c for c, any_value in zip(columns, present.row(0), strict=True) if any_value]
    if unseen:
        warn_unseen(origin, unseen)
    return unseen


def warn_unseen(origin: str, columns: Sequence[str]) -> None:
    """The :class:`~mtl.data.validation.UnseenCategoriesWarning` of the in-memory path, for
    ``columns`` of the split ``origin`` whose ids are all unseen in train.

    Example:
        >>> warn_unseen("test split of t.csv", ["item"])  # doctest: +SKIP
        UnseenCategoriesWarning: test split of t.csv: 100% of the ids in categorical column(s) ['item'] ...
    """
    warnings.warn(
        f"{origin}: 100% of the ids in categorical column(s) {list(columns)} are unseen in the "
        "train split (or rarer than min_count), so they all map to the unknown index 0",
        UnseenCategoriesWarning,
        stacklevel=3,
    )
