"""Collapse diagnostics under sparse compute: each expert's statistics over the rows it
computed, against a per-expert loop over the routed rows."""

from __future__ import annotations

import functools

import pytest
import torch

from mtl.models.rec import MMoE
from mtl.moe import TopKGate
from mtl.moe.multi_gate_sparse import RoutedExpertOutputs
from mtl.training.diagnostics import ZERO_EPS, DiagnosticsAccumulator

D, E = 8, 4


def _mmoe() -> MMoE:
    torch.manual_seed(0)
    return MMoE(
        d_in=D,
        tasks=["a", "b"],
        num_experts=E,
        expert_hidden=[16],
        gate=functools.partial(TopKGate, k=2),
    ).eval()


def _by_hand(model: MMoE, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expert by expert: its output on every row some gate routed to it, then the moments."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(E)]
    for x in batches:
        routing = {n: g(x) for n, g in model.mixture.gates.items()}
        y_ETH = model.mixture.experts.forward_all(x)  # every expert on every row: pick
        for e in range(E):
            for t in range(x.shape[0]):
                if any(e in r.experts_TK[t].tolist() for r in routing.values()):
                    rows[e].append(y_ETH[e, t])
    ys = [torch.stack(r).double() for r in rows]
    return {
        "out_mean": torch.stack([y.mean() for y in ys]).float(),
        "out_std": torch.stack([y.std(unbiased=False) for y in ys]).float(),
        "output_scale": torch.stack([y.abs().mean() for y in ys]).float(),
        "zero_frac": torch.stack([(y.abs() < ZERO_EPS).double().mean() for y in ys]).float(),
    }


def test_top_k_mmoe_collapse_statistics_equal_the_per_expert_loop() -> None:
    model = _mmoe()
    batches = [torch.randn(9, D), torch.randn(7, D)]
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        for x in batches:
            out = model(x)
            assert isinstance(out.expert_outputs, RoutedExpertOutputs)  # computed sparsely
            assert int(out.expert_outputs.counts_E.sum()) < E * x.shape[0]
            acc.update(out)
        expected = _by_hand(model, batches)
    d = acc.compute()
    for name, value in expected.items():
        torch.testing.assert_close(getattr(d, name), value, atol=1e-5, rtol=1e-5, msg=name)
    assert 0 < float(d.zero_frac.max()) < 1  # ReLU experts: some units are zero
    scalars = d.scalars()
    assert scalars["expert_scale_cv"] == pytest.approx(
        float(expected["out_std"].std(unbiased=False) / expected["out_std"].mean()), rel=1e-4
    )
    assert "collapse_zero_frac_max" in scalars


def test_dense_compute_of_the_same_model_reports_over_every_row() -> None:
    """The A/B reference: with sparse_compute=False the statistics cover every row."""
    sparse = _mmoe()
    torch.manual_seed(0)
    dense = MMoE(
        d_in=D,
        tasks=["a", "b"],
        num_experts=E,
        expert_hidden=[16],
        gate=functools.partial(TopKGate, k=2),
        sparse_compute=False,
    ).eval()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(10, D)
    acc = DiagnosticsAccumulator(tasks=["a", "b"])
    with torch.no_grad():
        out = dense(x)
        acc.update(out)
        y_EN = dense.mixture.experts.forward_all(x).flatten(1)
    torch.testing.assert_close(acc.compute().out_mean, y_EN.mean(1), atol=1e-6, rtol=1e-5)


def test_an_expert_that_computed_no_row_is_left_out_not_zero() -> None:
    from mtl.models.rec.output import MultiTaskOutput
    from mtl.training.diagnostics_summary import level_summary

    y_NH = torch.tensor([[1.0, 0.0], [3.0, 2.0], [-1.0, 5.0]])
    routed = RoutedExpertOutputs(outputs_ND=y_NH, counts_E=torch.tensor([2, 0, 1]))
    w = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    acc = DiagnosticsAccumulator(tasks=["a"])
    acc.update(
        MultiTaskOutput(
            logits={"a": torch.zeros(2)},
            gate_weights={"a": w},
            expert_outputs=routed,
            expert_kinds=["shared"] * 3,
            expert_activation="relu",
        )
    )
    d = acc.compute()
    first, last = y_NH[:2].flatten().double(), y_NH[2:].flatten().double()
    torch.testing.assert_close(d.out_mean[[0, 2]], torch.stack([first.mean(), last.mean()]).float())
    torch.testing.assert_close(d.zero_frac[[0, 2]], torch.tensor([0.25, 0.0]))
    assert d.out_std[1].isnan() and d.zero_frac[1].isnan()
    stds = torch.stack([first.std(unbiased=False), last.std(unbiased=False)])
    assert d.scale_cv == pytest.approx(float(stds.std(unbiased=False) / stds.mean()), rel=1e-5)
    assert d.scalars()["collapse_zero_frac_max"] == pytest.approx(0.25)
    saved = d.to_dict()
    assert saved["out_std"][1] is None and saved["zero_frac"][1] is None
    summary = level_summary(saved)
    assert summary["zero_frac_max"] == pytest.approx(0.25)
    assert summary["std_min_max"] == pytest.approx(float(stds.min() / stds.max()), rel=1e-5)
