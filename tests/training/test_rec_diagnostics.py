"""Expert-health diagnostics on hand-built gate weights and expert outputs."""

from __future__ import annotations

import math

import pytest
import torch

from mtl.models.rec import build_model
from mtl.models.rec.output import MultiTaskOutput
from mtl.training.diagnostics import DiagnosticsAccumulator


def _output(
    gates: dict[str, torch.Tensor], experts: torch.Tensor | None, kinds: list[str]
) -> MultiTaskOutput:
    return MultiTaskOutput(
        logits={t: torch.zeros(w.shape[0]) for t, w in gates.items()},
        gate_weights=gates,
        expert_outputs=experts,
        expert_kinds=kinds,
    )


def test_dead_expert_has_zero_fraction_one_and_degraded_shared_expert_is_counted() -> None:
    B, H = 8, 5
    # Expert 0: used by both tasks; expert 1: only task a; expert 2: always outputs zero, unused.
    w_a = torch.tensor([0.5, 0.5, 0.0]).repeat(B, 1)
    w_b = torch.tensor([0.9, 0.05, 0.05]).repeat(B, 1)
    y = torch.stack([torch.rand(B, H) + 0.5, torch.randn(B, H).relu() + 1e-3, torch.zeros(B, H)])
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    acc.update(_output({"a": w_a, "b": w_b}, y, ["shared"] * 3))
    acc.update(_output({"a": w_a, "b": w_b}, y, ["shared"] * 3))  # two batches accumulate
    d = acc.compute()

    assert d.zero_frac.tolist() == pytest.approx([0.0, 0.0, 1.0])
    torch.testing.assert_close(d.utilisation, torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]]))
    # Task a's gate never routes to expert 2 (weight exactly 0): 2 allowed experts, threshold 1/2.
    assert d.allowed.tolist() == [[True, True, False], [True, True, True]]
    # Thresholds: a: > 1/2 (nothing: 0.5 is not above), b: > 1/3 (expert 0 only).
    assert d.tasks_using.tolist() == [1, 0, 0]
    # Expert 2 is reachable by task b only, so it is not a shared expert in this model.
    assert d.tasks_allowed.tolist() == [2, 2, 1]
    assert d.degraded.tolist() == [True, True, False]
    scalars = d.scalars()
    assert scalars["collapse_zero_frac_max"] == 1.0
    assert scalars["degraded_shared_experts"] == d.num_degraded_shared


def test_shared_expert_used_by_one_task_is_degraded() -> None:
    B = 4
    gates = {
        "a": torch.tensor([0.7, 0.1, 0.2]).repeat(B, 1),  # uses expert 0
        "b": torch.tensor([0.6, 0.1, 0.3]).repeat(B, 1),  # uses expert 0
        "c": torch.tensor([0.1, 0.8, 0.1]).repeat(B, 1),  # uses expert 1
    }
    acc = DiagnosticsAccumulator(tasks=["a", "b", "c"])
    acc.update(_output(gates, torch.ones(3, B, 2), ["shared"] * 3))
    d = acc.compute()
    assert d.tasks_using.tolist() == [2, 1, 0]
    assert d.degraded.tolist() == [False, True, True]  # one user, no user
    assert d.num_degraded_shared == 2
    assert d.scale_cv == pytest.approx(0.0)
    assert all(math.isnan(v) for v in d.own_share.values())  # no task experts: n/a


def test_own_expert_share_and_hierarchy_masks() -> None:
    B = 6
    kinds = ["shared", "group:g", "task:a", "task:b"]
    gates = {
        "a": torch.tensor([0.3, 0.3, 0.4, 0.0]).repeat(B, 1),  # masked off b's expert
        "b": torch.tensor([0.7, 0.2, 0.0, 0.1]).repeat(B, 1),  # sparse task leaning on shared
    }
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    acc.update(_output(gates, torch.randn(4, B, 3), kinds))
    d = acc.compute()
    assert d.own_share == pytest.approx({"a": 0.4, "b": 0.1})
    assert d.tasks_allowed.tolist() == [2, 2, 1, 1]
    # Task experts are never "shared", so they cannot be degraded.
    assert d.shared_mask.tolist() == [True, True, False, False]
    assert d.scalars()["own_expert_share/b"] == pytest.approx(0.1)
    assert d.to_dict()["num_degraded_shared"] == d.num_degraded_shared


def test_model_without_gates_gives_empty_diagnostics() -> None:
    model = build_model("shared_bottom", d_in=6, tasks=["a", "b"], bottom_hidden=[8])
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    acc.update(model(torch.randn(5, 6)))
    d = acc.compute()
    assert d.utilisation.shape == (2, 0) and d.num_degraded_shared == 0
    assert "degraded_shared_experts" not in d.scalars()


@pytest.mark.parametrize("name", ["mmoe", "ple", "home"])
def test_real_models_give_consistent_diagnostics(name: str) -> None:
    kwargs = {"mmoe": {"num_experts": 3}, "ple": {"num_levels": 1}, "home": {"lora_rank": 2}}[name]
    model = build_model(name, d_in=6, tasks=["a", "b"], expert_hidden=[8], **kwargs).eval()
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        acc.update(model(torch.randn(16, 6)))
    d = acc.compute()
    E = len(d.expert_kinds)
    assert d.utilisation.shape == (2, E) and d.zero_frac.shape == (E,)
    assert d.utilisation.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    if name != "mmoe":
        assert all(0.0 < s <= 1.0 for s in d.own_share.values())
