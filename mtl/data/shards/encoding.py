"""Fitting the feature encoding on a lazy train split, and keeping it as JSON.

:func:`fit_lazy` is :func:`mtl.data.features.fit_features` for data that is not in
memory: the category counts and the numeric sums come from polars' streaming engine,
and the same rules turn them into the encoding
(:func:`~mtl.data.features.vocabulary_from_counts`,
:func:`~mtl.data.features.numeric_feature`, :func:`~mtl.data.features.assemble_fitted`),
so both paths give the same vocabularies, statistics and ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from mtl.data.features import (
    ColumnRoles,
    FittedFeatures,
    assemble_fitted,
    category_counts,
    check_vocab_options,
    numeric_feature,
    vocabulary_from_counts,
)
from mtl.data.spec import FeatureSpec

__all__ = ["fit_lazy", "load_encoding", "save_encoding"]


def fit_lazy(
    train: pl.LazyFrame,
    roles: ColumnRoles,
    *,
    embed_dim: int | Mapping[str, int] | None = None,
    max_embed_dim: int = 16,
    min_count: int = 1,
    max_vocab: int | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> FittedFeatures:
    """Fit vocabularies and numeric statistics on the lazy ``train`` rows, streaming.

    Args:
        train: the train split as a lazy frame (categorical columns as text, numeric
            columns checked and filled: :func:`mtl.data.shards.scan.check_rows`).
        roles: the columns' roles.
        embed_dim: see :func:`mtl.data.features.fit_features`.
        max_embed_dim: see :func:`mtl.data.features.fit_features`.
        min_count: categories seen fewer times map to OOV.
        max_vocab: at most this many categories per column (the most frequent).
        task_weights: loss weight per task.

    Returns:
        The encoding :func:`~mtl.data.features.fit_features` gives on the same rows.

    Example:
        >>> lf = pl.LazyFrame({"c": ["x", "y", "y", None], "n": [1.0, 2.0, 3.0, 4.0], "y": [0, 1, 0, 1]})
        >>> f = fit_lazy(lf, ColumnRoles(categorical=["c"], numeric=["n"], labels={"y": "binary"}))
        >>> f.vocabularies["c"].to_list(), f.spec.numeric[0].mean
        (['x', 'y'], 2.5)
    """
    check_vocab_options(min_count, max_vocab)
    # One query per column: each reads only its column (Parquet) and keeps only the
    # distinct values and their counts; collect_all runs them side by side.
    count_queries = [category_counts(train, name) for name in roles.categorical]
    stats_query = train.select(
        *[pl.col(n).cast(pl.Float64).mean().alias(f"mean{i}") for i, n in enumerate(roles.numeric)],
        *[
            pl.col(n).cast(pl.Float64).std(ddof=0).alias(f"std{i}")
            for i, n in enumerate(roles.numeric)
        ],
        pl.len().alias("rows"),
    )
    # Without common-subplan elimination: with it polars caches the shared scan, i.e.
    # holds every row read in memory until all the queries are done.
    *counts, stats = pl.collect_all(
        [*count_queries, stats_query],
        engine="streaming",
        optimizations=pl.QueryOptFlags(comm_subplan_elim=False),
    )
    if stats["rows"].item() == 0:
        raise ValueError("the train split is empty")
    vocabularies = {
        name: vocabulary_from_counts(c, name, min_count=min_count, max_vocab=max_vocab)
        for name, c in zip(roles.categorical, counts, strict=True)
    }
    row = stats.row(0, named=True)
    numeric = [
        numeric_feature(name, float(row[f"mean{i}"]), float(row[f"std{i}"]))
        for i, name in enumerate(roles.numeric)
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
    """
    if not path.is_file():
        raise FileNotFoundError(f"encoding file not found: {path}")
    payload = json.loads(path.read_text())
    vocabularies = {k: pl.Series(k, v, dtype=pl.String) for k, v in payload["vocabularies"].items()}
    return FittedFeatures(spec=FeatureSpec.from_dict(payload["spec"]), vocabularies=vocabularies)
