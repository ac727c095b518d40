"""FeatureEmbedding: layout, shared tables, OOV row, numeric pass-through, the fold, errors."""

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
    assert [tuple(emb.feature_weight(j).shape) for j in range(2)] == [(51, 8), (4, 4)]  # + OOV row
    assert emb.output_dim == 8 + 4 + 2
    cat = torch.tensor([[0, 3], [50, 1], [7, 0]])
    num = torch.tensor([[0.5, -1.0], [0.0, 0.0], [2.0, 3.0]])
    out = emb(cat, num)
    assert out.shape == (3, 14)
    # Layout: user embedding, device embedding, then the numeric values unchanged.
    assert torch.equal(out[:, :8], emb.feature_weight(0)[cat[:, 0]])
    assert torch.equal(out[:, 8:12], emb.feature_weight(1)[cat[:, 1]])
    assert torch.equal(out[:, 12:], num)


def test_oov_row_is_trainable(spec: FeatureSpec) -> None:
    emb = FeatureEmbedding(spec=spec)
    assert emb.feature_weight(0)[0].abs().sum() > 0  # not a zero padding row
    out = emb(torch.tensor([[0, 0]]), torch.zeros(1, 2))
    out.sum().backward()
    user_grad = emb.tables[1].weight.grad  # the width-8 table holds only 'user'
    # d(sum of the output)/d(row 0) is one per column of the row; no other row was read
    want = torch.zeros(51, 8)
    want[0] = 1.0
    assert user_grad is not None and torch.equal(user_grad, want)


def test_init_std_controls_scale(spec: FeatureSpec) -> None:
    torch.manual_seed(0)
    std = FeatureEmbedding(spec=spec, init_std=0.05).feature_weight(0).std().item()
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
    with pytest.raises(IndexError, match=r"feature 'user' has an index outside \[0, 50\]"):
        emb(torch.tensor([[51, 0]]), torch.zeros(1, 2))  # would land in another feature's rows
    with pytest.raises(IndexError, match="feature 'device'"):
        emb(torch.tensor([[1, -1]]), torch.zeros(1, 2))
    with pytest.raises(TypeError):
        FeatureEmbedding(spec)  # type: ignore[misc]  # keyword-only


def _equal_width_spec(widths: list[int]) -> FeatureSpec:
    return FeatureSpec(
        categorical=[CategoricalFeature(f"f{j}", 5 + j, w) for j, w in enumerate(widths)],
        numeric=[NumericFeature("x", 0.0, 1.0)],
        tasks=[TaskSpec("y", "binary")],
    )


