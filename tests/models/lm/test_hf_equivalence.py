"""Numerical equivalence with Hugging Face's MixtralSparseMoeBlock (optional extra ``hf``)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    import transformers  # under CI a missing extra is a failure, not a skip
else:
    transformers = pytest.importorskip("transformers")

from mtl.models.lm.hf import hf_mixtral_forward, moe_layer_from_hf_mixtral
from mtl.moe import DroplessDispatch, SwiGLUExperts, TopKGate


def _block(hidden: int, inter: int, experts: int, k: int) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=experts,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # transformers >= 5 leaves the fused expert tensors uninitialised
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval()


@pytest.mark.parametrize(("experts", "k"), [(8, 2), (4, 1), (6, 3)])
def test_mixtral_block_matches(experts: int, k: int) -> None:
    torch.manual_seed(0)
    block = _block(32, 64, experts, k)
    layer = moe_layer_from_hf_mixtral(block).eval()
    assert isinstance(layer.gate, TopKGate) and layer.gate.renormalize and layer.gate.k == k
    assert isinstance(layer.experts, SwiGLUExperts) and isinstance(layer.dispatch, DroplessDispatch)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        ref_out, ref_logits = hf_mixtral_forward(block, x)
        out = layer(x)
    torch.testing.assert_close(out.routing.logits_TE, ref_logits.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.output, ref_out, atol=1e-5, rtol=0)
    assert ref_out.abs().max() > 0.1  # not a vacuous comparison of near-zero outputs


def test_mismatched_weights_are_detected() -> None:
    """Guard: the comparison above fails when a weight is off (e.g. gate and up swapped)."""
    torch.manual_seed(0)
    block = _block(16, 32, 4, 2)
    layer = moe_layer_from_hf_mixtral(block).eval()
    with torch.no_grad():
        w = layer.experts.w_gate.clone()
        layer.experts.w_gate.copy_(layer.experts.w_up)
        layer.experts.w_up.copy_(w)
        x = torch.randn(2, 5, 16)
        ref_out, _ = hf_mixtral_forward(block, x)
        assert not torch.allclose(layer(x).output, ref_out, atol=1e-3)
