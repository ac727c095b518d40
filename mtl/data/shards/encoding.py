"""Fitting the feature encoding on a lazy train split, and keeping it as JSON.

:func:`fit_lazy` is :func:`mtl.data.features.fit_features` for data that is not in
memory: one streaming pass hands the train rows over in batches; each batch's value
counts (:func:`~mtl.data.vocabulary.value_counts`, the first step of the in-memory path's
:func:`~mtl.data.vocabulary.category_counts`) and numeric moments are summed into running
totals, written as text once (:func:`~mtl.data.vocabulary.as_text_counts`), and the same rules turn them into the
encoding (:func:`~mtl.data.vocabulary.vocabulary_from_counts`,
:func:`~mtl.data.features.numeric_feature`, :func:`~mtl.data.features.assemble_fitted`),
so both paths give the same vocabularies, statistics and ids, and warn alike about
a column of row ids (:func:`~mtl.data.vocabulary.warn_id_like_columns`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mtl.data.features import ColumnRoles, FittedFeatures, assemble_fitted, numeric_feature
from mtl.data.spec import FeatureSpec
from mtl.data.vocabulary import (
    as_text_counts,
    check_vocab_options,
    value_counts,
    vocabulary_from_counts,
    warn_id_like_columns,
)

__all__ = ["fit_lazy", "load_encoding", "save_encoding"]

_BATCH_ROWS = 50_000
"""Rows per batch: one batch is in memory at a time, and each costs one group-by per column."""
_MERGE_ROWS = 100_000
"""Batch counts of a column wait until they hold this many rows before they are summed."""


class _RunningCounts:
    """One column's value counts (:func:`~mtl.data.vocabulary.value_counts`, in the column's
    own dtype) summed over the batches seen so far; :meth:`total` writes them as text.

    A batch's counts wait in a list until the list holds at least as many rows as the
    total (and ``_MERGE_ROWS``); then all are summed at once. Each counted row is thus
    re-summed a bounded number of times on average, and memory stays within a small
    multiple of the column's distinct values, whatever the number of rows.
    """

    def __init__(self) -> None:
        self._total: pl.DataFrame | None = None
        self._waiting: list[pl.DataFrame] = []
        self._waiting_rows = 0

    def add(self, counts: pl.DataFrame) -> None:
        self._waiting.append(counts)
        self._waiting_rows += counts.height
        if self._waiting_rows >= max(_MERGE_ROWS, self._height()):
            self._merge()

    def _height(self) -> int:
        return 0 if self._total is None else self._total.height

    def _merge(self) -> None:
        parts = ([] if self._total is None else [self._total]) + self._waiting
        self._total = pl.concat(parts).group_by("value").agg(pl.col("n").sum())
        self._waiting, self._waiting_rows = [], 0

    def total(self) -> pl.DataFrame:
        """The counts as :func:`~mtl.data.vocabulary.category_counts` gives them (text values)."""
        if self._waiting:
            self._merge()
        if self._total is None:
            return pl.DataFrame(schema={"value": pl.String, "n": pl.Int64})
        return as_text_counts(self._total)


class _RunningMoments:
    """Count, mean and sum of squared deviations of numeric columns over batches.

    Batches merge with the pairwise update of Chan, Golub and LeVeque (1979), which
    never forms a sum of squares: the std keeps the accuracy of each batch's variance.
    Nulls are skipped, as polars' ``mean``/``std`` skip them; a NaN makes the column's
    mean and std NaN, as it does in polars.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.n = np.zeros(len(names))
        self.mean = np.zeros(len(names))
        self.m2 = np.zeros(len(names))

    def add(self, batch: pl.DataFrame) -> None:
        if not self.names:
            return
        cols = [pl.col(name).cast(pl.Float64) for name in self.names]
        row = batch.select(
            *[c.count().alias(f"n{i}") for i, c in enumerate(cols)],
            *[c.mean().alias(f"mean{i}") for i, c in enumerate(cols)],
            *[c.var(ddof=0).alias(f"var{i}") for i, c in enumerate(cols)],
        ).row(0)
        k = len(self.names)
        # None (a batch without values in a column) reads as NaN, then weighs nothing.
        n, mean, var = (np.array(row[i * k : (i + 1) * k], dtype=np.float64) for i in range(3))
        seen = n > 0
        mean, m2 = np.where(seen, mean, 0.0), np.where(seen, var * n, 0.0)
        total = self.n + n
        share = np.divide(n, total, out=np.zeros(k), where=total > 0)
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta * delta * self.n * share
        self.mean = self.mean + delta * share
        self.n = total

    def std(self) -> np.ndarray:
        """The population std (ddof 0), NaN for a column without values."""
        return np.sqrt(
            np.divide(self.m2, self.n, out=np.full_like(self.m2, math.nan), where=self.n > 0)
        )


