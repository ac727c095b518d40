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
``SwiGLUExperts`` + ``DroplessDispatch``; nothing here imports transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate


def _mixtral_weights(block: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(E, D)`` router, ``(E, D, H)`` gate, ``(E, D, H)`` up, ``(E, H, D)`` down."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: fused 3-D tensors
        gate_up_EhD = experts.gate_up_proj
        H = gate_up_EhD.shape[1] // 2
        w_gate = gate_up_EhD[:, :H, :].transpose(1, 2)
        w_up = gate_up_EhD[:, H:, :].transpose(1, 2)
        w_down = experts.down_proj.transpose(1, 2)
    else:  # transformers 4.x: a ModuleList of w1 / w2 / w3 Linears
        w_gate = torch.stack([e.w1.weight.T for e in experts])
        w_up = torch.stack([e.w3.weight.T for e in experts])
        w_down = torch.stack([e.w2.weight.T for e in experts])
    return block.gate.weight, w_gate, w_up, w_down


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
    w_router_ED, w_gate, w_up, w_down = _mixtral_weights(block)
    E, D = w_router_ED.shape
    H = w_gate.shape[-1]
    k = int(getattr(block, "top_k", None) or block.gate.top_k)
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError("router_jitter_noise > 0 has no exact mtl equivalent; set it to 0")
    gate = TopKGate(d_model=D, num_experts=E, k=k, renormalize=True)
    experts = SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H)
    with torch.no_grad():
        gate.proj.weight.copy_(w_router_ED)
        experts.w_gate.copy_(w_gate)
        experts.w_up.copy_(w_up)
        experts.w_down.copy_(w_down)
    layer = MoELayer(
        gate=gate, experts=experts, dispatch=DroplessDispatch(), aux_loss_weights=aux_loss_weights
    )
    return layer.to(w_router_ED)


def hf_mixtral_forward(block: nn.Module, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
    """Run an HF block and return ``(output (B, T, D), router_logits (B*T, E))`` for
    either transformers layout."""
    out: Any = block(x_BTD)
    if isinstance(out, tuple):  # transformers 4.x
        return out[0], out[1]
    logits = block.gate(x_BTD.reshape(-1, x_BTD.shape[-1]))[0]
    return out, logits
