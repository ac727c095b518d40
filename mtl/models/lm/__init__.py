"""Sparse-MoE language models built on :mod:`mtl.moe`.

Parts:
    blocks      -- RMSNorm, rotary embeddings, causal attention, dense SwiGLU
    moe_ffn     -- :class:`MoEFFN`, the factory of the MoE feed-forward layers
    init        -- the initialisation convention (what the LM and MoEFFN build)
    aux_pooling -- router losses summed over layers or pooled (transformers' convention)
    transformer -- :class:`TransformerLM` (dense, MoE, interleaved), :class:`LMOutput`
    upcycling   -- LLaMA-MoE neuron splitting, sparse upcycling (the weights)
    upcycling_scale -- the output scale that keeps the dense output; the new router
    finetune    -- freeze everything but the experts / freeze the experts
    generate    -- sampling
    mla         -- multi-head latent attention (DeepSeek-V2/V3); rope_scaling -- YaRN
    hf          -- transformers MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3) in and out
    generate_cli -- ``mtl generate``: sampling from a checkpoint or a transformers directory

Presets (``conf/model/lm_*.yaml``, trained by ``mtl train experiment=lm_*``):
``lm_dense`` (baseline with lm_mixtral's active parameters), ``lm_mixtral`` (8 experts,
top-2, renormalised), ``lm_switch`` (top-1, capacity factor, token dropping, every other
layer), ``lm_deepseekmoe`` (fine-grained + shared experts), ``lm_olmoe`` (64 experts,
top-8, load balance + z-loss), ``lm_top_p`` (top-p + entropy loss), ``lm_expert_choice``,
``lm_deepseek_v3`` (sigmoid + aux-loss-free bias; the runner adds the bias callback).

Causality: every token-choice router decides per token, so with dropless dispatch
the logits at position t never depend on later tokens (tested for every preset).
Two exceptions, both stated in their presets: expert-choice routing ranks all tokens
of the batch for each expert, so later tokens change earlier tokens' experts (training
loss is optimistic, and generation routes differently than training); and capacity
dropping (``lm_switch``) makes a token's fate depend on the tokens queued before it
in the batch, so it is strictly causal only while nothing is dropped.
"""

from mtl.models.lm.blocks import CausalSelfAttention, RMSNorm, RotaryEmbedding, SwiGLU
from mtl.models.lm.finetune import (
    ParamCounts,
    count_parameters,
    freeze_all_but_experts,
    freeze_experts,
    unfreeze_all,
)
from mtl.models.lm.generate import generate, sample_next
from mtl.models.lm.hf import hf_mixtral_forward, moe_layer_from_hf_mixtral
from mtl.models.lm.moe_ffn import MoEFFN, active_experts_per_token
from mtl.models.lm.transformer import LMOutput, TransformerBlock, TransformerLM
from mtl.models.lm.upcycling import copy_ffn, split_ffn, split_indices, upcycle_transformer

__all__ = [
    "CausalSelfAttention",
    "LMOutput",
    "MoEFFN",
    "ParamCounts",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "active_experts_per_token",
    "copy_ffn",
    "count_parameters",
    "freeze_all_but_experts",
    "freeze_experts",
    "generate",
    "hf_mixtral_forward",
    "moe_layer_from_hf_mixtral",
    "sample_next",
    "split_ffn",
    "split_indices",
    "unfreeze_all",
    "upcycle_transformer",
]
