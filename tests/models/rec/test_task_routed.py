"""Task-routed MoE: one gate shared by the tasks, routing on a learned task embedding."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mtl.data.spec import CategoricalFeature, FeatureSpec, TaskSpec
from mtl.models.rec import Ranker, TaskRoutedMoE
from mtl.models.rec.embedding import FeatureEmbedding
from mtl.moe import TopKGate

from .helpers import TASKS, fit, synthetic_batch, task_loss

D = 16


def _model(**kw: object) -> TaskRoutedMoE:
    torch.manual_seed(0)
    args: dict[str, object] = {
        "d_in": D,
        "tasks": TASKS,
        "num_experts": 4,
        "expert_hidden": [32],
        "tower_hidden": [16],
        "task_dim": 8,
    }
    return TaskRoutedMoE(**{**args, **kw})  # type: ignore[arg-type]


def test_routing_on_the_task_depends_on_the_task_only() -> None:
    model = _model(route_on="task").eval()
    x, other = torch.randn(6, D), torch.randn(6, D) * 3
    with torch.no_grad():
        w = model(x).gate_weights
        w_other = model(other).gate_weights
    for t in TASKS:
        # changing x with the same condition leaves the routing unchanged
        torch.testing.assert_close(w[t], w_other[t], atol=0, rtol=0)
        assert torch.equal(w[t], w[t][:1].expand_as(w[t]))
    # changing the condition changes it
    assert not torch.allclose(w["click"], w["like"], atol=1e-4)
    # and it is the gate applied to the task's embedding, computed by hand
    emb = model.task_embedding.weight[TASKS.index("like")]
    expected = torch.softmax(model.gate.proj(emb).float(), dim=-1)
    torch.testing.assert_close(w["like"][0], expected.detach())


def test_routing_on_task_and_input_depends_on_both() -> None:
    model = _model(route_on="task_and_input").eval()
    x = torch.randn(6, D)
    with torch.no_grad():
        w = model(x).gate_weights
        w_other = model(x + 1.0).gate_weights
    assert not torch.allclose(w["click"], w_other["click"], atol=1e-4)  # depends on x
    assert not torch.allclose(w["click"], w["like"], atol=1e-4)  # and on the task
    assert not torch.allclose(w["click"][0], w["click"][1], atol=1e-4)  # per example


def test_mixture_is_the_naive_weighted_sum_of_experts() -> None:
    model = _model(route_on="task_and_input").eval()
    x = torch.randn(5, D)
    with torch.no_grad():
        out = model(x)
        for t in TASKS:
            g = model.gate(
                torch.cat([model.task_embedding.weight[TASKS.index(t)].expand(5, -1), x], -1)
            )
            w = g.dense_weights()
            h = sum(w[:, e : e + 1] * model.experts.forward_all(x)[e] for e in range(4))
            torch.testing.assert_close(
                out.logits[t], model.towers.towers[t](h), atol=1e-6, rtol=1e-6
            )


@pytest.mark.parametrize("route_on", ["task", "task_and_input"])
def test_gradients_reach_the_task_embedding_and_the_gate(route_on: str) -> None:
    """The gradients equal those of the same mixture written out by hand."""
    model = _model(route_on=route_on)
    x, labels = synthetic_batch(n=32, d=D)
    loss = task_loss(model(x), labels)
    params = (model.task_embedding.weight, *model.gate.proj.parameters())
    got = torch.autograd.grad(loss, params)
    # by hand: softmax gate on [task vector (, x)], weighted sum of experts, the task's tower
    h_E = model.experts.forward_all(x)
    bce = []
    for i, t in enumerate(TASKS):
        vec = model.task_embedding.weight[i].expand(len(x), -1)
        gate_in = vec if route_on == "task" else torch.cat([vec, x], -1)
        w = torch.softmax(model.gate.proj(gate_in), -1)
        h = sum(w[:, e : e + 1] * h_E[e] for e in range(4))
        bce.append(F.binary_cross_entropy_with_logits(model.towers.towers[t](h), labels[t]))
    ref = torch.stack(bce).mean()
    torch.testing.assert_close(loss, ref)
    want = torch.autograd.grad(ref, params)
    assert (want[0].abs().sum(1) > 1e-6).all()  # every task's row
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("route_on", ["task", "task_and_input"])
def test_task_routed_model_overfits_one_batch(route_on: str) -> None:
    torch.manual_seed(0)
    x, labels = synthetic_batch()
    model = _model(route_on=route_on, dropout=0.0)
    with torch.no_grad():
        initial = float(task_loss(model(x), labels))
    final = fit(model, x, labels, steps=100, lr=1e-2)
    assert initial > 0.5
    assert final < 0.02, f"loss {initial:.3f} -> {final:.3f}"


def test_sparse_gate_picks_k_experts_per_task() -> None:
    model = _model(gate=functools.partial(TopKGate, k=2, renormalize=True)).eval()
    with torch.no_grad():
        w = model(torch.randn(4, D)).gate_weights
    for t in TASKS:
        assert ((w[t] > 0).sum(-1) == 2).all()
        torch.testing.assert_close(w[t].sum(-1), torch.ones(4))


def test_in_a_ranker_it_takes_the_plain_path() -> None:
    """The gate does not read x, so the ranker must not fold the embedding into it."""
    spec = FeatureSpec(
        categorical=[CategoricalFeature("item", 10, 4)],
        numeric=[],
        tasks=[TaskSpec(t, "binary") for t in TASKS],
    )
    ranker = Ranker(embedding=FeatureEmbedding(spec=spec), model=_model(d_in=4))
    assert not ranker.folds(2)
    assert ranker(torch.tensor([[3], [0]]), torch.zeros(2, 0)).logits["click"].shape == (2,)


def test_bad_route_on_is_refused() -> None:
    with pytest.raises(ValueError, match="route_on must be"):
        _model(route_on="domain")


@pytest.mark.parametrize("route_on", ["task", "task_and_input"])
def test_a_top_k_gate_computes_sparsely_and_equals_the_dense_computation(route_on: str) -> None:
    gate = functools.partial(TopKGate, k=2)
    model = _model(route_on=route_on, gate=gate).eval()
    x = torch.randn(6, D)
    rows: list[int] = []
    grouped = model.experts.forward_grouped

    def counting(x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        rows.append(x_ND.shape[0])
        return grouped(x_ND, counts_E)

    model.experts.forward_grouped = counting  # type: ignore[method-assign]
    out = model(x)
    # each expert ran once, on the rows some task routed to it: fewer than every row
    union_ET = torch.zeros(4, 6, dtype=torch.bool)
    for t in TASKS:
        union_ET |= (out.gate_weights[t] > 0).T
    assert rows == [int(union_ET.sum())] and rows[0] < 4 * 6
    # the dense computation, by hand: every expert on every row, mixed with the sparse weights
    y_EBH = model.experts.forward_all(x)
    for t in TASKS:
        w = model.gate(model.gate_input(x, t)).dense_weights()
        h = sum(w[:, e : e + 1] * y_EBH[e] for e in range(4))
        torch.testing.assert_close(out.logits[t], model.towers.towers[t](h), atol=1e-6, rtol=1e-6)
    dense = _model(route_on=route_on, gate=gate, sparse_compute=False).eval()
    dense.load_state_dict(model.state_dict())
    ref = dense(x)
    assert isinstance(ref.expert_outputs, torch.Tensor)
    for t in TASKS:
        torch.testing.assert_close(out.logits[t], ref.logits[t], atol=1e-6, rtol=1e-6)


def test_the_shared_gate_is_one_module_saved_and_loaded_with_the_model() -> None:
    model = _model(route_on="task_and_input")
    gates = list(model.mixture.gates.values())
    assert all(g is model.gate for g in gates)
    parts = (model.experts, model.gate, model.task_embedding, model.towers)
    count = sum(p.numel() for part in parts for p in part.parameters())
    assert sum(p.numel() for p in model.parameters()) == count  # the gate counted once
    other = _model(route_on="task_and_input")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(model.state_dict())
    x = torch.randn(3, D)
    torch.testing.assert_close(other(x).logits["click"], model(x).logits["click"])
