"""The data module of ``data=table``: the table source's options as top-level ``data.*`` keys.

:class:`TableDataModule` is a :class:`~mtl.data.datamodule.RecDataModule` over the
``table`` source (:func:`mtl.data.sources.table.table`) whose config names the file
and its columns directly (``data.path``, ``data.labels``, ``data.user``,
``data.split_by``...) instead of under ``source_kwargs``: bringing one's own file is
the common case, and these keys are what a user types.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from mtl.data.datamodule import SPLITS, RecDataModule, Split
from mtl.data.features import names_list
from mtl.data.sources import SourceData, load_source
from mtl.data.sources.table import split_files, table_files
from mtl.data.validation import check_row_limit


def _fractions(values: Sequence[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


class TableDataModule(RecDataModule):
    """Rows of CSV, TSV, Parquet or NDJSON files with the column roles given in the config.

    Args:
        path: the rows: a file, a folder of table files, or a glob.
        labels: label columns (one task each); one name alone is a list of one.
        categorical: categorical feature columns (or one name).
        numeric: numeric feature columns (or one name).
        user: user column for per-user metrics (GAUC), or None.
        task_kinds: ``binary`` (default) or ``regression`` per label (list or mapping).
        separator: CSV separator (default ``,``; tab for ``.tsv``).
        null_values: CSV strings read as missing.
        fill_numeric_nulls: value for missing numeric features (default: refuse them).
        train: the train rows' files, instead of ``path``.
        val: validation files (default: carved from the train rows).
        test: test files (default: carved from the train rows).
        split_by: time column: the carved splits are the latest rows, not random ones.
        split: (train, val, test) fractions of the carved splits.
        n_rows: read only the first rows of each file.
        embed_dim: one width for every categorical feature, a mapping
            ``{feature: width}`` (the others use the default rule), or None.
        name: the data's name in messages and run records (a preset's dataset name).
        kwargs: the other :class:`RecDataModule` arguments (``seed``, ``batch_size``...).

    Example:
        >>> dm = TableDataModule(path="clicks.csv", labels=["click"], categorical=["item"],
        ...                      numeric=["price"], split_by="ts")  # doctest: +SKIP
        >>> dm.setup("fit"); dm.split_summary()["how"]  # doctest: +SKIP
        "by time on 'ts': the earliest 0.8 of the rows train, the next 0.1 val, the latest 0.1 test"
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        labels: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        numeric: Sequence[str] | None = None,
        user: str | None = None,
        task_kinds: Sequence[str] | Mapping[str, str] | None = None,
        separator: str | None = None,
        null_values: Sequence[str] | None = None,
        fill_numeric_nulls: float | None = None,
        train: str | os.PathLike[str] | None = None,
        val: str | os.PathLike[str] | None = None,
        test: str | os.PathLike[str] | None = None,
        split_by: str | None = None,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        n_rows: int | None = None,
        embed_dim: int | Mapping[str, int] | None = None,
        name: str = "table",
        **kwargs: Any,
    ) -> None:
        # From the command line a single name arrives as text: data.labels=click.
        labels = names_list(labels, key="data.labels")
        categorical = names_list(categorical, key="data.categorical")
        numeric = names_list(numeric, key="data.numeric")
        if isinstance(null_values, str):  # data.null_values=NA: that one string, "" included
            null_values = [null_values]
        # Checked here so the message names the config key (the source would say source_kwargs).
        check_row_limit(n_rows, key="data.n_rows")
        if not labels:
            raise ValueError(
                "data=table needs data.labels=[...], the label columns (e.g. data.labels=[click])"
            )
        if not categorical and not numeric:
            raise ValueError(
                "data=table needs feature columns: data.categorical=[...] and/or data.numeric=[...]"
            )
        if isinstance(embed_dim, Mapping):
            unknown = [n for n in embed_dim if n not in categorical]
            if unknown:
                raise ValueError(
                    f"data.embed_dim names {unknown}, which are not in data.categorical {categorical}"
                )
        source_kwargs = {
            "path": path,
            "labels": labels,
            "categorical": categorical,
            "numeric": numeric,
            "user": user,
            "task_kinds": task_kinds,
            "separator": separator,
            "null_values": null_values,
            "fill_numeric_nulls": fill_numeric_nulls,
            "train": train,
            "val": val,
            "test": test,
            "split_by": split_by,
            "split": list(split),
            "n_rows": n_rows,
        }
        # The source's own val/test rows are the time split or the user's files: always used.
        super().__init__(
            source=name,
            source_kwargs=source_kwargs,
            split=split,
            use_source_test=True,
            embed_dim=embed_dim,  # type: ignore[arg-type]  # fit_features takes a mapping too
            **kwargs,
        )
        self._time_ranges: dict[Split, list[str]] = {}

    def _load(self) -> SourceData:
        # ``source`` is the data's name here (a preset's); the rows always come from the table.
        return load_source("table", **self.source_kwargs)

    def _split(self, data: SourceData) -> dict[Split, pl.DataFrame]:
        frames = super()._split(data)
        column = self.source_kwargs["split_by"]
        if column:
            self._time_ranges = {
                name: [str(frame[column].min()), str(frame[column].max())]
                for name, frame in frames.items()
            }
        return frames

    def files(self) -> dict[str, list[str]]:
        """The files read for the rows (``path`` or ``train``), ``val`` and ``test``."""
        kw = self.source_kwargs
        named = split_files(kw["path"], train=kw["train"], val=kw["val"], test=kw["test"])
        return {
            "rows" if k in ("path", "train") else k: [str(p) for p in table_files(v, key=k)]
            for k, v in named.items()
        }

    def split_how(self) -> str:
        """How the splits were made: at random, by time on ``split_by``, or from files."""
        kw = self.source_kwargs
        from_files = [s for s in ("val", "test") if kw[s]]
        carved = [s for s in ("val", "test") if not kw[s]]
        fracs = dict(zip(SPLITS, self.split, strict=True))
        column = kw["split_by"]
        if column and carved:
            parts = ", ".join(
                f"the {'latest' if s == carved[-1] else 'next'} {fracs[s]:g} {s}" for s in carved
            )
            how = (
                f"by time on {column!r}: the earliest {fracs['train']:g} of the rows train, {parts}"
            )
        elif len(carved) == 2:
            how = f"random {_fractions(self.split)} split (split_seed {self.split_seed})"
        elif carved:
            share = fracs[carved[0]] / (fracs["train"] + fracs[carved[0]])
            how = f"{carved[0]}: a random {share:.3g} of the train rows (split_seed {self.split_seed})"
        else:
            how = "train, val and test from their own files"
        if from_files and carved:
            how += "; " + ", ".join(f"{s} from data.{s}" for s in from_files)
        return how

    def split_summary(self) -> dict[str, Any]:
        """The :meth:`RecDataModule.split_summary` record, with each split's time range
        (``time_range``) for a time split."""
        summary = super().split_summary()
        if self._time_ranges:
            summary["time_range"] = dict(self._time_ranges)
        return summary
