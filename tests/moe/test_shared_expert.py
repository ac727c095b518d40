"""The sigmoid-gated shared expert (Qwen2-MoE) inside MoELayer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl.moe import DroplessDispatch, MoELayer, SigmoidGatedSharedExpert, SwiGLUExperts, TopKGate
from mtl.moe.shared_expert import shared_output


def _layer(shared: torch.nn.Module | None) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(
        gate=TopKGate(d_model=8, num_experts=4, k=2, renormalize=True),
        experts=SwiGLUExperts(num_experts=4, d_model=8, d_hidden=16),
        dispatch=DroplessDispatch(),
        shared=shared,
    )


def _shared() -> SigmoidGatedSharedExpert:
    torch.manual_seed(1)
    return SigmoidGatedSharedExpert(
        d_model=8, expert=SwiGLUExperts(num_experts=1, d_model=8, d_hidden=12)
    )


def test_output_is_routed_plus_gated_shared() -> None:
    shared = _shared()
    with_shared, without = _layer(shared), _layer(None)
    x = torch.randn(3, 5, 8)
    bank = shared.expert
    x_TD = x.reshape(-1, 8)
    expert_TD = (F.silu(x_TD @ bank.w_gate[0]) * (x_TD @ bank.w_up[0])) @ bank.w_down[0]
    expected_TD = (
        without(x).output.reshape(-1, 8) + torch.sigmoid(x_TD @ shared.gate.weight.T) * expert_TD
    )
    torch.testing.assert_close(with_shared(x).output.reshape(-1, 8), expected_TD)
    # negative control: the gate matters (ungated sum is far off)
    ungated = without(x).output.reshape(-1, 8) + expert_TD
    assert (ungated - expected_TD).abs().max() > 0.05


def test_factory_form_and_gradients() -> None:
    from functools import partial

    shared = SigmoidGatedSharedExpert(
        d_model=8, expert=partial(SwiGLUExperts, num_experts=1, d_hidden=12)
    )
    assert shared.expert.d_model == 8
    x = torch.randn(6, 8)
    params = [shared.gate.weight, shared.expert.w_gate, shared.expert.w_up, shared.expert.w_down]
    got = torch.autograd.grad(shared(x).pow(2).sum(), params)
    # the same output written out: sigmoid(x W_g^T) * SwiGLU(x)
    bank = shared.expert
    expert = (F.silu(x @ bank.w_gate[0]) * (x @ bank.w_up[0])) @ bank.w_down[0]
    by_hand = torch.sigmoid(x @ shared.gate.weight.T) * expert
    want = torch.autograd.grad(by_hand.pow(2).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert w.abs().sum() > 1e-3
        torch.testing.assert_close(g, w)


def test_shared_output_sums_a_stacked_bank_and_calls_any_other_module() -> None:
    torch.manual_seed(2)
    bank = SwiGLUExperts(num_experts=3, d_model=8, d_hidden=12)
    x_TD = torch.randn(5, 8)
    # reference: each expert's SwiGLU written out, summed over the experts
    expected_TD = sum(
        (F.silu(x_TD @ bank.w_gate[e]) * (x_TD @ bank.w_up[e])) @ bank.w_down[e] for e in range(3)
    )
    torch.testing.assert_close(shared_output(bank, x_TD), expected_TD)
    linear = torch.nn.Linear(8, 4)
    torch.testing.assert_close(shared_output(linear, x_TD), x_TD @ linear.weight.T + linear.bias)
