"""Qwen2-MoE (``Qwen2MoeForCausalLM``): top-k softmax routing plus a sigmoid-gated shared expert.

Qwen2-MoE's own parts: ``num_experts`` and ``moe_intermediate_size`` for the routed
bank, a shared SwiGLU expert scaled by ``sigmoid(x W_sg)``, optional q/k/v biases
(``qkv_bias``), dense layers (``mlp_only_layers``, ``decoder_sparse_step``) of width
``intermediate_size``; sliding-window attention is refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mtl.models.lm.blocks import SwiGLU
from mtl.models.lm.hf.softmax_topk import SoftmaxTopK
from mtl.models.lm.hf.spec import Architecture, HFConfig, base_config, dense_width, one_value
from mtl.models.lm.transformer import TransformerLM
from mtl.moe import MoELayer, SigmoidGatedSharedExpert

NAME = "qwen2_moe"

FAMILY = SoftmaxTopK(
    name=NAME,
    num_experts_key="num_experts",
    d_hidden_key="moe_intermediate_size",
    every_layer=False,
)


def moe_layer(cfg: HFConfig) -> MoELayer:
    """``Qwen2MoeSparseMoeBlock``: routed top-k + ``sigmoid(x W_sg) * shared_expert(x)``."""
    D = int(cfg.req("hidden_size"))
    shared = SigmoidGatedSharedExpert(
        d_model=D,
        expert=SwiGLU(d_model=D, d_hidden=int(cfg.req("shared_expert_intermediate_size"))),
    )
    return FAMILY.moe_layer(cfg, shared=shared)


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
    return FAMILY.build(
        cfg,
        moe_layer,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        moe_layers=moe_layer_indices(cfg),
    )


def _gated_swiglu(shared: nn.Module | None) -> bool:
    return isinstance(shared, SigmoidGatedSharedExpert) and isinstance(shared.expert, SwiGLU)


def to_config(lm: TransformerLM) -> dict[str, Any]:
    bias = lm.layers[0].attn.q_proj.bias is not None
    block, layers = FAMILY.export(
        lm,
        qkv_bias=bias,
        shared=_gated_swiglu,
        shared_what="a SigmoidGatedSharedExpert around a SwiGLU",
    )
    shared_widths = [m.shared.expert.d_hidden for m in layers.values()]
    d_ff = dense_width(lm)
    return {
        **base_config(lm, ARCH),
        **block,
        "qkv_bias": bias,
        # transformers builds the dense layers (if any) this wide
        "intermediate_size": d_ff if d_ff is not None else block["moe_intermediate_size"],
        "shared_expert_intermediate_size": one_value(shared_widths, "shared expert width", NAME),
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
