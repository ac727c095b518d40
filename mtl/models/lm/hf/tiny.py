"""Tiny random transformers models of every supported architecture (for tests and the equivalence table).

transformers is imported inside the functions: the rest of :mod:`mtl.models.lm.hf`
does not need it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY_VOCAB = 97
"""Vocabulary size of the tiny models."""

_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}

# Each architecture with the features that distinguish it switched on: GQA and a non-default
# rotary base (Mixtral), query/key norms (OLMoE), q/k/v biases, a dense layer and the gated
# shared expert (Qwen2-MoE), latent attention, dense first layer, group-limited routing with
# a scaling factor and a shared expert (DeepSeek-V3).
_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            "intermediate_size": 24,
            "num_key_value_heads": 2,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "rope_theta": 5000.0,
            "tie_word_embeddings": True,
        },
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {
            "intermediate_size": 24,
            "num_key_value_heads": 2,
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "rms_norm_eps": 1e-5,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 40,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_key_value_heads": 2,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "mlp_only_layers": [0],
            "norm_topk_prob": True,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "intermediate_size": 40,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "q_lora_rank": 12,
            "kv_lora_rank": 8,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 6,
            "v_head_dim": 10,
            "routed_scaling_factor": 2.5,
        },
    ),
}


def tiny_hf_model(
    model_type: str, *, seed: int = 0, vocab_size: int = TINY_VOCAB, **overrides: Any
) -> nn.Module:
    """A 3-layer transformers causal LM of ``model_type`` with random weights (std 0.2), in eval mode.

    Norm weights are drawn around 1 and DeepSeek-V3's selection biases around 0
    (std 0.05) so that no parameter sits at a value that would hide a mistake.

    Args:
        model_type: mixtral, olmoe, qwen2_moe or deepseek_v3.
        seed: seed of the random weights.
        vocab_size: vocabulary size (>= 256 to be read with the byte tokenizer).
        overrides: more config keys (e.g. ``rope_scaling``).

    Example:
        >>> model = tiny_hf_model("olmoe")  # doctest: +SKIP
        >>> model.config.num_experts  # doctest: +SKIP
        6
    """
    import transformers

    if model_type not in _CONFIGS:
        raise ValueError(f"no tiny model for {model_type!r}; known: {sorted(_CONFIGS)}")
    config_cls, model_cls, kwargs = _CONFIGS[model_type]
    config = getattr(transformers, config_cls)(
        **{**_COMMON, "vocab_size": vocab_size, **kwargs, **overrides}
    )
    model = getattr(transformers, model_cls)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The MoE blocks of a tiny model by layer index (dense layers left out)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        if hasattr(block, "experts"):
            out[i] = block
    return out
