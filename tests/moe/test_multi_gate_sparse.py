"""Sparse compute of multi-gate mixtures against a per-expert loop with the gates' sparse weights."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mtl.models.rec import PLE, HoME, MMoE
from mtl.moe import (
    DroplessDispatch,
    ExpertBank,
    ExpertChoiceGate,
    MultiGateMixture,
    NoisyTopKGate,
    SigmoidBiasGate,
    TopKGate,
    TopPGate,
)
from mtl.moe.multi_gate import make_gate
from mtl.moe.multi_gate_sparse import RoutedExpertOutputs

from .reference import expert_forward

E, D, T = 6, 8, 24
GATES: dict[str, Any] = {
    "top_k": functools.partial(TopKGate, k=2),
    "noisy_top_k": functools.partial(NoisyTopKGate, k=2),
    "top_p": functools.partial(TopPGate, p=0.6),
    "expert_choice": functools.partial(ExpertChoiceGate, capacity_factor=1.0),
    "sigmoid_bias": functools.partial(SigmoidBiasGate, k=2),
}
BANKS = [
    dict(dims=[D, 5], activation="relu", bias=True, activate_last=True),
    dict(dims=[D, 12, 5], activation="gelu", bias=True),
    dict(dims=[D, 12, 5], activation="relu", bias=True, hidden_sizes=[12, 3, 7, 12, 1, 5]),
]


def _mixture(gate: Any, bank_kw: dict, masked: bool = True, **kw: Any) -> MultiGateMixture:
    torch.manual_seed(0)
    bank = ExpertBank(num_experts=E, **bank_kw)
    gates = {
        "click": make_gate(gate, d_model=D, num_experts=E),
        "like": make_gate(gate, d_model=D, num_experts=E),
        "buy": make_gate(
            gate, d_model=D, num_experts=E, expert_mask=[0, 2, 3, 5] if masked else None
        ),
    }
    return MultiGateMixture(experts=bank, gates=gates, **kw).eval()


def _loop_reference(
    mix: MultiGateMixture, x: Tensor, gate_inputs: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Every expert on every row, one at a time; each gate's sparse weights mix them."""
    bank = mix.experts
    y = [expert_forward(bank, e, x[e] if x.dim() == 3 else x) for e in range(E)]
    out = {}
    for name, gate in mix.gates.items():
        w_TE = gate(x if gate_inputs is None else gate_inputs[name]).dense_weights()
        out[name] = sum(w_TE[:, e : e + 1] * y[e] for e in range(E))
    return out


def _loss_grads(
    module: nn.Module, outputs: dict[str, Tensor], inputs: list[Tensor]
) -> list[Tensor]:
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outputs.values())
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return [
        torch.zeros_like(t) if g is None else g
        for t, g in zip([*inputs, *params], grads, strict=True)
    ]


def _count_grouped_rows(bank: nn.Module) -> list[int]:
    """Patch ``bank.forward_grouped`` to record how many rows each call computes."""
    rows: list[int] = []
    inner = bank.forward_grouped

    def counting(x_ND: Tensor, counts_E: Tensor) -> Tensor:
        rows.append(x_ND.shape[0])
        return inner(x_ND, counts_E)

    bank.forward_grouped = counting  # type: ignore[method-assign]
    return rows


