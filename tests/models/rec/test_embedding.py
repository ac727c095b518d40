"""FeatureEmbedding: shapes, table sizes, OOV row, numeric pass-through, gradients."""

from __future__ import annotations

import pytest
import torch

from mtl.data.features import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.models.rec.embedding import FeatureEmbedding


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec(
        categorical=[CategoricalFeature("user", 50, 8), CategoricalFeature("device", 3, 4)],
        numeric=[NumericFeature("price", 10.0, 2.0), NumericFeature("age", 30.0, 5.0)],
        tasks=[TaskSpec("click", "binary"), TaskSpec("like", "binary")],
    )


def test_tables_and_output_dim(spec: FeatureSpec) -> None:
    emb = FeatureEmbedding(spec=spec)
    assert [t.num_embeddings for t in emb.tables] == [51, 4]  # vocab + OOV row 0
    assert [t.embedding_dim for t in emb.tables] == [8, 4]
    assert emb.output_dim == 8 + 4 + 2
    cat = torch.tensor([[0, 3], [50, 1], [7, 0]])
    num = torch.tensor([[0.5, -1.0], [0.0, 0.0], [2.0, 3.0]])
    out = emb(cat, num)
    assert out.shape == (3, 14)
    # Layout: user embedding, device embedding, then the numeric values unchanged.
    assert torch.equal(out[:, :8], emb.tables[0].weight[cat[:, 0]])
    assert torch.equal(out[:, 8:12], emb.tables[1].weight[cat[:, 1]])
    assert torch.equal(out[:, 12:], num)


def test_oov_row_is_trainable(spec: FeatureSpec) -> None:
    emb = FeatureEmbedding(spec=spec)
    assert emb.tables[0].weight[0].abs().sum() > 0  # not a zero padding row
    out = emb(torch.tensor([[0, 0]]), torch.zeros(1, 2))
    out.sum().backward()
    grad = emb.tables[0].weight.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_init_std_controls_scale(spec: FeatureSpec) -> None:
    torch.manual_seed(0)
    std = FeatureEmbedding(spec=spec, init_std=0.05).tables[0].weight.std().item()
    assert std == pytest.approx(0.05, rel=0.2)


def test_numeric_only_and_categorical_only() -> None:
    tasks = [TaskSpec("y", "regression")]
    num_only = FeatureEmbedding(
        spec=FeatureSpec(categorical=[], numeric=[NumericFeature("x", 0.0, 1.0)], tasks=tasks)
    )
    x = torch.randn(4, 1)
    assert (
        torch.equal(num_only(torch.zeros(4, 0, dtype=torch.long), x), x)
        and num_only.output_dim == 1
    )
    cat_only = FeatureEmbedding(
        spec=FeatureSpec(categorical=[CategoricalFeature("c", 5, 3)], numeric=[], tasks=tasks)
    )
    assert cat_only(torch.tensor([[1], [5]]), torch.zeros(2, 0)).shape == (2, 3)


def test_shape_errors_and_out_of_range(spec: FeatureSpec) -> None:
    emb = FeatureEmbedding(spec=spec)
    with pytest.raises(ValueError, match=r"cat must have shape \(B, 2\), got \(3, 1\)"):
        emb(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"num must have shape \(B, 2\)"):
        emb(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(IndexError):
        emb(torch.tensor([[51, 0]]), torch.zeros(1, 2))  # index beyond vocab_size
    with pytest.raises(TypeError):
        FeatureEmbedding(spec)  # type: ignore[misc]  # keyword-only
