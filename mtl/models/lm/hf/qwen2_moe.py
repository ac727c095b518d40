"""Qwen2-MoE (``Qwen2MoeForCausalLM``): top-k softmax routing plus a sigmoid-gated shared expert."""

from __future__ import annotations

from functools import partial
from typing import Any

from mtl.models.lm.blocks import CausalSelfAttention, SwiGLU
from mtl.models.lm.hf.spec import (
    Architecture,
    HFConfig,
    base_config,
    check_norm_eps,
    check_plain_attention,
    check_softmax_top_k_gates,
    dense_width,
    lm_kwargs,
    moe_parts,
    need,
    one_value,
    routed_experts,
)
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer, SigmoidGatedSharedExpert, TopKGate

NAME = "qwen2_moe"


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``Qwen2MoeSparseMoeBlock``: routed top-k + ``sigmoid(x W_sg) * shared_expert(x)``."""
    D, E = int(cfg.req("hidden_size")), int(cfg.req("num_experts"))
    experts, dispatch = routed_experts(
        cfg, num_experts=E, d_hidden=int(cfg.req("moe_intermediate_size"))
    )
    gate = TopKGate(
        d_model=D,
        num_experts=E,
        k=int(cfg.req("num_experts_per_tok")),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
    )
    shared = SigmoidGatedSharedExpert(
        d_model=D,
        expert=SwiGLU(d_model=D, d_hidden=int(cfg.req("shared_expert_intermediate_size"))),
    )
    return MoELayer(gate=gate, experts=experts, dispatch=dispatch, shared=shared)


def moe_layer_indices(cfg: HFConfig) -> list[int]:
    """Qwen2-MoE's rule: layer ``i`` is MoE unless in ``mlp_only_layers``, every ``decoder_sparse_step``-th."""
    if int(cfg.get("num_experts", 0)) <= 0:
        return []
    step = int(cfg.get("decoder_sparse_step", 1))
    dense = set(cfg.get("mlp_only_layers", []))
    return [
        i
        for i in range(int(cfg.req("num_hidden_layers")))
        if i not in dense and (i + 1) % step == 0
    ]


def build(cfg: HFConfig) -> TransformerLM:
    cfg.expect("use_sliding_window", lambda v: not v, "false (no sliding-window attention)")
    kw = lm_kwargs(cfg)
    attention = partial(
        CausalSelfAttention,
        d_model=kw["d_model"],
        n_heads=kw["n_heads"],
        n_kv_heads=kw["n_kv_heads"],
        rope_base=kw["rope_base"],
        qkv_bias=bool(cfg.get("qkv_bias", True)),
    )
    moe_idx = moe_layer_indices(cfg)
    return TransformerLM(
        **kw,
        moe=(lambda i, d: moe_layer(cfg)) if moe_idx else None,
        moe_layers=moe_idx,
        attention=lambda i: attention(),
    )


def to_config(lm: TransformerLM) -> dict[str, Any]:
    bias = lm.layers[0].attn.q_proj.bias is not None
    attn = check_plain_attention(lm, NAME, bias=bias, qk_norm=False)
    check_norm_eps(lm, NAME)
    layers = moe_parts(lm, NAME)
    check_softmax_top_k_gates(layers, NAME)
    for i, layer in layers.items():
        sh = layer.shared
        need(
            isinstance(sh, SigmoidGatedSharedExpert) and isinstance(sh.expert, SwiGLU),
            f"layer {i} shared part must be SigmoidGatedSharedExpert(expert=SwiGLU)",
            NAME,
        )
    first = next(iter(layers.values()))
    d_ff = dense_width(lm)
    return {
        **base_config(lm, ARCH),
        "num_key_value_heads": attn.n_kv_heads,
        "qkv_bias": bias,
        "intermediate_size": d_ff if d_ff is not None else first.experts.d_hidden,
        "moe_intermediate_size": one_value(
            [m.experts.d_hidden for m in layers.values()], "expert width", NAME
        ),
        "shared_expert_intermediate_size": one_value(
            [m.shared.expert.d_hidden for m in layers.values()], "shared expert width", NAME
        ),
        "num_experts": first.num_experts,
        "num_experts_per_tok": one_value([m.gate.k for m in layers.values()], "k", NAME),
        "norm_topk_prob": one_value(
            [m.gate.renormalize for m in layers.values()], "renormalize", NAME
        ),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(lm.n_layers) if i not in layers],
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * lm.n_layers,
    }


ARCH = Architecture(
    model_type=NAME,
    hf_class="Qwen2MoeForCausalLM",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    shared_names=(("shared.gate.", "shared_expert_gate."), ("shared.expert.", "shared_expert.")),
    build=build,
    moe_layer=moe_layer,
    to_config=to_config,
)
