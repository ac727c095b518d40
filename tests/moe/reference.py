"""Naive reference implementations used by the MoE tests: per-expert loops, no tricks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.moe import ExpertBank, SwiGLUExperts


def expert_forward(bank: ExpertBank | SwiGLUExperts, e: int, x_ND: Tensor) -> Tensor:
    """Expert ``e`` of ``bank`` on ``x`` with plain per-layer matmuls."""
    if isinstance(bank, SwiGLUExperts):
        h = F.silu(x_ND @ bank.w_gate[e]) * (x_ND @ bank.w_up[e])
        if bank.hidden_mask_EH is not None:
            h = h * bank.hidden_mask_EH[e]
        return h @ bank.w_down[e]
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
            if i == 0 and bank.hidden_mask_EH is not None:
                z = z * bank.hidden_mask_EH[e]
        h = z
    return h


def loop_moe(
    bank: ExpertBank | SwiGLUExperts,
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


def padded_grouped_mm(x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """The grouped-matmul contract as one ``bmm`` over rows padded to the largest count.

    An implementation unlike the library's (each expert's rows copied into an
    ``(E, C, D)`` block, ``C = max(counts_E)``): the seam tests put it in.
    """
    E, N = counts_E.shape[0], x_ND.shape[0]
    C = int(counts_E.max()) if N else 0
    start_E = torch.cumsum(counts_E, 0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
    # row n (the i-th of its expert e) goes to padded row e * C + i
    padded_row_N = expert_N * C + torch.arange(N, device=x_ND.device) - start_E[expert_N]
    D, H = w_EDH.shape[1:]  # spelled out: with no rows (C = 0) a -1 would be ambiguous
    x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, padded_row_N, x_ND).view(E, C, D)
    return torch.bmm(x_ECD, w_EDH).view(E * C, H).index_select(0, padded_row_N)
