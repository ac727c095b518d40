"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): latent attention, group-limited sigmoid routing, shared experts."""

from __future__ import annotations

from typing import Any

from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.hf.spec import (
    Architecture,
    HFConfig,
    base_config,
    check_norm_eps,
    check_shared,
    dense_width,
    lm_kwargs,
    moe_parts,
    need,
    one_value,
    routed_experts,
)
from mtl.models.lm.mla import MultiHeadLatentAttention
from mtl.models.lm.rope_scaling import YarnScaling
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer, SigmoidBiasGate

NAME = "deepseek_v3"

LATENT_NORM_EPS = 1e-6
"""Epsilon of the latent attention's norms: transformers builds ``q_a_layernorm`` and
``kv_a_layernorm`` with its RMSNorm's default, not with ``rms_norm_eps``."""


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``DeepseekV3MoE``: sigmoid + correction bias, group-limited top-k, scaled weights, shared MLP."""
    # keys of DeepSeek's own config files, which transformers' class fixes to these values
    cfg.expect("scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")
    cfg.expect("topk_method", lambda v: v in (None, "noaux_tc"), "'noaux_tc'")
    cfg.expect("moe_layer_freq", lambda v: v in (None, 1), "1")
    D, E = int(cfg.req("hidden_size")), int(cfg.req("n_routed_experts"))
    H = int(cfg.req("moe_intermediate_size"))
    experts, dispatch = routed_experts(cfg, num_experts=E, d_hidden=H)
    gate = SigmoidBiasGate(
        d_model=D,
        num_experts=E,
        k=int(cfg.req("num_experts_per_tok")),
        route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
        normalize=bool(cfg.get("norm_topk_prob", True)),
        n_group=int(cfg.get("n_group", 1)),
        topk_group=int(cfg.get("topk_group", 1)),
    )
    n_shared = int(cfg.get("n_shared_experts", 0))
    shared = SwiGLU(d_model=D, d_hidden=H * n_shared) if n_shared else None
    return MoELayer(gate=gate, experts=experts, dispatch=dispatch, shared=shared)


def build(cfg: HFConfig) -> TransformerLM:
    kw = lm_kwargs(cfg, rope_types=("default", "yarn"))
    rope = cfg.rope_parameters()
    scaling = None
    if rope["rope_type"] == "yarn":
        scaling = YarnScaling.from_config(rope, max_position_embeddings=kw["max_seq_len"])
    kw["n_kv_heads"] = None  # latent attention: every head has its own keys and values

    def attention(i: int) -> MultiHeadLatentAttention:
        return MultiHeadLatentAttention(
            d_model=kw["d_model"],
            n_heads=kw["n_heads"],
            kv_lora_rank=int(cfg.req("kv_lora_rank")),
            qk_nope_head_dim=int(cfg.req("qk_nope_head_dim")),
            qk_rope_head_dim=int(cfg.req("qk_rope_head_dim")),
            v_head_dim=int(cfg.req("v_head_dim")),
            q_lora_rank=cfg.get("q_lora_rank"),
            rope_base=kw["rope_base"],
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            bias=bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            norm_eps=LATENT_NORM_EPS,
        )

    first_dense = int(cfg.get("first_k_dense_replace", 0))
    return TransformerLM(
        **kw,
        moe=lambda i, d: moe_layer(cfg),
        moe_layers=list(range(first_dense, kw["n_layers"])),
        attention=attention,
    )


def to_config(lm: TransformerLM) -> dict[str, Any]:
    attns = [blk.attn for blk in lm.layers]
    need(
        all(isinstance(a, MultiHeadLatentAttention) for a in attns),
        "attention must be latent (MLA)",
        NAME,
    )
    a0: MultiHeadLatentAttention = attns[0]  # type: ignore[assignment]
    check_norm_eps(
        lm, NAME, fixed={"q_a_layernorm": LATENT_NORM_EPS, "kv_a_layernorm": LATENT_NORM_EPS}
    )
    layers = moe_parts(lm, NAME)
    first_moe = min(layers)
    need(
        sorted(layers) == list(range(first_moe, lm.n_layers)),
        "MoE layers must be the last ones",
        NAME,
    )
    for i, layer in layers.items():
        need(type(layer.gate) is SigmoidBiasGate, f"layer {i} gate must be SigmoidBiasGate", NAME)
        need(layer.gate.proj.bias is None, f"layer {i} gate has a bias", NAME)
    check_shared(
        layers, NAME, lambda s: s is None or isinstance(s, SwiGLU), "no shared expert or a SwiGLU"
    )
    H = one_value([m.experts.d_hidden for m in layers.values()], "expert width", NAME)
    shared_h = one_value(
        [0 if m.shared is None else m.shared.d_hidden for m in layers.values()],
        "shared width",
        NAME,
    )
    need(
        shared_h % H == 0,
        f"shared width {shared_h} must be a multiple of the expert width {H}",
        NAME,
    )
    gates = [m.gate for m in layers.values()]
    d_ff = dense_width(lm)
    return {
        **base_config(lm, ARCH),
        "num_key_value_heads": a0.n_heads,
        "intermediate_size": d_ff if d_ff is not None else H,
        "moe_intermediate_size": H,
        "n_routed_experts": one_value(
            [m.num_experts for m in layers.values()], "expert count", NAME
        ),
        "n_shared_experts": shared_h // H,
        "num_experts_per_tok": one_value([g.k for g in gates], "k", NAME),
        "n_group": one_value([g.n_group for g in gates], "n_group", NAME),
        "topk_group": one_value([g.topk_group for g in gates], "topk_group", NAME),
        "routed_scaling_factor": one_value([g.route_scale for g in gates], "route_scale", NAME),
        "norm_topk_prob": one_value([g.normalize for g in gates], "normalize", NAME),
        "first_k_dense_replace": first_moe,
        "q_lora_rank": a0.q_lora_rank,
        "kv_lora_rank": a0.kv_lora_rank,
        "qk_nope_head_dim": a0.qk_nope_head_dim,
        "qk_rope_head_dim": a0.qk_rope_head_dim,
        "v_head_dim": a0.v_head_dim,
        "head_dim": a0.qk_rope_head_dim,
        "rope_interleave": a0.rope_interleave,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(a0.rope.base)}
        if a0.rope_scaling is None
        else a0.rope_scaling.to_config(float(a0.rope.base)),
        "attention_bias": a0.o_proj.bias is not None,
    }


ARCH = Architecture(
    model_type=NAME,
    hf_class="DeepseekV3ForCausalLM",
    moe_prefix="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    shared_names=(("shared.", "shared_experts."),),
    build=build,
    moe_layer=moe_layer,
    to_config=to_config,
)
