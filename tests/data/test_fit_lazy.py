"""The streaming fit of ``mtl prepare``: it reads the train rows once whatever the number of
columns, and fits the encoding :func:`fit_features` fits in memory on the same rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.io.plugins import register_io_source

import mtl.data.shards.encoding as encoding
from mtl.data.features import ColumnRoles, fit_features
from mtl.data.shards.encoding import fit_lazy

N = 6000


def _table(n: int = N, n_categorical: int = 24, seed: int = 0) -> pl.DataFrame:
    """Categorical columns of ints and strings, skewed (rare values under min_count, more
    distinct values than max_vocab) with nulls; numerics on very different scales."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pl.Series] = {}
    for i in range(n_categorical):
        card = [3, 40, 700, 5000][i % 4]
        v = rng.zipf(1.4, n) % card if i % 2 else rng.integers(0, card, n)
        values = pl.Series(v)
        if i % 3 == 2:
            values = "s" + values.cast(pl.String)
        null = pl.Series(rng.random(n) < [0.0, 0.05, 0.3][i % 3])
        cols[f"c{i}"] = pl.select(pl.when(null).then(None).otherwise(values)).to_series()
    cols["c_null"] = pl.Series([None] * n, dtype=pl.String)  # no category at all
    for j in range(4):
        cols[f"x{j}"] = pl.Series(1e6 * j + rng.lognormal(j, 1.0, n))
    cols["y"] = pl.Series(rng.integers(0, 2, n))
    return pl.DataFrame(cols)


def _roles(df: pl.DataFrame) -> ColumnRoles:
    return ColumnRoles(
        categorical=[c for c in df.columns if c.startswith("c")],
        numeric=[c for c in df.columns if c.startswith("x")],
        labels={"y": "binary"},
    )


def _counted_source(df: pl.DataFrame, reads: list[int]) -> pl.LazyFrame:
    """``df`` as a lazy scan that appends to ``reads`` each time polars starts reading it."""

    def read(
        with_columns: list[str] | None,
        predicate: pl.Expr | None,
        n_rows: int | None,
        batch_size: int | None,
    ) -> Iterator[pl.DataFrame]:
        reads.append(1)
        frame = df if with_columns is None else df.select(with_columns)
        step = batch_size or 1000
        for start in range(0, frame.height if n_rows is None else n_rows, step):
            yield frame.slice(start, step)

    return register_io_source(read, schema=df.schema)


@pytest.mark.parametrize("n_categorical", [2, 24])
def test_rows_are_read_once_whatever_the_number_of_columns(n_categorical: int) -> None:
    df = _table(n=2000, n_categorical=n_categorical)
    reads: list[int] = []
    fitted = fit_lazy(_counted_source(df, reads), _roles(df))
    assert len(reads) == 1
    assert len(fitted.vocabularies) == n_categorical + 1


@pytest.mark.parametrize("source", ["frame", "csv", "parquet"])
@pytest.mark.parametrize(("min_count", "max_vocab"), [(1, None), (3, 25)])
def test_equals_the_in_memory_fit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    min_count: int,
    max_vocab: int | None,
) -> None:
    # Small batches and merges, so that the fit sums counts over many batches and merges.
    monkeypatch.setattr(encoding, "_BATCH_ROWS", 700)
    monkeypatch.setattr(encoding, "_MERGE_ROWS", 500)
    df = _table()
    roles = _roles(df)
    if source == "frame":
        lf = df.lazy()
    elif source == "csv":
        df.write_csv(tmp_path / "t.csv")
        # As mtl prepare reads a CSV: categorical columns as text.
        lf = pl.scan_csv(
            tmp_path / "t.csv", schema_overrides={c: pl.String for c in roles.categorical}
        )
    else:
        df.write_parquet(tmp_path / "t.parquet")
        lf = pl.scan_parquet(tmp_path / "t.parquet")
    got = fit_lazy(lf, roles, min_count=min_count, max_vocab=max_vocab)
    want = fit_features(
        df,
        labels=roles.labels,
        categorical=roles.categorical,
        numeric=roles.numeric,
        min_count=min_count,
        max_vocab=max_vocab,
    )
    assert got.spec.categorical == want.spec.categorical
    assert got.spec.tasks == want.spec.tasks
    for name, vocab in want.vocabularies.items():
        assert got.vocabularies[name].to_list() == vocab.to_list(), name
    # The rules did cut: rare values dropped, long vocabularies capped, the null column empty.
    sizes = [f.vocab_size for f in want.spec.categorical]
    assert sizes[-1] == 0 and max(sizes) <= (max_vocab or 5000)
    distinct = [df[c].drop_nulls().n_unique() for c in roles.categorical]
    assert any(s < d for s, d in zip(sizes, distinct, strict=True)) == (min_count > 1)
    for a, b in zip(got.spec.numeric, want.spec.numeric, strict=True):
        assert a.name == b.name
        assert a.mean == pytest.approx(b.mean, rel=1e-12)
        assert a.std == pytest.approx(b.std, rel=1e-12)


def test_numeric_moments_over_batches_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of uneven size, values far from zero (a sum of squares would lose the std),
    # and nulls that leave a whole batch of one column without values.
    monkeypatch.setattr(encoding, "_BATCH_ROWS", 333)
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(0.0, 1.0, 3000)
    z = rng.normal(5.0, 2.0, 3000)
    zs = [None if 400 <= i < 1200 else float(v) for i, v in enumerate(z)]
    df = pl.DataFrame({"x": x, "z": zs, "y": rng.integers(0, 2, 3000)})
    fitted = fit_lazy(df.lazy(), ColumnRoles(numeric=["x", "z"], labels={"y": "binary"}))
    kept = np.array([v for v in zs if v is not None])
    (fx, fz) = fitted.spec.numeric
    assert fx.mean == pytest.approx(np.mean(x), rel=1e-15)
    assert fx.std == pytest.approx(np.std(x), rel=1e-10)
    assert fz.mean == pytest.approx(np.mean(kept), rel=1e-12)
    assert fz.std == pytest.approx(np.std(kept), rel=1e-12)


def test_an_empty_train_split_is_refused() -> None:
    lf = pl.LazyFrame({"c": ["a"], "x": [1.0], "y": [1]}).filter(pl.col("y") == 0)
    with pytest.raises(ValueError, match="empty"):
        fit_lazy(lf, ColumnRoles(categorical=["c"], numeric=["x"], labels={"y": "binary"}))
