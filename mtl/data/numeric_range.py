"""Numeric features the model can take: finite, and finite once standardised.

Numeric features reach the model as float32 after ``(x - mean) / std`` with the
train split's statistics. An ``inf`` (which polars reads from a CSV as a float),
or a value beyond float32's range (e.g. ``1e308``), would become ``inf`` or ``NaN``
there and, one batch later, NaN weights. Such values are refused where the file
is read (:func:`mtl.data.sources.base.validate_frame`), where the statistics are
fitted (:func:`mtl.data.features.fit_features`) and, for values that fit float32
raw but not standardised by a narrow train distribution, where a split is
encoded (:func:`mtl.data.tabular.encode`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from mtl.data.spec import NumericFeature

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest magnitude a numeric feature may have (about 3.4e38)."""

_EXAMPLES = 3


def out_of_range(col: pl.Series) -> pl.Series:
    """The values of a numeric column that are infinite or beyond ``±FLOAT32_MAX``.

    Null and NaN are not counted (they have their own checks). Integer columns
    never qualify: int64 ends near 9.2e18.

    Example:
        >>> out_of_range(pl.Series("x", [1.0, float("inf"), -1e308, float("nan")])).to_list()
        [inf, -1e+308]
    """
    if not col.dtype.is_float():
        return col.clear()
    # polars orders NaN above every number: leave it out explicitly.
    return col.filter((col.abs() > FLOAT32_MAX) & col.is_not_nan())


def check_in_range(col: pl.Series, origin: str) -> None:
    """Refuse a numeric column with infinite or out-of-range values.

    Args:
        col: the raw column.
        origin: file or split named in the message.

    Raises:
        ValueError: naming ``origin``, the column, how many rows of how many, and examples.

    Example:
        >>> check_in_range(pl.Series("price", [1.0, float("-inf")]), "train.csv")
        Traceback (most recent call last):
        ...
        ValueError: train.csv: numeric feature 'price' has 1 infinite or out-of-range values of 2 rows (|x| > 3.4e+38, the float32 range of the model's inputs), e.g. [-inf]; remove, clip or rescale them
    """
    bad = out_of_range(col)
    if len(bad):
        examples = bad.unique(maintain_order=True).head(_EXAMPLES).to_list()
        raise ValueError(
            f"{origin}: numeric feature {col.name!r} has {len(bad)} infinite or out-of-range "
            f"values of {len(col)} rows (|x| > {FLOAT32_MAX:.2g}, the float32 range of the "
            f"model's inputs), e.g. {examples}; remove, clip or rescale them"
        )


def check_standardised(
    frame: pl.DataFrame, features: Sequence[NumericFeature], origin: str
) -> None:
    """Refuse standardised float32 columns that hold non-finite values.

    A value within float32 range can still overflow once divided by a small train
    standard deviation (e.g. ``1e38`` in the test split, std ``1e-3`` in train).

    Args:
        frame: the standardised columns, named as ``features``.
        features: their train statistics, named in the message.
        origin: the split named in the message.

    Raises:
        ValueError: naming ``origin``, the column, the number of rows, the mean and std.

    Example:
        >>> f = NumericFeature("x", mean=0.0, std=1e-3)
        >>> check_standardised(pl.DataFrame({"x": [1.0, float("inf")]}), [f], "test split")
        Traceback (most recent call last):
        ...
        ValueError: test split: numeric feature 'x' has 1 of 2 rows beyond the float32 range once standardised with the train split's mean 0 and std 0.001; remove, clip or rescale them
    """
    if not features:
        return
    counts = frame.select(
        [(~pl.col(f.name).is_finite()).sum().alias(f.name) for f in features]
    ).row(0, named=True)
    for feat in features:
        if counts[feat.name]:
            raise ValueError(
                f"{origin}: numeric feature {feat.name!r} has {counts[feat.name]} of "
                f"{frame.height} rows beyond the float32 range once standardised with the "
                f"train split's mean {feat.mean:g} and std {feat.std:g}; remove, clip or "
                "rescale them"
            )
