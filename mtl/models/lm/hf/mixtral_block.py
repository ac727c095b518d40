"""Weights from Hugging Face ``MixtralSparseMoeBlock`` into an :class:`~mtl.moe.MoELayer`.

HF's block: router ``softmax(x W_g^T)`` in float32, top-k, renormalised over the
chosen experts; experts ``W2 (silu(W1 x) * (W3 x))``. Two weight layouts exist:

* transformers < 5: ``block.gate`` is an ``nn.Linear(D, E)`` and ``block.experts``
  a list of modules with ``w1``/``w3`` ``(H, D)`` and ``w2`` ``(D, H)`` Linears;
  ``forward`` returns ``(hidden, router_logits)``.
* transformers >= 5: ``block.gate.weight`` ``(E, D)``; ``block.experts.gate_up_proj``
  ``(E, 2H, D)`` (gate rows first, then up) and ``down_proj`` ``(E, D, H)``;
  ``forward`` returns the hidden states only and ``block.gate(x)`` returns
  ``(router_logits, weights, indices)``.

The equivalent mtl layer is ``TopKGate(renormalize=True)`` +
``SwiGLUExperts`` + ``DroplessDispatch``, built and filled as every architecture's
block is (:func:`~mtl.models.lm.hf.moe_layer_from_hf_block`); nothing here imports
transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mtl.models.lm.hf.checkpoint import moe_layer_from_hf_block
from mtl.moe import MoELayer


def moe_layer_from_hf_mixtral(
    block: nn.Module, *, aux_loss_weights: Mapping[str, float] | None = None
) -> MoELayer:
    """Copy a ``MixtralSparseMoeBlock``'s weights into a new, equivalent MoELayer.

    Args:
        block: the HF block (either weight layout, see the module docstring).
        aux_loss_weights: auxiliary losses of the new layer. HF's
            ``router_aux_loss_coef`` is ``load_balance: coef * k`` (mtl's loss is
            1 for uniform routing, HF's is k) in a
            :class:`~mtl.models.lm.TransformerLM` with
            ``aux_loss_pooling="pooled"``, which pools all layers' routings into
            one loss as transformers does; exactly so (tested against
            ``load_balancing_loss_func``). The default ``"sum_over_layers"`` sums
            per-layer losses, about ``L`` times as much for ``L`` MoE layers.

    Returns:
        ``MoELayer(TopKGate(renormalize=True), SwiGLUExperts, DroplessDispatch)``
        whose ``output`` and ``routing.logits_TE`` match the block's.

    Example:
        >>> from transformers import MixtralConfig  # doctest: +SKIP
        >>> from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # doctest: +SKIP
        >>> cfg = MixtralConfig(hidden_size=16, intermediate_size=32)  # doctest: +SKIP
        >>> layer = moe_layer_from_hf_mixtral(MixtralSparseMoeBlock(cfg))  # doctest: +SKIP
    """
    E, D = block.gate.weight.shape
    experts = block.experts
    H = (
        experts.down_proj.shape[-1]
        if hasattr(experts, "down_proj")
        else experts[0].w1.weight.shape[0]
    )
    config = {
        "model_type": "mixtral",
        "hidden_size": D,
        "intermediate_size": H,
        "num_local_experts": E,
        "num_experts_per_tok": int(getattr(block, "top_k", None) or block.gate.top_k),
        "router_jitter_noise": getattr(block, "jitter_noise", 0.0),
    }
    layer = moe_layer_from_hf_block(block, config)
    return MoELayer(
        gate=layer.gate,
        experts=layer.experts,
        dispatch=layer.dispatch,
        aux_loss_weights=aux_loss_weights,
    )


def hf_mixtral_forward(block: nn.Module, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
    """Run an HF block and return ``(output (B, T, D), router_logits (B*T, E))`` for
    either transformers layout."""
    out: Any = block(x_BTD)
    if isinstance(out, tuple):  # transformers 4.x
        return out[0], out[1]
    logits = block.gate(x_BTD.reshape(-1, x_BTD.shape[-1]))[0]
    return out, logits
