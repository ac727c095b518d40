"""TransformerLM initialises what it builds; MoE layers built elsewhere keep their weights."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.upcycling import copy_ffn
from mtl.moe import MoELayer, NoisyTopKGate, SwiGLUExperts, TopKGate


def _lm(moe: object, **kw: object) -> TransformerLM:
    base: dict[str, object] = dict(
        vocab_size=30, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8
    )
    return TransformerLM(moe=moe, **{**base, **kw})  # type: ignore[arg-type]


def _pretrained_layer(seed: int) -> MoELayer:
    """A layer whose weights are far from the LM's N(0, 0.02): any re-draw shows."""
    torch.manual_seed(seed)
    layer = copy_ffn(SwiGLU(d_model=16, d_hidden=24), num_experts=4, k=2, noise_std=0.5)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(10.0)
    return layer


def test_layers_from_a_factory_keep_their_weights_exactly() -> None:
    layers = {i: _pretrained_layer(seed=i) for i in range(2)}
    want = {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in layers.items()}
    lm = _lm(lambda i, d: layers[i])
    for i, layer in lm.moe_layers().items():
        assert layer is layers[i]
        got = layer.state_dict()
        assert got.keys() == want[i].keys()
        for key, value in want[i].items():
            assert torch.equal(got[key], value), f"layer {i}: {key} was re-initialised"


def test_hf_mixtral_layers_keep_their_weights() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from mtl.models.lm.hf import moe_layer_from_hf_mixtral

    cfg = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    blocks = [MixtralSparseMoeBlock(cfg) for _ in range(2)]
    with torch.no_grad():
        for p in (p for b in blocks for p in b.parameters()):
            p.normal_(0.0, 0.5)
    lm = _lm(lambda i, d: moe_layer_from_hf_mixtral(blocks[i]))
    for i, layer in lm.moe_layers().items():
        w_router = blocks[i].gate.weight
        assert torch.equal(layer.gate.proj.weight, w_router)
        assert layer.experts.w_down.std().item() == pytest.approx(0.5, rel=0.2)


@pytest.mark.parametrize("built_by", ["MoEFFN", "factory"])
def test_noisy_top_k_noise_projection_stays_zero(built_by: str) -> None:
    if built_by == "MoEFFN":
        moe: object = MoEFFN(
            num_experts=4,
            gate=partial(NoisyTopKGate, k=2),
            experts=partial(SwiGLUExperts, d_hidden=16),
        )
    else:
        moe = lambda i, d: MoELayer(  # noqa: E731
            gate=NoisyTopKGate(d_model=d, num_experts=4, k=2),
            experts=SwiGLUExperts(num_experts=4, d_model=d, d_hidden=16),
            dispatch=torch.nn.Identity(),
        )
    lm = _lm(moe, d_model=64, init_std=0.1)
    for layer in lm.moe_layers().values():
        assert torch.count_nonzero(layer.gate.noise_proj.weight) == 0
    if built_by == "MoEFFN":  # the router projection does follow the LM's convention
        w = lm.layers[0].ffn.gate.proj.weight
        assert w.std().item() == pytest.approx(0.1, rel=0.15)


def test_moe_ffn_layers_follow_the_lm_convention() -> None:
    moe = MoEFFN(
        num_experts=8,
        gate=partial(TopKGate, k=2),
        experts=partial(SwiGLUExperts, d_hidden=64),
        shared=partial(SwiGLUExperts, num_experts=1, d_hidden=64),
    )
    lm = _lm(moe, d_model=64, n_layers=4, init_std=0.05)
    out_std = 0.05 / math.sqrt(2 * 4)
    layer = lm.layers[1].ffn
    for bank in (layer.experts, layer.shared):
        assert bank.w_gate.std().item() == pytest.approx(0.05, rel=0.1)
        assert bank.w_up.std().item() == pytest.approx(0.05, rel=0.1)
        assert bank.w_down.std().item() == pytest.approx(out_std, rel=0.1)
