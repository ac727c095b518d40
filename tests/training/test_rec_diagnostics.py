"""Expert-health diagnostics on hand-built gate weights and expert outputs, and against
a naive reference computed over the concatenated batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchmetrics import Metric

from mtl.models.rec import PLE, HoME, MMoE, SharedBottom
from mtl.models.rec.output import MultiTaskOutput
from mtl.training.diagnostics import ZERO_EPS, DiagnosticsAccumulator


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
    model = SharedBottom(d_in=6, tasks=["a", "b"], bottom_hidden=[8])
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    acc.update(model(torch.randn(5, 6)))
    d = acc.compute()
    assert d.utilisation.shape == (2, 0) and d.num_degraded_shared == 0
    assert "degraded_shared_experts" not in d.scalars()


@pytest.mark.parametrize("name", ["mmoe", "ple", "home"])
def test_real_models_give_consistent_diagnostics(name: str) -> None:
    cls, kwargs = {
        "mmoe": (MMoE, {"num_experts": 3}),
        "ple": (PLE, {"num_levels": 1}),
        "home": (HoME, {"lora_rank": 2}),
    }[name]
    model = cls(d_in=6, tasks=["a", "b"], expert_hidden=[8], **kwargs).eval()
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        acc.update(model(torch.randn(16, 6)))
    d = acc.compute()
    E = len(d.expert_kinds)
    assert d.utilisation.shape == (2, E) and d.zero_frac.shape == (E,)
    assert d.utilisation.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    if name != "mmoe":
        assert all(0.0 < s <= 1.0 for s in d.own_share.values())


# ------------------------------------------------------- naive reference
def naive_diagnostics(
    tasks: list[str], kinds: list[str], w_GBE: Tensor, y_EBH: Tensor
) -> dict[str, object]:
    """Every statistic from its definition, over all rows at once, with Python loops."""
    G, B, E = w_GBE.shape
    w, y = w_GBE.double(), y_EBH.double()
    util = [[float(w[g, :, e].sum()) / B for e in range(E)] for g in range(G)]
    allowed = [[bool((w[g, :, e] > 0).any()) for e in range(E)] for g in range(G)]
    using = [0] * E
    for g in range(G):
        n_allowed = max(sum(allowed[g]), 1)
        for e in range(E):
            using[e] += int(allowed[g][e] and util[g][e] > 1.0 / n_allowed)
    n_reach = [sum(allowed[g][e] for g in range(G)) for e in range(E)]
    degraded = [
        not kinds[e].startswith("task:") and n_reach[e] >= 2 and using[e] <= 1 for e in range(E)
    ]
    own = {}
    for g, task in enumerate(tasks):
        mine = [e for e in range(E) if kinds[e] == f"task:{task}"]
        own[task] = sum(util[g][e] for e in mine) if mine else math.nan
    values = y.reshape(E, -1)
    zero_frac = [float((values[e].abs() < ZERO_EPS).double().mean()) for e in range(E)]
    scale = [float(values[e].abs().mean()) for e in range(E)]
    return {
        "utilisation": util,
        "allowed": allowed,
        "tasks_using": using,
        "tasks_allowed": n_reach,
        "degraded": degraded,
        "own_share": own,
        "zero_frac": zero_frac,
        "output_scale": scale,
    }


def random_batches(
    tasks: list[str], kinds: list[str], sizes: list[int], seed: int
) -> list[tuple[Tensor, Tensor]]:
    """Gate weights ``(G, B, E)`` with some experts masked per task (weight exactly 0)
    and ReLU expert outputs ``(E, B, H)`` with one dead expert."""
    gen = torch.Generator().manual_seed(seed)
    G, E, H = len(tasks), len(kinds), 5
    mask_GE = torch.ones(G, E, dtype=torch.bool)
    for g, task in enumerate(tasks):  # a task's gate never reaches another task's experts
        for e, kind in enumerate(kinds):
            mask_GE[g, e] = not kind.startswith("task:") or kind == f"task:{task}"
    batches = []
    for B in sizes:
        logits = torch.randn(G, B, E, generator=gen) * 2
        w_GBE = logits.masked_fill(~mask_GE[:, None], -math.inf).softmax(-1)
        y_EBH = torch.randn(E, B, H, generator=gen).relu()
        y_EBH[-1] = 0.0  # a collapsed expert
        batches.append((w_GBE, y_EBH))
    return batches


@pytest.mark.parametrize(
    "kinds",
    [
        ["shared"] * 4,
        ["shared", "group:g", "task:a", "task:b", "task:c", "shared"],
    ],
)
def test_accumulated_diagnostics_equal_the_naive_reference_over_all_batches(
    kinds: list[str],
) -> None:
    tasks = ["a", "b", "c"]
    batches = random_batches(tasks, kinds, sizes=[16, 16, 7, 1], seed=len(kinds))
    acc = DiagnosticsAccumulator(tasks=tasks)
    for w_GBE, y_EBH in batches:
        acc.update(_output(dict(zip(tasks, w_GBE.unbind(0), strict=True)), y_EBH, kinds))
    got = acc.compute()
    want = naive_diagnostics(
        tasks,
        kinds,
        torch.cat([w for w, _ in batches], dim=1),
        torch.cat([y for _, y in batches], dim=1),
    )
    torch.testing.assert_close(
        got.utilisation, torch.tensor(want["utilisation"]), rtol=1e-6, atol=1e-7
    )
    assert got.allowed.tolist() == want["allowed"]
    assert got.tasks_using.tolist() == want["tasks_using"]
    assert got.tasks_allowed.tolist() == want["tasks_allowed"]
    assert got.degraded.tolist() == want["degraded"]
    assert got.zero_frac.tolist() == pytest.approx(want["zero_frac"], abs=1e-7)
    assert got.zero_frac[-1] == 1.0
    assert got.output_scale.tolist() == pytest.approx(want["output_scale"], rel=1e-6)
    for task, share in want["own_share"].items():
        assert (math.isnan(share) and math.isnan(got.own_share[task])) or got.own_share[
            task
        ] == pytest.approx(share, rel=1e-6)
    if "task:a" in kinds:
        assert all(not math.isnan(v) for v in got.own_share.values())


def test_diagnostics_are_a_metric_that_resets_and_reports_on_the_cpu() -> None:
    tasks, kinds = ["a", "b"], ["shared", "shared", "task:a"]
    (w_GBE, y_EBH), (w2_GBE, y2_EBH) = random_batches(tasks, kinds, sizes=[8, 8], seed=5)
    acc = DiagnosticsAccumulator(tasks=tasks)
    assert isinstance(acc, Metric) and not acc.has_data
    assert set(acc.metric_state) == {
        "weight_sum_GE",
        "weight_max_GE",
        "rows",
        "zero_count_E",
        "abs_sum_E",
        "elements",
    }
    acc.update(_output({"a": w_GBE[0], "b": w_GBE[1]}, y_EBH, kinds))
    assert acc.has_data and acc.expert_kinds == kinds
    acc.reset()
    assert not acc.has_data and acc.expert_kinds == []
    acc.update(_output({"a": w2_GBE[0], "b": w2_GBE[1]}, y2_EBH, kinds))
    d = acc.compute()
    want = naive_diagnostics(tasks, kinds, w2_GBE, y2_EBH)  # the first batch is forgotten
    assert d.utilisation.tolist() == [pytest.approx(r, abs=1e-6) for r in want["utilisation"]]
    assert d.utilisation.device.type == "cpu" and d.utilisation.dtype == torch.float32


def test_one_expert_keeps_its_expert_axis() -> None:
    """torchmetrics squeezes one-element tensors of what compute returns: the
    diagnostics of a one-expert, one-task model must stay (1, 1) and (1,)."""
    acc = DiagnosticsAccumulator(tasks=["a"])
    acc.update(_output({"a": torch.ones(4, 1)}, torch.ones(1, 4, 3), ["shared"]))
    d = acc.compute()
    assert d.utilisation.shape == (1, 1) and d.zero_frac.shape == (1,)
    assert d.to_dict()["zero_frac"] == [0.0] and d.to_dict()["utilisation"] == [[1.0]]
