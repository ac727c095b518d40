"""transformers MoE checkpoints in and out of mtl's :class:`~mtl.models.lm.TransformerLM`.

Parts:
    spec        -- :class:`HFConfig` (config.json reading) and :class:`Architecture`
    mixtral, olmoe, qwen2_moe, deepseek_v3 -- one architecture each: config -> LM, LM -> config
    softmax_topk -- :class:`SoftmaxTopK`, what Mixtral, OLMoE and Qwen2-MoE share (block, attention)
    weights     -- parameter names and expert layouts in both directions, file tensors
    checkpoint  -- :func:`load_hf_checkpoint`, :func:`save_hf_checkpoint`, :func:`moe_layer_from_hf_block`
    mixtral_block -- :func:`moe_layer_from_hf_mixtral` from a ``MixtralSparseMoeBlock`` module
    tiny        -- tiny random transformers models of each architecture (tests, equivalence table)

Not supported (refused with an error naming the config key): sliding-window
attention, rotary scaling other than YaRN (YaRN only with latent attention),
OLMoE's q/k/v clipping, router jitter, quantized (e.g. FP8) weights.

Only :mod:`safetensors` is needed to read and write checkpoints; transformers
itself is used by the tests, to check the logits.
"""

from mtl.models.lm.hf.checkpoint import (
    ARCHITECTURES,
    architecture,
    load_hf_checkpoint,
    moe_layer_from_hf_block,
    read_config,
    save_hf_checkpoint,
)
from mtl.models.lm.hf.mixtral_block import hf_mixtral_forward, moe_layer_from_hf_mixtral
from mtl.models.lm.hf.spec import Architecture, HFConfig

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HFConfig",
    "architecture",
    "hf_mixtral_forward",
    "load_hf_checkpoint",
    "moe_layer_from_hf_block",
    "moe_layer_from_hf_mixtral",
    "read_config",
    "save_hf_checkpoint",
]
