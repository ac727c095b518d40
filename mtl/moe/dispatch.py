"""Dispatch/combine: how routed tokens reach their experts and come back.

Three strategies share one interface, ``dispatch(x_TD, routing, experts)``:

* :class:`DenseDispatch` runs every expert on every token and mixes with the
  dense weight matrix (MMoE/PLE/HoME; small E).
* :class:`DroplessDispatch` sorts token slots by expert, runs each expert on
  exactly its tokens with a grouped matmul and scatters back: no token is
  dropped and a token's output never depends on the rest of the batch.
* :class:`CapacityDispatch` gives each expert a fixed buffer of
  ``ceil(capacity_factor * T * K / E)`` slots (GShard/Switch); overflowing
  assignments are dropped, first choices queued before second choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from mtl.moe.routing import RoutingResult


class Experts(Protocol):
    """What a dispatch needs from an expert bank (see :class:`~mtl.moe.experts.ExpertBank`)."""

    num_experts: int

    def forward_all(self, x: Tensor) -> Tensor: ...

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor, expert_ids_N: Tensor) -> Tensor: ...


@dataclass
class DispatchResult:
    """Output of a dispatch.

    Attributes:
        output_TD: ``(T, D_out)`` combined expert outputs (zero for a token whose
            every slot was dropped: the residual carries it).
        kept_TK: ``(T, K)`` bool, slots really computed; None = every valid slot.
    """

    output_TD: Tensor
    kept_TK: Tensor | None = None


def combine_dense(y_ETD: Tensor, weights_TE: Tensor) -> Tensor:
    """Mix ``(E, T, D)`` expert outputs with ``(T, E)`` weights into ``(T, D)``."""
    return torch.einsum("etd,te->td", y_ETD, weights_TE.to(y_ETD.dtype))


class DenseDispatch(nn.Module):
    """Every expert computes every token; the gate's weights mix the outputs.

    Exact and simple; the cost is ``E`` times a sparse layer's. Right for the
    few-expert dense gates of multi-task recommenders.

    Example:
        >>> from mtl.moe import DenseSoftmaxGate, ExpertBank
        >>> bank = ExpertBank(num_experts=3, dims=[8, 8])
        >>> x = torch.randn(5, 8)
        >>> DenseDispatch()(x, DenseSoftmaxGate(d_model=8, num_experts=3)(x), bank).output_TD.shape
        torch.Size([5, 8])
    """

    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: Experts) -> DispatchResult:
        y_ETD = experts.forward_all(x_TD)
        return DispatchResult(output_TD=combine_dense(y_ETD, routing.dense_weights()))


class DroplessDispatch(nn.Module):
    """Sparse, dropless: sort slots by expert, grouped matmul, scatter back.

    Invalid slots (top-p padding, expert-choice non-selections) are sorted to
    the end and never computed. The combine reshapes to ``(T, K, D)`` and sums
    rather than using ``index_add_``, whose duplicate-index accumulation is
    nondeterministic on CUDA.

    Example:
        >>> from mtl.moe import ExpertBank, TopKGate
        >>> bank = ExpertBank.swiglu(num_experts=4, d_model=8, d_hidden=16)
        >>> x = torch.randn(6, 8)
        >>> DroplessDispatch()(x, TopKGate(d_model=8, num_experts=4, k=2)(x), bank).output_TD.shape
        torch.Size([6, 8])
    """

    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: Experts) -> DispatchResult:
        T, K = routing.experts_TK.shape
        E = experts.num_experts
        flat_ids = routing.experts_TK.reshape(-1)
        if routing.valid_TK is not None:
            # invalid slots go to a sentinel group E, sorted last and never computed
            flat_ids = flat_ids.masked_fill(~routing.valid_TK.reshape(-1), E)
        order_N = torch.argsort(flat_ids, stable=True)
        ids_sorted_N = flat_ids[order_N]
        counts_E = torch.bincount(flat_ids, minlength=E + 1)[:E]
        x_sorted_ND = x_TD[order_N // K]
        if routing.valid_TK is not None:
            # compute only the valid prefix; one host sync buys skipping padding
            n_valid = int(counts_E.sum())
            y_valid = experts.forward_grouped(
                x_sorted_ND[:n_valid], counts_E, ids_sorted_N[:n_valid]
            )
            y_sorted_ND = torch.cat(
                [y_valid, y_valid.new_zeros(T * K - n_valid, y_valid.shape[-1])]
            )
        else:
            y_sorted_ND = experts.forward_grouped(x_sorted_ND, counts_E, ids_sorted_N)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        y_TKD = y_sorted_ND[inverse_N].view(T, K, -1)
        w_TK = routing.weights_TK
        if routing.valid_TK is not None:
            w_TK = w_TK.masked_fill(~routing.valid_TK, 0.0)
        out_TD = (y_TKD * w_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(1)
        return DispatchResult(output_TD=out_TD)


class CapacityDispatch(nn.Module):
    """Fixed expert capacity with token dropping (GShard, Switch Transformer).

    ``capacity = max(min_capacity, ceil(capacity_factor * T * K / E))``. A slot's
    position in its expert's queue is the running count of earlier slots to the
    same expert, all first choices counted before any second choice; slots at
    position ``>= capacity`` are dropped. Experts run on a padded ``(E, C, D)``
    buffer with one batched matmul per layer.

    Note that dropping makes a token's output depend on the other tokens of the
    batch (a side channel in batched serving); :class:`DroplessDispatch` does not.

    Args:
        capacity_factor: > 0; 1.0 is exactly the average load.
        min_capacity: lower bound on the capacity (DeepSpeed's ``min_capacity``).

    Example:
        >>> from mtl.moe import ExpertBank, TopKGate
        >>> bank = ExpertBank(num_experts=2, dims=[4, 4])
        >>> x = torch.randn(8, 4)
        >>> res = CapacityDispatch(capacity_factor=0.5)(x, TopKGate(d_model=4, num_experts=2, k=1)(x), bank)
        >>> int(res.kept_TK.sum())  # capacity 2 per expert
        4
    """

    def __init__(self, *, capacity_factor: float = 1.25, min_capacity: int = 1) -> None:
        super().__init__()
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity

    def capacity(self, num_tokens: int, slots: int, num_experts: int) -> int:
        return max(
            self.min_capacity, math.ceil(self.capacity_factor * num_tokens * slots / num_experts)
        )

    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: Experts) -> DispatchResult:
        T, K = routing.experts_TK.shape
        E = experts.num_experts
        C = self.capacity(T, K, E)
        valid_KT = routing.valid().T
        ids_KT = routing.experts_TK.T
        onehot_NE = torch.nn.functional.one_hot(ids_KT.reshape(-1), E) * valid_KT.reshape(-1, 1)
        # slot-major flattening queues all first choices before second choices
        pos_N = ((torch.cumsum(onehot_NE, dim=0) - 1) * onehot_NE).sum(-1)
        kept_N = valid_KT.reshape(-1) & (pos_N < C)
        # kept slots write to row e * C + pos; dropped ones to a dummy row E * C
        row_N = torch.where(kept_N, ids_KT.reshape(-1) * C + pos_N, E * C)
        token_N = torch.arange(T, device=x_TD.device).repeat(K)
        buffer = x_TD.new_zeros(E * C + 1, x_TD.shape[-1])
        buffer = buffer.index_copy(0, row_N[kept_N], x_TD[token_N[kept_N]])
        y_ECD = experts.forward_all(buffer[: E * C].view(E, C, -1))
        y_rows = torch.cat([y_ECD.reshape(E * C, -1), y_ECD.new_zeros(1, y_ECD.shape[-1])])
        y_KTD = y_rows[row_N].view(K, T, -1)
        w_KT = routing.weights_TK.T.masked_fill(~kept_N.view(K, T), 0.0)
        out_TD = (y_KTD * w_KT.unsqueeze(-1).to(y_KTD.dtype)).sum(0)
        return DispatchResult(output_TD=out_TD, kept_TK=kept_N.view(K, T).T)
