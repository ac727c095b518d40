"""Naive reference implementations used by the MoE tests: per-expert loops, no tricks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.moe import ExpertBank


def expert_forward(bank: ExpertBank, e: int, x_ND: Tensor) -> Tensor:
    """Expert ``e`` of ``bank`` on ``x`` with plain per-layer matmuls."""
    h = x_ND
    act = {
        "relu": F.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "swish": F.silu,
        "identity": lambda t: t,
    }[bank.activation]
    for i, w in enumerate(bank.weights):
        z = h @ w[e]
        if i < len(bank.biases):
            z = z + bank.biases[i][e]
        if i < bank.num_layers - 1 or bank.activate_last:
            z = act(z)
            if i < len(bank.gate_weights):
                z = z * (h @ bank.gate_weights[i][e])
            if i == 0 and bank.hidden_mask_EH is not None:
                z = z * bank.hidden_mask_EH[e]
        h = z
    return h


def loop_moe(
    bank: ExpertBank,
    x_TD: Tensor,
    weights_TK: Tensor,
    experts_TK: Tensor,
    keep_TK: Tensor | None = None,
) -> Tensor:
    """``sum_j w_tj * E_{e_tj}(x_t)``, one expert at a time, HF-Mixtral style."""
    out = torch.zeros(x_TD.shape[0], bank.d_out, dtype=x_TD.dtype)
    for e in range(bank.num_experts):
        hit_TK = experts_TK == e
        if keep_TK is not None:
            hit_TK = hit_TK & keep_TK
        tok, slot = torch.nonzero(hit_TK, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_forward(bank, e, x_TD[tok]) * weights_TK[tok, slot].unsqueeze(-1)
        out = out.index_add(0, tok, y)
    return out