@pytest.mark.parametrize("gate_name", list(GATES))
@pytest.mark.parametrize("bank_kw", BANKS, ids=["one_layer", "two_layers", "hidden_sizes"])
def test_sparse_mixture_equals_per_expert_loop_in_values_and_gradients(
    gate_name: str, bank_kw: dict
) -> None:
    masked = gate_name != "expert_choice"  # expert choice cannot be restricted
    mix = _mixture(GATES[gate_name], bank_kw, masked=masked)
    ref_mix = copy.deepcopy(mix)
    rows = _count_grouped_rows(mix.experts)
    x = torch.randn(T, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = mix(x)
    ref = _loop_reference(ref_mix, x_ref)
    assert out.expert_outputs_ETD is None and len(rows) == 1  # the sparse path ran
    for name in ref:
        torch.testing.assert_close(out.outputs[name], ref[name], atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(
        _loss_grads(mix, out.outputs, [x]), _loss_grads(ref_mix, ref, [x_ref]), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_per_expert_inputs_with_gate_inputs_equal_the_loop() -> None:
    mix = _mixture(GATES["top_k"], BANKS[1])
    ref_mix = copy.deepcopy(mix)
    x_ETD = torch.randn(E, T, D, requires_grad=True)
    g_in = {name: torch.randn(T, D) for name in mix.gates}
    x_ref = x_ETD.detach().clone().requires_grad_(True)
    out = mix(x_ETD, gate_inputs=g_in)
    ref = _loop_reference(ref_mix, x_ref, g_in)
    for name in ref:
        torch.testing.assert_close(out.outputs[name], ref[name], atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(
        _loss_grads(mix, out.outputs, [x_ETD]), _loss_grads(ref_mix, ref, [x_ref]), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_a_row_two_gates_send_to_one_expert_is_computed_once() -> None:
    mix = _mixture(GATES["top_k"], BANKS[0], masked=False)
    mix.gates["like"].load_state_dict(mix.gates["click"].state_dict())  # identical choices
    rows = _count_grouped_rows(mix.experts)
    x = torch.randn(T, D)
    out = mix(x)
    union_ET = torch.zeros(E, T, dtype=torch.bool)
    for r in out.routing.values():
        union_ET.scatter_(0, r.experts_TK.T, True)
    assert rows == [int(union_ET.sum())]
    assert rows[0] < 3 * 2 * T  # fewer than one row per (gate, slot)
    assert rows[0] <= 2 * 2 * T  # click and like share all their rows


def test_one_gate_computes_what_the_lm_dropless_dispatch_computes() -> None:
    torch.manual_seed(1)
    bank = ExpertBank(num_experts=E, dims=[D, 12, 5], activation="silu", bias=True)
    gate = TopKGate(d_model=D, num_experts=E, k=3)
    x = torch.randn(T, D)
    mix = MultiGateMixture(experts=bank, gates={"only": gate})
    routing = gate(x)
    expected = DroplessDispatch()(x, routing, bank).output_TD
    torch.testing.assert_close(mix(x).outputs["only"], expected, atol=1e-6, rtol=1e-6)


def test_dense_softmax_gates_keep_the_dense_path() -> None:
    torch.manual_seed(2)
    mix = MMoE(d_in=D, tasks=["a", "b"], num_experts=E, expert_hidden=[5]).mixture
    rows = _count_grouped_rows(mix.experts)
    out = mix(torch.randn(T, D))
    assert rows == [] and out.expert_outputs_ETD is not None


def test_sparse_compute_false_runs_dense_with_the_same_result() -> None:
    sparse = _mixture(GATES["top_k"], BANKS[1])
    dense = _mixture(GATES["top_k"], BANKS[1], sparse_compute=False)
    rows = _count_grouped_rows(dense.experts)
    x = torch.randn(T, D)
    out_dense, out_sparse = dense(x), sparse(x)
    assert rows == [] and out_dense.expert_outputs_ETD is not None
    for name in out_dense.outputs:
        torch.testing.assert_close(out_sparse.outputs[name], out_dense.outputs[name])


def test_batch_norm_experts_compute_densely_unless_sparse_is_demanded() -> None:
    bank_kw = dict(dims=[D, 5], activation="relu", bias=True, activate_last=True, norm="batch")
    mix = _mixture(GATES["top_k"], bank_kw).train()
    rows = _count_grouped_rows(mix.experts)
    out = mix(torch.randn(T, D))
    # batch statistics over the whole batch, as without a sparse gate
    assert rows == [] and out.expert_outputs_ETD is not None
    with pytest.raises(ValueError, match="sparse_compute=True cannot run experts with batch norm"):
        _mixture(GATES["top_k"], bank_kw, sparse_compute=True)
    with pytest.raises(ValueError, match="expert_norm"):
        MMoE(d_in=D, tasks=["a"], expert_norm=True, gate=GATES["top_k"], sparse_compute=True)


def test_expert_load_counts_every_gates_valid_slots() -> None:
    mix = _mixture(GATES["top_p"], BANKS[0])
    out = mix(torch.randn(T, D))
    expected = torch.zeros(E)
    for r in out.routing.values():
        for t in range(T):
            for j in range(r.slots):
                if r.valid()[t, j]:
                    expected[r.experts_TK[t, j]] += 1
    torch.testing.assert_close(out.expert_load(), expected)


def _models(gate: Any, sparse_compute: bool) -> dict[str, nn.Module]:
    common = dict(d_in=D, tasks=["a", "b", "c"], gate=gate, sparse_compute=sparse_compute)
    torch.manual_seed(3)
    return {
        "mmoe": MMoE(num_experts=E, expert_hidden=[12, 5], **common),  # type: ignore[arg-type]
        "ple": PLE(
            num_levels=2, num_shared_experts=2, num_task_experts=2, expert_hidden=[6], **common
        ),
        "home": HoME(
            task_groups={"g1": ["a"], "g2": ["b", "c"]},
            num_shared_experts=2,
            expert_hidden=[6],
            lora_rank=2,
            expert_norm=False,
            **common,
        ),
    }


@pytest.mark.parametrize("model_name", ["mmoe", "ple", "home"])
def test_models_with_top_k_gates_equal_their_dense_computation(model_name: str) -> None:
    gate = functools.partial(TopKGate, k=2)
    sparse = _models(gate, True)[model_name].eval()
    dense = _models(gate, False)[model_name].eval()
    dense.load_state_dict(sparse.state_dict())
    mixtures = [m for m in sparse.modules() if isinstance(m, MultiGateMixture)]
    rows = [_count_grouped_rows(m.experts) for m in mixtures]
    x = torch.randn(T, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = sparse(x), dense(x_ref)
    # every level computes sparsely but HoME's meta level, which its self gates read densely
    computed = [len(r) for r in rows]
    assert computed == ([0, 1] if model_name == "home" else [1] * len(mixtures))
    # sparse: the experts' outputs on their routed rows; dense: on every row
    assert isinstance(out.expert_outputs, RoutedExpertOutputs)
    assert isinstance(ref.expert_outputs, torch.Tensor)
    for t in ref.logits:
        torch.testing.assert_close(out.logits[t], ref.logits[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.gate_weights[t], ref.gate_weights[t])
    for level in ref.expert_load:
        torch.testing.assert_close(out.expert_load[level], ref.expert_load[level])
    for g, g_ref in zip(
        _loss_grads(sparse, out.logits, [x]), _loss_grads(dense, ref.logits, [x_ref]), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def _train_tiny(out: Path, *extra: str) -> dict:
    from mtl.training.config import compose_config
    from mtl.training.train import train

    overrides = [
        "model=mmoe",
        "model.gate=top_k",
        "model.gate.k=2",
        "model.num_experts=4",
        "model.expert_hidden=[8]",
        "model.tower_hidden=[4]",
        "model.dropout=0.0",
        "data.source_kwargs.n=3000",
        "data.source_kwargs.n_users=50",
        "data.source_kwargs.n_items=50",
        "data.batch_size=512",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
        "seed=5",
        f"output_dir={out}",
        *extra,
    ]
    return train(compose_config("train", overrides))


def test_mtl_train_mmoe_top_k_computes_sparsely_and_matches_dense(tmp_path: Path) -> None:
    sparse = _train_tiny(tmp_path / "sparse")
    dense = _train_tiny(tmp_path / "dense", "model.sparse_compute=false")
    assert sparse["gate"] == dense["gate"] == "top_k"
    assert set(sparse["test"]) == set(dense["test"])  # the collapse statistics included
    # over the routed rows under sparse compute, over every row under dense compute
    output_stats = {"collapse_zero_frac_max", "collapse_zero_frac_mean", "expert_scale_cv"}
    output_stats |= {"expert_std_min_max"}
    assert output_stats <= set(sparse["test"])
    for key, value in sparse["test"].items():
        if key not in output_stats:
            assert value == pytest.approx(dense["test"][key], abs=1e-4, nan_ok=True), key
    for run in (sparse, dense):
        assert run["diagnostics"]["zero_frac"] is not None
        assert run["diagnostics"]["out_std"] is not None


def test_expert_load_of_masked_dense_gates_counts_their_allowed_experts() -> None:
    from mtl.moe import DenseSoftmaxGate

    bank = ExpertBank(num_experts=4, dims=[D, 5])
    gates = {
        "a": DenseSoftmaxGate(d_model=D, num_experts=4),
        "b": DenseSoftmaxGate(d_model=D, num_experts=4, expert_mask=[1, 3]),
    }
    out = MultiGateMixture(experts=bank, gates=gates)(torch.randn(T, D))
    torch.testing.assert_close(out.expert_load(), torch.tensor([1.0, 2.0, 1.0, 2.0]) * T)
