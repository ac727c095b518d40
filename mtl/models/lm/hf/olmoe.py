"""OLMoE (``OlmoeForCausalLM``): top-k softmax routing (not renormalised by default), query/key norms."""

from __future__ import annotations

from functools import partial
from typing import Any

from mtl.models.lm.blocks import CausalSelfAttention
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

NAME = "olmoe"


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``OlmoeSparseMoeBlock``: softmax over all experts, top-k, renormalised if ``norm_topk_prob``."""
    E = int(cfg.req("num_experts"))
    experts, dispatch = routed_experts(
        cfg, num_experts=E, d_hidden=int(cfg.req("intermediate_size"))
    )
    gate = TopKGate(
        d_model=int(cfg.req("hidden_size")),
        num_experts=E,
        k=int(cfg.req("num_experts_per_tok")),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
    )
    return MoELayer(gate=gate, experts=experts, dispatch=dispatch)


def build(cfg: HFConfig) -> TransformerLM:
    cfg.expect("clip_qkv", lambda v: v is None, "null (no clipping of q/k/v)")
    cfg.expect("attention_bias", lambda v: not v, "false")
    kw = lm_kwargs(cfg)
    attention = partial(
        CausalSelfAttention,
        d_model=kw["d_model"],
        n_heads=kw["n_heads"],
        n_kv_heads=kw["n_kv_heads"],
        rope_base=kw["rope_base"],
        qk_norm=True,
        norm_eps=kw["norm_eps"],
    )
    return TransformerLM(**kw, moe=lambda i, d: moe_layer(cfg), attention=lambda i: attention())


def to_config(lm: TransformerLM) -> dict[str, Any]:
    attn = check_plain_attention(lm, NAME, bias=False, qk_norm=True)
    check_norm_eps(lm, NAME)
    layers = moe_parts(lm, NAME)
    need(len(layers) == lm.n_layers, "OLMoE has an MoE FFN in every layer", NAME)
    check_softmax_top_k_gates(layers, NAME)
    for i, layer in layers.items():
        need(layer.shared is None, f"layer {i} has shared experts", NAME)
    first = next(iter(layers.values()))
    return {
        **base_config(lm, ARCH),
        "num_key_value_heads": attn.n_kv_heads,
        "intermediate_size": one_value(
            [m.experts.d_hidden for m in layers.values()], "expert width", NAME
        ),
        "num_experts": first.num_experts,
        "num_experts_per_tok": one_value([m.gate.k for m in layers.values()], "k", NAME),
        "norm_topk_prob": one_value(
            [m.gate.renormalize for m in layers.values()], "renormalize", NAME
        ),
        "clip_qkv": None,
        "attention_bias": False,
    }


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
