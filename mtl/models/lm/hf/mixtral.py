"""Mixtral (``MixtralForCausalLM``): every layer top-k softmax routing, renormalised, GQA attention.

Mixtral's own keys: ``num_local_experts`` for the expert count, ``intermediate_size``
for the expert width, always-renormalised routing; router jitter and sliding-window
attention are refused (no exact mtl equivalent).
"""

from __future__ import annotations

from typing import Any

from mtl.models.lm.hf.softmax_topk import SoftmaxTopK
from mtl.models.lm.hf.spec import Architecture, HFConfig, base_config
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer

NAME = "mixtral"

FAMILY = SoftmaxTopK(
    name=NAME,
    num_experts_key="num_local_experts",
    d_hidden_key="intermediate_size",
    renormalize_key=None,
)


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``MixtralSparseMoeBlock``: softmax over all experts, top-k, renormalised over the k."""
    cfg.expect("router_jitter_noise", lambda v: not v, "0 (jitter has no exact mtl equivalent)")
    return FAMILY.moe_layer(cfg)


def build(cfg: HFConfig) -> TransformerLM:
    cfg.expect("sliding_window", lambda v: v is None, "null (no sliding-window attention)")
    return FAMILY.build(cfg, moe_layer)


def to_config(lm: TransformerLM) -> dict[str, Any]:
    block, _ = FAMILY.export(lm)
    return {
        **base_config(lm, ARCH),
        **block,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "head_dim": None,
    }


ARCH = Architecture(
    model_type=NAME,
    hf_class="MixtralForCausalLM",
    moe_prefix="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
    shared_names=(),
    build=build,
    moe_layer=moe_layer,
    to_config=to_config,
)
