"""Mixtral (``MixtralForCausalLM``): every layer top-k softmax routing, renormalised, GQA attention."""

from __future__ import annotations

from typing import Any

from mtl.models.lm.hf.spec import (
    Architecture,
    HFConfig,
    base_config,
    check_norm_eps,
    check_plain_attention,
    check_softmax_top_k_gates,
    lm_kwargs,
    moe_parts,
    need,
    one_value,
    routed_experts,
)
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer, TopKGate

NAME = "mixtral"


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``MixtralSparseMoeBlock``: softmax over all experts, top-k, renormalised over the k."""
    cfg.expect("router_jitter_noise", lambda v: not v, "0 (jitter has no exact mtl equivalent)")
    E = int(cfg.req("num_local_experts"))
    experts, dispatch = routed_experts(
        cfg, num_experts=E, d_hidden=int(cfg.req("intermediate_size"))
    )
    gate = TopKGate(
        d_model=int(cfg.req("hidden_size")),
        num_experts=E,
        k=int(cfg.req("num_experts_per_tok")),
        renormalize=True,
    )
    return MoELayer(gate=gate, experts=experts, dispatch=dispatch)


def build(cfg: HFConfig) -> TransformerLM:
    cfg.expect("sliding_window", lambda v: v is None, "null (no sliding-window attention)")
    return TransformerLM(**lm_kwargs(cfg), moe=lambda i, d: moe_layer(cfg))


def to_config(lm: TransformerLM) -> dict[str, Any]:
    attn = check_plain_attention(lm, NAME, bias=False, qk_norm=False)
    check_norm_eps(lm, NAME)
    layers = moe_parts(lm, NAME)
    need(len(layers) == lm.n_layers, "Mixtral has an MoE FFN in every layer", NAME)
    check_softmax_top_k_gates(layers, NAME, renormalize=True)
    for i, layer in layers.items():
        need(layer.shared is None, f"layer {i} has shared experts", NAME)
    first = next(iter(layers.values()))
    return {
        **base_config(lm, ARCH),
        "num_key_value_heads": attn.n_kv_heads,
        "intermediate_size": one_value(
            [m.experts.d_hidden for m in layers.values()], "expert width", NAME
        ),
        "num_local_experts": first.num_experts,
        "num_experts_per_tok": one_value([m.gate.k for m in layers.values()], "k", NAME),
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
