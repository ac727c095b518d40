"""Feature spec fitting: vocabularies, OOV, standardisation, role inference."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from mtl.data.features import (
    CategoricalFeature,
    FeatureSpec,
    NumericFeature,
    TaskSpec,
    default_embed_dim,
    fit_features,
    infer_roles,
)
from mtl.data.tabular import encode


@pytest.fixture
def train() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "color": ["red", "blue", "red", None, "green", "blue"],
            "code": [3, 1, 3, 2, 1, 1],
            "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "clicks": [10, 200, 3000, 40_000, 5, 6],
            "y": [0, 1, 0, 1, 1, 0],
        }
    )


def test_vocabulary_is_sorted_and_oov_is_zero(train: pl.DataFrame) -> None:
    fitted = fit_features(
        train, categorical=["color", "code"], numeric=["price"], labels={"y": "binary"}
    )
    assert fitted.vocabularies["color"].to_list() == ["blue", "green", "red"]
    assert [c.vocab_size for c in fitted.spec.categorical] == [3, 3]
    test = pl.DataFrame(
        {
            "color": ["red", "purple", None, "blue"],
            "code": [1, 9, 3, 2],
            "price": [0.0] * 4,
            "y": [0, 0, 1, 1],
        }
    )
    cat = encode(test, fitted).cat_BF
    # red=3, purple unseen -> 0, null -> 0, blue=1; codes "1","2","3" -> 1,2,3, unseen 9 -> 0
    assert cat.tolist() == [[3, 1], [0, 0], [0, 3], [1, 2]]
    assert cat.dtype == torch.int64


def test_train_null_maps_to_oov(train: pl.DataFrame) -> None:
    fitted = fit_features(train, categorical=["color"], numeric=[], labels={"y": "binary"})
    assert encode(train, fitted).cat_BF[:, 0].tolist() == [3, 1, 3, 0, 2, 1]


def test_min_count_sends_rare_categories_to_oov(train: pl.DataFrame) -> None:
    fitted = fit_features(
        train, categorical=["color"], numeric=[], labels={"y": "binary"}, min_count=2
    )
    assert fitted.vocabularies["color"].to_list() == ["blue", "red"]
    assert encode(train, fitted).cat_BF[:, 0].tolist() == [2, 1, 2, 0, 0, 1]


def test_numeric_standardised_with_train_statistics(train: pl.DataFrame) -> None:
    fitted = fit_features(
        train, categorical=[], numeric=["price", "clicks"], labels={"y": "binary"}
    )
    price = fitted.spec.numeric[0]
    assert price.mean == pytest.approx(3.5)
    assert price.std == pytest.approx(1.707825, rel=1e-5)  # population std of 1..6
    num = encode(train, fitted).num_BF
    assert num.dtype == torch.float32
    assert torch.allclose(num.mean(0), torch.zeros(2), atol=1e-6)
    assert torch.allclose(num.std(0, unbiased=False), torch.ones(2), atol=1e-5)
    # Other splits use the TRAIN statistics, not their own.
    other = encode(
        pl.DataFrame({"price": [3.5, 7.0], "clicks": [0, 0], "y": [0, 1]}), fitted
    ).num_BF
    assert other[:, 0].tolist() == pytest.approx([0.0, 3.5 / 1.707825], rel=1e-5)


def test_constant_numeric_column_does_not_divide_by_zero() -> None:
    df = pl.DataFrame({"x": [2.0, 2.0, 2.0], "y": [0, 1, 0]})
    fitted = fit_features(df, categorical=[], numeric=["x"], labels={"y": "binary"})
    assert fitted.spec.numeric[0].std == 1.0
    assert encode(df, fitted).num_BF.abs().sum().item() == 0.0


def test_embed_dim_rule_and_fixed(train: pl.DataFrame) -> None:
    assert [default_embed_dim(v) for v in (1, 2, 10, 100, 10**6)] == [6, 7, 11, 16, 16]
    assert default_embed_dim(10**6, max_dim=32) == 32
    spec = fit_features(
        train, categorical=["color"], numeric=[], labels={"y": "binary"}, embed_dim=5
    ).spec
    assert spec.categorical[0].embed_dim == 5
    spec = fit_features(
        train,
        categorical=["color", "code"],
        numeric=[],
        labels={"y": "binary"},
        embed_dim={"code": 3},
    ).spec
    assert [c.embed_dim for c in spec.categorical] == [default_embed_dim(3), 3]


def test_infer_roles_from_schema(train: pl.DataFrame) -> None:
    roles = infer_roles(train, labels={"y": "binary"}, max_int_categories=4)
    assert roles.categorical == ["color", "code"]  # string; integer with 3 distinct values
    assert roles.numeric == ["price", "clicks"]  # float; integer with 6 > 4 distinct values
    fitted = fit_features(train, labels={"y": "binary"}, max_int_categories=4)
    assert [c.name for c in fitted.spec.categorical] == ["color", "code"]
    assert [n.name for n in fitted.spec.numeric] == ["price", "clicks"]


def test_spec_round_trips_through_dict(train: pl.DataFrame) -> None:
    spec = fit_features(
        train,
        categorical=["color"],
        numeric=["price"],
        labels={"y": "binary"},
        user_column="code",
        task_weights={"y": 2.0},
    ).spec
    again = FeatureSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.tasks == [TaskSpec("y", "binary", 2.0)]
    assert (again.n_categorical, again.n_numeric, again.n_tasks, again.user_column) == (
        1,
        1,
        1,
        "code",
    )


def test_errors_name_the_column(train: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskSpec("y", "multiclass")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        fit_features(train, categorical=["nope"], numeric=[], labels={"y": "binary"})
    with_null = train.with_columns(pl.Series("price", [1.0, None, float("nan"), 4.0, 5.0, 6.0]))
    with pytest.raises(ValueError, match=r"'price' has 2 null/NaN"):
        fit_features(with_null, categorical=[], numeric=["price"], labels={"y": "binary"})
    with pytest.raises(ValueError, match="more than one role"):
        fit_features(train, categorical=["y"], numeric=[], labels={"y": "binary"})


def test_dataclasses_are_plain_values() -> None:
    assert CategoricalFeature("a", 3, 4) == CategoricalFeature(name="a", vocab_size=3, embed_dim=4)
    assert NumericFeature("x", 0.0, 1.0).std == 1.0