@pytest.mark.parametrize("widths", [[4, 4, 4], [4, 8, 4, 2], [2, 4, 8]])
def test_matches_one_table_per_feature(widths: list[int]) -> None:
    """Stacked tables give exactly what separate per-feature tables would, in spec order."""
    torch.manual_seed(0)
    spec = _equal_width_spec(widths)
    emb = FeatureEmbedding(spec=spec)
    assert len(emb.tables) == len(set(widths))  # one table per distinct width
    cat = torch.stack([torch.randint(0, 6 + j, (16,)) for j in range(len(widths))], dim=1)
    num = torch.randn(16, 1)
    out = emb(cat, num)
    expected = torch.cat(
        [emb.feature_weight(j)[cat[:, j]] for j in range(len(widths))] + [num], dim=1
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # gradients reach each feature's own rows only
    w = torch.randn_like(out)
    (out * w).sum().backward()
    col = 0
    for j, width in enumerate(widths):
        table = next(t for t in emb.tables if t.embedding_dim == width)
        start = sum(spec.categorical[i].vocab_size + 1 for i in range(j) if widths[i] == width)
        grad = table.weight.grad[start : start + spec.categorical[j].vocab_size + 1]
        ref = torch.zeros_like(grad).index_add_(0, cat[:, j], w[:, col : col + width])
        torch.testing.assert_close(grad, ref)
        col += width


def _assert_project_matches_plain_product(
    emb: FeatureEmbedding, cat: torch.Tensor, num: torch.Tensor, n_out: int
) -> None:
    """``project`` equals ``forward() @ W`` in value and in every gradient."""
    w = torch.randn(emb.output_dim, n_out, requires_grad=True)
    z = emb.project(cat, num, w)
    ref = emb(cat, num) @ w
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(z)
    params = [*emb.parameters(), w]
    for a, b in zip(
        torch.autograd.grad((z * g).sum(), params),
        torch.autograd.grad((ref * g).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("widths", [[4, 4, 4], [4, 8, 4, 2]])
def test_project_equals_embedding_times_weight(widths: list[int], fold: bool) -> None:
    """Folded or not, ``project`` gives ``forward() @ W`` and the same gradients."""
    torch.manual_seed(1)
    spec = _equal_width_spec(widths)
    emb = FeatureEmbedding(spec=spec, fold=fold)
    B = 64
    assert any(emb.folds(B)) == fold  # tiny vocabularies: folding pays at B=64
    cat = torch.stack([torch.randint(0, 6 + j, (B,)) for j in range(len(widths))], dim=1)
    num = torch.randn(B, 1)
    _assert_project_matches_plain_product(emb, cat, num, n_out=7)


def test_project_pads_features_of_different_vocabularies_in_one_table() -> None:
    """Each feature's rows are padded to the table's largest; the padding is never looked up."""
    torch.manual_seed(2)
    vocab = [2, 2, 3, 8, 8, 7, 40, 38]
    spec = FeatureSpec(
        categorical=[CategoricalFeature(f"f{j}", v, 4) for j, v in enumerate(vocab)],
        numeric=[NumericFeature("x", 0.0, 1.0)],
        tasks=[TaskSpec("y", "binary")],
    )
    emb = FeatureEmbedding(spec=spec)
    assert emb.folds(256) == [True]
    cat = torch.stack([torch.randint(0, v + 1, (256,)) for v in vocab], dim=1)
    cat[:4] = torch.tensor(vocab)  # every feature's last row
    num = torch.randn(256, 1)
    _assert_project_matches_plain_product(emb, cat, num, n_out=5)


def test_folding_rule_picks_small_tables_only() -> None:
    spec = FeatureSpec(
        categorical=[
            CategoricalFeature("user", 5000, 8),  # big: gathered
            CategoricalFeature("device", 3, 4),  # small: folded
            CategoricalFeature("os", 2, 4),
        ],
        numeric=[],
        tasks=[TaskSpec("y", "binary")],
    )
    emb = FeatureEmbedding(spec=spec)
    assert emb.folds(1024) == [True, False]  # tables ordered by width: 4, 8
    assert emb.folds(1) == [False, False]
    cat = torch.tensor([[4999, 3, 2], [0, 0, 0]])
    w = torch.randn(emb.output_dim, 3)
    torch.testing.assert_close(
        emb.project(cat, torch.zeros(2, 0), w), emb(cat, torch.zeros(2, 0)) @ w
    )
    with pytest.raises(IndexError, match="feature 'device'"):
        emb.project(torch.tensor([[1, 4, 0]]), torch.zeros(1, 0), w)
    with pytest.raises(ValueError, match=r"weight must be \(16, N\)"):
        emb.project(cat, torch.zeros(2, 0), torch.randn(15, 3))


def test_project_is_float32_under_autocast(spec: FeatureSpec) -> None:
    emb = FeatureEmbedding(spec=spec)
    cat = torch.tensor([[3, 1], [0, 2]])
    num = torch.randn(2, 2)
    w = torch.randn(emb.output_dim, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = emb.project(cat, num, w)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, emb(cat, num) @ w)


def test_a_table_with_an_id_stays_gathered_and_its_own_width_lets_the_rest_fold() -> None:
    torch.manual_seed(3)
    vocab = [3000, 5, 9, 17, 60, 4]
    B = 512

    def spec(id_width: int) -> FeatureSpec:
        widths = [id_width] + [4] * (len(vocab) - 1)
        return FeatureSpec(
            categorical=[
                CategoricalFeature(f"f{j}", v, w)
                for j, (v, w) in enumerate(zip(vocab, widths, strict=True))
            ],
            numeric=[NumericFeature("x", 0.0, 1.0)],
            tasks=[TaskSpec("y", "binary")],
        )

    assert FeatureEmbedding(spec=spec(4)).folds(B) == [False]  # one table, padded to 3001 rows
    emb = FeatureEmbedding(spec=spec(8))
    assert emb.folds(B) == [True, False]  # tables ordered by width: 4, 8
    cat = torch.stack([torch.randint(0, v + 1, (B,)) for v in vocab], dim=1)
    num = torch.randn(B, 1)
    _assert_project_matches_plain_product(emb, cat, num, n_out=6)
    with pytest.raises(IndexError, match="feature 'f2'"):
        bad = cat.clone()
        bad[0, 2] = 10
        emb.project(bad, num, torch.randn(emb.output_dim, 6))
