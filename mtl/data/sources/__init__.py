"""Data sources for multi-task ranking: raw files or generators -> polars frames + column roles.

Use :func:`load_source` with a registry name::

    data = load_source("synthetic_ctr", n=10_000, seed=0)
    data.train, data.roles.labels
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtl.data.sources.ali_ccp import ali_ccp
from mtl.data.sources.aliexpress import aliexpress
from mtl.data.sources.base import SourceData
from mtl.data.sources.census import census_income
from mtl.data.sources.kuairand import kuairand
from mtl.data.sources.synthetic import synthetic_ctr, synthetic_mmoe
from mtl.data.sources.table import table
from mtl.data.validation import check_row_limit

SOURCES: dict[str, Callable[..., SourceData]] = {
    "synthetic_mmoe": synthetic_mmoe,
    "synthetic_ctr": synthetic_ctr,
    "census_income": census_income,
    "aliexpress": aliexpress,
    "ali_ccp": ali_ccp,
    "kuairand": kuairand,
    "table": table,
}


def load_source(name: str, **kwargs: Any) -> SourceData:
    """Load the source registered as ``name`` with its keyword arguments.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names), or
            ``n_rows`` is not a positive integer or None.

    Example:
        >>> load_source("synthetic_mmoe", n=10, correlation=0.5, d=4).train.height
        10
    """
    try:
        loader = SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown data source {name!r}; known sources: {sorted(SOURCES)}"
        ) from None
    check_row_limit(kwargs.get("n_rows"), key=f"source_kwargs.n_rows of data source {name!r}")
    return loader(**kwargs)


__all__ = [
    "SOURCES",
    "SourceData",
    "ali_ccp",
    "aliexpress",
    "census_income",
    "kuairand",
    "load_source",
    "synthetic_ctr",
    "synthetic_mmoe",
    "table",
]
