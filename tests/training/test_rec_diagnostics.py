"""Expert-health diagnostics on hand-built gate weights and expert outputs, and against
a naive reference computed over the concatenated batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchmetrics import Metric

from mtl.models.rec import PLE, HoME, MMoE, SharedBottom
from mtl.models.rec.output import GateLevel, MultiTaskOutput
from mtl.training.diagnostics import ZERO_EPS, DiagnosticsAccumulator
from mtl.training.diagnostics_summary import level_summary, summarise_diagnostics


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
    # Every expert outputs +1 and -1 equally often: one output scale (std 1).
    acc.update(_output(gates, torch.tensor([1.0, -1.0]).repeat(3, B, 1), ["shared"] * 3))
    d = acc.compute()
    assert d.out_std.tolist() == pytest.approx([1.0] * 3)
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
    assert d.utilisation.shape == (2, E) and d.out_std.shape == (E,)
    assert d.utilisation.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # HoME's experts are Swish: never exactly zero, so no zero fraction is reported.
    assert d.activation == ("swish" if name == "home" else "relu")
    assert (d.zero_frac is None) == (name == "home")
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
    mean = [float(values[e].mean()) for e in range(E)]
    std = [float(values[e].std(unbiased=False)) for e in range(E)]
    return {
        "out_mean": mean,
        "out_std": std,
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
    assert got.out_mean.tolist() == pytest.approx(want["out_mean"], rel=1e-5, abs=1e-7)
    assert got.out_std.tolist() == pytest.approx(want["out_std"], rel=1e-5, abs=1e-7)
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
        "sum_E",
        "sumsq_E",
        "elements_E",
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


# ------------------------------------------------------- levels, collapse, seeds
def test_every_level_of_ple_and_home_is_diagnosed_and_labelled() -> None:
    x = torch.randn(32, 6)
    ple = PLE(d_in=6, tasks=["a", "b"], num_levels=3, expert_hidden=[8]).eval()
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        out = ple(x)
    acc.update(out)
    d = acc.compute()
    assert [lv.level for lv in d.lower_levels] == ["level 1 of 3", "level 2 of 3"]
    assert d.level == "level 3 of 3 (top)"
    for level, got in zip(out.lower_levels, d.lower_levels, strict=True):
        assert got.tasks == ["a", "b", "__shared__"]
        want = torch.stack([level.gate_weights[g].mean(0) for g in got.tasks])
        torch.testing.assert_close(got.utilisation, want, rtol=1e-5, atol=1e-6)
        y = level.expert_outputs.flatten(1)
        assert got.out_std.tolist() == pytest.approx(y.std(1, unbiased=False).tolist(), rel=1e-4)
        # The shared unit's gate feeds no task: 2 consumers reach a shared expert, not 3.
        assert got.tasks_allowed.tolist()[:2] == [2, 2]
    home = HoME(d_in=6, tasks=["a", "b"], expert_hidden=[8], lora_rank=2).eval()
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        out = home(x)
    acc.update(out)
    d = acc.compute()
    (meta,) = d.lower_levels
    assert meta.level == "level 1 of 2 (meta)" and d.level == "level 2 of 2 (top)"
    assert meta.tasks == ["__shared__", "all"] and meta.activation == "swish"
    # The category gate's own experts at the meta level are its category's.
    want = out.lower_levels[0].gate_weights["all"].mean(0)[4:].sum()
    assert meta.own_share["all"] == pytest.approx(float(want), rel=1e-5)
    assert d.to_dict()["lower_levels"][0]["level"] == meta.level


def _swish_output(y_EBH: Tensor, activation: str = "swish") -> MultiTaskOutput:
    B, E = y_EBH.shape[1], y_EBH.shape[0]
    return MultiTaskOutput(
        logits={"a": torch.zeros(B)},
        gate_weights={"a": torch.full((B, E), 1.0 / E)},
        expert_outputs=y_EBH,
        expert_kinds=["shared"] * E,
        expert_activation=activation,
    )


def test_planted_collapse_shows_in_the_spread_of_expert_output_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 256, 8, generator=gen)
    healthy = DiagnosticsAccumulator(tasks=["a"])
    healthy.update(_swish_output(y))
    collapsed_y = y.clone()
    collapsed_y[2] *= 1e-3  # one expert with a tiny output scale
    collapsed = DiagnosticsAccumulator(tasks=["a"])
    collapsed.update(_swish_output(collapsed_y))
    ok, bad = (
        level_summary(healthy.compute().to_dict()),
        level_summary(collapsed.compute().to_dict()),
    )
    assert ok["std_min_max"] > 0.9 and bad["std_min_max"] < 2e-3
    assert bad["std_cv"] > 0.5 > 0.05 > ok["std_cv"]
    # Swish experts: the zero fraction would read 0 whatever happens, so it is not reported.
    assert bad["zero_frac_max"] is None and "collapse_zero_frac_max" not in (
        collapsed.compute().scalars()
    )
    assert collapsed.compute().scalars()["expert_std_min_max"] < 2e-3
    # ReLU experts: a dead one shows as zeros.
    relu = DiagnosticsAccumulator(tasks=["a"])
    relu.update(_swish_output(y.relu() * torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None, None], "relu"))
    assert level_summary(relu.compute().to_dict())["zero_frac_max"] == 1.0


def _permuted(out: MultiTaskOutput, top: list[int], meta: list[int]) -> MultiTaskOutput:
    """``out`` with its experts renumbered: expert ``perm[i]`` becomes expert ``i``."""
    (level,) = out.lower_levels
    return MultiTaskOutput(
        logits=out.logits,
        gate_weights={t: w[:, top] for t, w in out.gate_weights.items()},
        expert_outputs=out.expert_outputs[top],
        expert_kinds=[out.expert_kinds[e] for e in top],
        expert_activation=out.expert_activation,
        lower_levels=[
            GateLevel(
                name=level.name,
                gate_weights={g: w[:, meta] for g, w in level.gate_weights.items()},
                expert_outputs=level.expert_outputs[meta],
                expert_kinds=[level.expert_kinds[e] for e in meta],
                activation=level.activation,
            )
        ],
    )


def test_seeds_whose_experts_are_permuted_give_the_same_summary() -> None:
    torch.manual_seed(0)
    home = HoME(d_in=6, tasks=["a", "b"], expert_hidden=[8], lora_rank=2).eval()
    with torch.no_grad():
        out = home(torch.randn(64, 6) * 3)
    # kinds: top [shared x4, group:all x2, task:a, task:b]; meta [shared x4, group:all x2].
    top, meta = [2, 0, 3, 1, 5, 4, 6, 7], [1, 3, 0, 2, 5, 4]
    diags = []
    for o in (out, _permuted(out, top, meta)):
        acc = DiagnosticsAccumulator(tasks=["a", "b"])
        acc.update(o)
        diags.append(acc.compute().to_dict())
    assert diags[1]["utilisation"] == [[row[e] for e in top] for row in diags[0]["utilisation"]]
    # A mean over seeds by expert index would mix different experts: it differs here.
    by_index = torch.tensor([diags[0]["out_std"], diags[1]["out_std"]]).mean(0)
    assert not torch.allclose(by_index, torch.tensor(diags[0]["out_std"]))

    mixed, same = summarise_diagnostics(diags), summarise_diagnostics([diags[0], diags[0]])
    assert [lv["level"] for lv in mixed["levels"]] == ["level 1 of 2 (meta)", "level 2 of 2 (top)"]
    for got, want in zip(mixed["levels"], same["levels"], strict=True):
        assert got["stats"].keys() == want["stats"].keys()
        for key, value in want["stats"].items():  # [mean, std] over seeds, or None
            assert got["stats"][key] == (
                None if value is None else pytest.approx(value, nan_ok=True)
            ), key
        assert got["shares"].keys() == want["shares"].keys()
        for gate, parts in want["shares"].items():
            for part, value in parts.items():
                assert got["shares"][gate][part] == pytest.approx(value, abs=1e-6, nan_ok=True)
        for a, b in zip(got["sorted"], want["sorted"], strict=True):
            assert a["kinds"] == b["kinds"]
            for key in ("load", "out_mean", "out_std", "tasks_using"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        # the same numbers in both seeds: no spread over seeds
        assert all(v is None or v[1] == pytest.approx(0.0, abs=1e-6) for v in got["stats"].values())
