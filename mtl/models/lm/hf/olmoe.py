"""OLMoE (``OlmoeForCausalLM``): top-k softmax routing (not renormalised by default), query/key norms.

OLMoE's own keys: ``num_experts``, ``intermediate_size`` for the expert width,
``norm_topk_prob``; q/k/v clipping and attention biases are refused.
"""

from __future__ import annotations

from typing import Any

from mtl.models.lm.hf.softmax_topk import SoftmaxTopK
from mtl.models.lm.hf.spec import Architecture, HFConfig, base_config
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer

NAME = "olmoe"

FAMILY = SoftmaxTopK(
    name=NAME,
    num_experts_key="num_experts",
    d_hidden_key="intermediate_size",
    qk_norm=True,
)


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``OlmoeSparseMoeBlock``: softmax over all experts, top-k, renormalised if ``norm_topk_prob``."""
    return FAMILY.moe_layer(cfg)


def build(cfg: HFConfig) -> TransformerLM:
    cfg.expect("clip_qkv", lambda v: v is None, "null (no clipping of q/k/v)")
    cfg.expect("attention_bias", lambda v: not v, "false")
    return FAMILY.build(cfg, moe_layer)


def to_config(lm: TransformerLM) -> dict[str, Any]:
    block, _ = FAMILY.export(lm)
    return {**base_config(lm, ARCH), **block, "clip_qkv": None, "attention_bias": False}


ARCH = Architecture(
    model_type=NAME,
    hf_class="OlmoeForCausalLM",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    shared_names=(),
    build=build,
    moe_layer=moe_layer,
    to_config=to_config,
)
