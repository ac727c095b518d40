import math

import pytest
import torch
from torch import nn

from mtl.moe import (
    CapacityDispatch,
    DenseDispatch,
    DenseSoftmaxGate,
    DroplessDispatch,
    ExpertBank,
    ExpertChoiceGate,
    MoELayer,
    MultiGateMixture,
    NoisyTopKGate,
    SigmoidBiasGate,
    SwiGLUExperts,
    TopKGate,
    TopPGate,
    load_balance_loss,
    router_z_loss,
)

from .reference import expert_forward, loop_moe


def test_aux_losses_are_weighted_and_returned_not_stored() -> None:
    torch.manual_seed(0)
    layer = MoELayer(
        gate=TopKGate(d_model=8, num_experts=4, k=2),
        experts=SwiGLUExperts(num_experts=4, d_model=8, d_hidden=8),
        dispatch=DroplessDispatch(),
        aux_loss_weights={"load_balance": 0.1, "z_loss": 0.01},
    )
    out = layer(torch.randn(2, 6, 8))
    r = out.routing
    torch.testing.assert_close(
        out.aux_losses["load_balance"], 0.1 * load_balance_loss(r.probs_TE, r.experts_TK)
    )
    torch.testing.assert_close(out.aux_losses["z_loss"], 0.01 * router_z_loss(r.logits_TE))
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    # gradient of the aux loss reaches the router
    (g,) = torch.autograd.grad(out.aux_loss, layer.gate.proj.weight)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown aux_loss_weights"):
        MoELayer(
            gate=layer.gate,
            experts=layer.experts,
            dispatch=DroplessDispatch(),
            aux_loss_weights={"lb": 1.0},
        )


def test_shared_experts_and_output_scale() -> None:
    torch.manual_seed(1)
    D = 8
    routed = SwiGLUExperts(num_experts=4, d_model=D, d_hidden=6)
    shared = SwiGLUExperts(num_experts=2, d_model=D, d_hidden=6)
    gate = TopKGate(d_model=D, num_experts=4, k=2, renormalize=True)
    layer = MoELayer(
        gate=gate, experts=routed, dispatch=DroplessDispatch(), shared=shared, output_scale=2.0
    )
    x = torch.randn(10, D)
    r = gate(x)
    expected = 2.0 * loop_moe(routed, x, r.weights_TK, r.experts_TK)
    expected = expected + expert_forward(shared, 0, x) + expert_forward(shared, 1, x)
    torch.testing.assert_close(layer(x).output, expected, rtol=1e-5, atol=1e-5)


def test_gate_expert_count_mismatch_and_token_mismatch() -> None:
    with pytest.raises(ValueError, match="num_experts=3"):
        MoELayer(
            gate=TopKGate(d_model=4, num_experts=3, k=1),
            experts=ExpertBank(num_experts=4, dims=[4, 4]),
            dispatch=DroplessDispatch(),
        )
    layer = MoELayer(
        gate=TopKGate(d_model=2, num_experts=4, k=1),
        experts=ExpertBank(num_experts=4, dims=[4, 4]),
        dispatch=DroplessDispatch(),
    )
    with pytest.raises(ValueError, match="tokens"):
        layer(torch.randn(5, 4), gate_input=torch.randn(6, 2))


@pytest.mark.parametrize(
    "gate",
    [
        NoisyTopKGate(d_model=8, num_experts=4, k=2),
        TopPGate(d_model=8, num_experts=4, p=0.5),
        ExpertChoiceGate(d_model=8, num_experts=4, capacity_factor=1.0),
        SigmoidBiasGate(d_model=8, num_experts=4, k=2),
        DenseSoftmaxGate(d_model=8, num_experts=4),
    ],
    ids=lambda g: type(g).__name__,
)
@pytest.mark.parametrize(
    "dispatch",
    [DroplessDispatch(), DenseDispatch(), CapacityDispatch(capacity_factor=4.0)],
    ids=["dropless", "dense", "capacity"],
)
def test_every_gate_works_with_every_dispatch(gate: nn.Module, dispatch: nn.Module) -> None:
    torch.manual_seed(2)
    gate.eval()
    bank = ExpertBank(num_experts=4, dims=[8, 12, 8], activation="gelu")
    x = torch.randn(24, 8)
    r = gate(x)
    out = dispatch(x, r, bank).output_TD
    keep = r.valid_TK
    ref = loop_moe(bank, x, r.weights_TK, r.experts_TK, keep_TK=keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_routing_stats() -> None:
    torch.manual_seed(3)
    gate = TopKGate(d_model=4, num_experts=2, k=1)
    layer = MoELayer(
        gate=gate,
        experts=ExpertBank(num_experts=2, dims=[4, 4]),
        dispatch=CapacityDispatch(capacity_factor=0.5),
    )
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0, 0] = 1.0
    x = torch.ones(8, 4)  # all tokens -> expert 0; capacity = ceil(0.5 * 8 / 2) = 2
    s = layer(x).stats
    assert s.tokens_per_expert_E.tolist() == [2.0, 0.0]
    assert s.dropped_slots.item() == 6 and s.dropped_tokens.item() == 6
    assert s.dropped_fraction.item() == pytest.approx(0.75)
    p = torch.softmax(torch.tensor([1.0, 0.0]), -1)
    assert s.entropy.item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    torch.testing.assert_close(s.mean_weight_E, torch.tensor([p[0].item(), 0.0]))
    d = s.as_dict("moe/")
    assert d["moe/load_max_over_mean"].item() == pytest.approx(2.0)


def test_multi_gate_mixture_equals_manual_mmoe() -> None:
    torch.manual_seed(4)
    bank = ExpertBank(num_experts=3, dims=[6, 5], activation="relu", bias=True, activate_last=True)
    gates = {t: DenseSoftmaxGate(d_model=6, num_experts=3) for t in ("click", "like")}
    mix = MultiGateMixture(experts=bank, gates=gates)
    x = torch.randn(7, 6)
    out = mix(x)
    y = torch.stack([expert_forward(bank, e, x) for e in range(3)])  # (E, T, H)
    for t, g in gates.items():
        w = torch.softmax(g.proj(x), -1)
        torch.testing.assert_close(out.outputs[t], torch.einsum("eth,te->th", y, w))
    torch.testing.assert_close(out.expert_outputs_ETD, y)


def test_bf16_layer_runs_and_tracks_fp32() -> None:
    torch.manual_seed(5)
    layer = MoELayer(
        gate=TopKGate(d_model=16, num_experts=4, k=2, renormalize=True),
        experts=SwiGLUExperts(num_experts=4, d_model=16, d_hidden=32),
        dispatch=DroplessDispatch(),
    )
    x = torch.randn(32, 16)
    ref = layer(x).output
    out = layer.to(torch.bfloat16)(x.bfloat16()).output
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2
    assert math.isfinite(out.float().sum().item())
