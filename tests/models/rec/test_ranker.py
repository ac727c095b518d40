"""Ranker: the folded path (embedding projected into the model's first layer) equals the plain one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.data.spec import CategoricalFeature, FeatureSpec, NumericFeature, TaskSpec
from mtl.models.rec import PLE, HoME, MMoE, OMoE, SharedBottom
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.models.rec.ranker import ProjectsInput, Ranker

TASKS = ["click", "like"]
B = 64


def _spec() -> FeatureSpec:
    """Width-4 and width-2 fields fold at B=64; the width-8 table holds an id and does not."""
    return FeatureSpec(
        categorical=[
            CategoricalFeature("city", 12, 4),
            CategoricalFeature("user", 500, 8),
            CategoricalFeature("device", 3, 4),
            CategoricalFeature("os", 2, 2),
            CategoricalFeature("hour", 23, 8),
        ],
        numeric=[NumericFeature("price", 0.0, 1.0), NumericFeature("age", 0.0, 1.0)],
        tasks=[TaskSpec(t, "binary") for t in TASKS],
    )


def _batch(spec: FeatureSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack(
        [torch.randint(0, f.vocab_size + 1, (B,), generator=g) for f in spec.categorical], dim=1
    )
    return cat, torch.randn(B, spec.n_numeric, generator=g)


def _model(name: str, d_in: int) -> nn.Module:
    if name == "mmoe":  # torch-rechub's layout: batch norm in experts, gates and towers
        return MMoE(
            d_in=d_in,
            tasks=TASKS,
            num_experts=3,
            expert_hidden=[8],
            tower_hidden=[4],
            expert_norm=True,
            gate_norm=True,
            tower_norm=True,
        )
    if name == "omoe":
        return OMoE(d_in=d_in, tasks=TASKS, num_experts=3, expert_hidden=[8, 6], tower_hidden=[4])
    return PLE(
        d_in=d_in,
        tasks=TASKS,
        num_levels=2,
        num_shared_experts=1,
        num_task_experts=1,
        expert_hidden=[8],
        tower_hidden=[4],
        expert_norm=True,
    )


@pytest.mark.parametrize("name", ["mmoe", "omoe", "ple"])
def test_folded_path_equals_plain_path_in_logits_and_every_gradient(name: str) -> None:
    torch.manual_seed(0)
    spec = _spec()
    emb = FeatureEmbedding(spec=spec, init_std=0.5)
    ranker = Ranker(embedding=emb, model=_model(name, emb.output_dim))
    assert isinstance(ranker.model, ProjectsInput)
    assert emb.folds(B) == [True, True, False]  # tables by width: 2, 4, 8
    assert ranker.folds(B)
    cat, num = _batch(spec)
    folded = ranker(cat, num)
    plain = ranker.model(emb(cat, num))  # the model's reference path
    params = [p for p in ranker.parameters() if p.requires_grad]

    def grads(out: object) -> tuple[torch.Tensor, ...]:
        loss = sum((i + 1.5) * out.logits[t].square().mean() for i, t in enumerate(TASKS))
        return torch.autograd.grad(loss + out.aux_loss, params)

    for t in TASKS:
        torch.testing.assert_close(folded.logits[t], plain.logits[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.gate_weights[t], plain.gate_weights[t])
    got, want = grads(folded), grads(plain)
    for (pname, _), a, b in zip(ranker.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=pname)
    # every table gets gradient through the fold, on each looked-up row only
    for table, g in zip(emb.tables, got[: len(emb.tables)], strict=True):
        assert table.weight.shape == g.shape and g.abs().sum(1).gt(0).any()


def test_ranker_takes_the_plain_path_when_nothing_folds_or_the_model_has_no_seam() -> None:
    torch.manual_seed(1)
    spec = _spec()
    cat, num = _batch(spec)
    no_fold = FeatureEmbedding(spec=spec, fold=False)
    assert not Ranker(embedding=no_fold, model=_model("mmoe", no_fold.output_dim)).folds(B)
    emb = FeatureEmbedding(spec=spec)
    assert not Ranker(embedding=emb, model=_model("mmoe", emb.output_dim)).folds(1)
    for model in (
        HoME(d_in=emb.output_dim, tasks=TASKS, expert_hidden=[8], lora_rank=2),
        SharedBottom(d_in=emb.output_dim, tasks=TASKS, bottom_hidden=[8]),
    ):
        ranker = Ranker(embedding=emb, model=model).eval()
        assert not ranker.folds(B)
        out = ranker(cat, num)
        want = model(emb(cat, num))
        for t in TASKS:
            torch.testing.assert_close(out.logits[t], want.logits[t])