def fit_lazy(
    train: pl.LazyFrame,
    roles: ColumnRoles,
    *,
    embed_dim: int | Mapping[str, int] | None = None,
    max_embed_dim: int = 16,
    min_count: int = 1,
    max_vocab: int | None = None,
    task_weights: Mapping[str, float] | None = None,
    origin: str | None = None,
) -> FittedFeatures:
    """Fit vocabularies and numeric statistics on the lazy ``train`` rows in one streaming pass.

    The rows are read once, whatever the number of columns; memory holds one batch of
    rows plus each column's distinct categories and their counts.

    Args:
        train: the train split as a lazy frame (categorical columns as text, numeric
            columns checked and filled: :func:`mtl.data.shards.scan.check_rows`).
        roles: the columns' roles.
        embed_dim: see :func:`mtl.data.features.fit_features`.
        max_embed_dim: see :func:`mtl.data.features.fit_features`.
        min_count: categories seen fewer times map to OOV.
        max_vocab: at most this many categories per column (the most frequent).
        task_weights: loss weight per task.
        origin: the files the rows come from, named in the error for an empty split.

    Returns:
        The encoding :func:`~mtl.data.features.fit_features` gives on the same rows.

    Raises:
        ValueError: the train split is empty, or bad ``min_count``/``max_vocab``.

    Example:
        >>> lf = pl.LazyFrame({"c": ["x", "y", "y", None], "n": [1.0, 2.0, 3.0, 4.0], "y": [0, 1, 0, 1]})
        >>> f = fit_lazy(lf, ColumnRoles(categorical=["c"], numeric=["n"], labels={"y": "binary"}))
        >>> f.vocabularies["c"].to_list(), f.spec.numeric[0].mean
        (['x', 'y'], 2.5)
    """
    check_vocab_options(min_count, max_vocab)
    # Not one polars group-by over all columns (unpivoted to column/value pairs): its
    # streaming group-by keeps every row of a key outside its small table of frequent
    # keys until the end, so with many distinct ids its memory grows with the rows.
    # Batches counted in memory and summed as they come stay bounded.
    columns = [*roles.categorical, *roles.numeric] or train.collect_schema().names()[:1]
    counts = {name: _RunningCounts() for name in roles.categorical}
    moments = _RunningMoments(list(roles.numeric))
    rows = 0
    # maintain_order: batches in row order, so the float sums do not vary between runs.
    for batch in train.select(columns).collect_batches(
        chunk_size=_BATCH_ROWS, maintain_order=True, engine="streaming"
    ):
        rows += batch.height
        for name, running in counts.items():
            running.add(value_counts(batch, name))
        moments.add(batch)
    if rows == 0:
        where = f"{origin}: " if origin else ""
        raise ValueError(
            f"{where}the train split is empty; more rows or other split fractions are needed"
        )
    vocabularies = {
        name: vocabulary_from_counts(
            running.total(), name, min_count=min_count, max_vocab=max_vocab
        )
        for name, running in counts.items()
    }
    # The warning of the in-memory fit: a column of about one id per train row.
    warn_id_like_columns(
        {name: len(vocab) for name, vocab in vocabularies.items()},
        rows,
        min_count=min_count,
        max_vocab=max_vocab,
    )
    numeric = [
        numeric_feature(name, float(mean), float(std))
        for name, mean, std in zip(roles.numeric, moments.mean, moments.std(), strict=True)
    ]
    return assemble_fitted(
        vocabularies=vocabularies,
        numeric=numeric,
        labels=roles.labels,
        user_column=roles.user_column,
        embed_dim=embed_dim,
        max_embed_dim=max_embed_dim,
        task_weights=task_weights,
    )


def save_encoding(fitted: FittedFeatures, path: Path) -> None:
    """Write the spec and the vocabularies as JSON (written to a temporary file, then renamed)."""
    payload: dict[str, Any] = {
        "spec": fitted.spec.to_dict(),
        "vocabularies": {k: v.to_list() for k, v in fitted.vocabularies.items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def load_encoding(path: Path) -> FittedFeatures:
    """The :class:`FittedFeatures` :func:`save_encoding` wrote.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not JSON or lacks the spec or the vocabularies.
    """
    if not path.is_file():
        raise FileNotFoundError(f"encoding file not found: {path}")
    try:
        payload = json.loads(path.read_text())
        vocabularies = {
            k: pl.Series(k, v, dtype=pl.String) for k, v in payload["vocabularies"].items()
        }
        spec = FeatureSpec.from_dict(payload["spec"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not an encoding mtl prepare wrote ({type(exc).__name__}: {exc}); "
            f"re-run `mtl prepare ... out={path.parent} --force` to write the folder again"
        ) from exc
    return FittedFeatures(spec=spec, vocabularies=vocabularies)
