"""Dispatch/combine: how routed tokens reach their experts and come back.

Three strategies share one interface, ``dispatch(x_TD, routing, experts)``:

* :class:`DenseDispatch` runs every expert on every token and mixes with the
  dense weight matrix (MMoE/PLE/HoME; small E).
* :class:`DroplessDispatch` sorts token slots by expert, runs each expert on
  exactly its tokens with a grouped matmul and combines back: no token is
  dropped and a token's output never depends on the rest of the batch.
* :class:`CapacityDispatch` gives each expert a fixed buffer of
  ``ceil(capacity_factor * T * K / E)`` slots (GShard/Switch); overflowing
  assignments are dropped, first choices queued before second choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from mtl.moe.routing import RoutingResult, bin_counts


class Experts(Protocol):
    """What a dispatch needs from experts (:mod:`mtl.moe.experts`).

    :class:`~mtl.moe.SwiGLUExperts`, :class:`~mtl.moe.ExpertBank` and
    :class:`~mtl.moe.ExpertList` implement it; so can any object with these
    three members.

    Attributes:
        num_experts: ``E``.

    Shapes:
        ``forward_all``: a shared ``(T, D)`` input, or one input per expert
        ``(E, T, D)`` -> ``(E, T, D_out)``, every expert on its rows.
        ``forward_grouped``: ``x_ND (N, D)`` sorted by expert, ``counts_E (E,)``
        rows per expert (``N = counts_E.sum()``) -> ``(N, D_out)``, each row
        through its own expert.

    Example:
        >>> from mtl.moe import ExpertList
        >>> experts: Experts = ExpertList(experts=[nn.Linear(4, 2) for _ in range(3)])
        >>> x_ND, counts_E = torch.randn(5, 4), torch.tensor([2, 0, 3])
        >>> experts.forward_all(x_ND).shape, experts.forward_grouped(x_ND, counts_E).shape
        (torch.Size([3, 5, 2]), torch.Size([5, 2]))
    """

    num_experts: int

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on ``(T, D)`` or its own ``(E, T, D)`` rows -> ``(E, T, D_out)``."""

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Each expert on its block of the expert-sorted ``(N, D)`` rows -> ``(N, D_out)``."""


@dataclass
class DispatchResult:
    """Output of a dispatch.

    Attributes:
        output_TD: ``(T, D_out)`` combined expert outputs (zero for a token whose
            every slot was dropped: the residual carries it).
        kept_TK: ``(T, K)`` bool, slots really computed; None = every valid slot.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> routing = RoutingResult(  # tokens 0-2 choose expert 0, token 3 expert 1
        ...     weights_TK=torch.ones(4, 1), experts_TK=torch.tensor([[0], [0], [0], [1]]),
        ...     logits_TE=torch.zeros(4, 2), probs_TE=torch.full((4, 2), 0.5))
        >>> experts = SwiGLUExperts(num_experts=2, d_model=6, d_hidden=8)
        >>> out = CapacityDispatch(capacity_factor=0.5)(torch.randn(4, 6), routing, experts)
        >>> out.kept_TK.flatten().tolist()  # one slot per expert: tokens 1 and 2 dropped
        [True, False, False, True]
        >>> out.output_TD.shape, out.output_TD[1:3].abs().sum().item()
        (torch.Size([4, 6]), 0.0)
    """

    output_TD: Tensor
    kept_TK: Tensor | None = None


def combine_dense(y_ETD: Tensor, weights_TE: Tensor) -> Tensor:
    """Mix ``(E, T, D)`` expert outputs with ``(T, E)`` weights into ``(T, D)``."""
    # a broadcast multiply and a sum over E, not einsum, which maps this to T
    # tiny (1, E) @ (E, D) matmuls (slower on CPU: benchmarks/RESULTS.md)
    w_ET1 = weights_TE.to(y_ETD.dtype).t().unsqueeze(-1)
    return (y_ETD * w_ET1).sum(0)


def combine_dense_many(y_ETD: Tensor, weights_TE: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Mix the same ``(E, T, D)`` expert outputs with ``G`` weightings ``(T, E)`` at once.

    ``weights_TE`` is a sequence of ``(T, E)`` weightings or one ``(T, G, E)`` tensor.

    One batched product ``(T, G, E) @ (T, E, D) -> (T, G, D)`` replaces ``G``
    broadcast multiplies and sums; in the backward it is two batched products
    instead of ``G`` full-size ``(E, T, D)`` products and their sum
    (``benchmarks/RESULTS.md``). Fastest when ``y_ETD`` is a view of a
    ``(T, E, D)`` tensor, as :meth:`~mtl.moe.expert_bank.ExpertBank.forward_all`
    returns it.

    Returns:
        ``G`` tensors ``(T, D)``, in the order of ``weights_TE``.
    """
    if isinstance(weights_TE, Tensor):
        w_TGE = weights_TE.to(y_ETD.dtype)
    elif len(weights_TE) == 1:
        return [combine_dense(y_ETD, weights_TE[0])]
    else:
        w_TGE = torch.stack([w.to(y_ETD.dtype) for w in weights_TE], dim=1)
    out_TGD = torch.bmm(w_TGE, y_ETD.transpose(0, 1))
    return list(out_TGD.unbind(1))


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
    """Sparse and dropless: each expert runs on exactly the tokens routed to it.

    The routing's ``S = T * K`` slots (slot ``t * K + j`` is token ``t``'s
    ``j``-th choice) are sorted by expert; each sorted row ``n`` gathers its
    token's input; the experts run on their blocks of rows with one grouped
    matmul per layer (``experts.forward_grouped``); each token's output is the
    weighted sum of its ``K`` rows. No token is dropped and a token's output
    never depends on the rest of the batch. Invalid slots (top-p padding,
    expert-choice non-selections) are sorted after every valid one and never
    computed.

    Under ``torch.compile`` the dispatch runs eagerly between the compiled
    graphs (one graph break): the grouped matmul may read the per-expert counts
    back to the host, and traced, every new routing would recompile.

    Example:
        >>> from mtl.moe import SwiGLUExperts, TopKGate
        >>> experts = SwiGLUExperts(num_experts=4, d_model=8, d_hidden=16)
        >>> x = torch.randn(6, 8)
        >>> DroplessDispatch()(x, TopKGate(d_model=8, num_experts=4, k=2)(x), experts).output_TD.shape
        torch.Size([6, 8])
    """

    @torch.compiler.disable
    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: Experts) -> DispatchResult:
        T, K = routing.experts_TK.shape
        E = experts.num_experts
        expert_S = routing.experts_TK.reshape(-1)
        w_TK = routing.weights_TK
        if routing.valid_TK is not None:
            # invalid slots go to a sentinel expert E, sorted last and never computed
            expert_S = expert_S.masked_fill(~routing.valid_TK.reshape(-1), E)
            w_TK = w_TK.masked_fill(~routing.valid_TK, 0.0)
        counts_E = bin_counts(expert_S, E + 1)[:E]
        slot_N = torch.sort(expert_S, stable=True).indices
        if routing.valid_TK is not None:
            slot_N = slot_N[: int(counts_E.sum())]  # one host sync buys skipping invalid slots
        x_ND = x_TD.index_select(0, slot_N // K)
        y_ND = experts.forward_grouped(x_ND, counts_E)
        # back to slot order (invalid slots stay zero), then each token's weighted sum
        D_out = y_ND.shape[-1]
        y_TKD = y_ND.new_zeros(T * K, D_out).index_copy(0, slot_N, y_ND).view(T, K, D_out)
        out_TD = torch.bmm(w_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
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
        # every slot is copied, the dropped ones all onto the dummy row: no boolean
        # indexing, whose data-dependent size is a host sync (and a torch.compile break)
        buffer = x_TD.new_zeros(E * C + 1, x_TD.shape[-1])
        buffer = buffer.index_copy(0, row_N, x_TD[token_N])
        y_ECD = experts.forward_all(buffer[: E * C].view(E, C, -1))
        y_rows = torch.cat([y_ECD.reshape(E * C, -1), y_ECD.new_zeros(1, y_ECD.shape[-1])])
        y_KTD = y_rows[row_N].view(K, T, -1)
        w_KT = routing.weights_TK.T.masked_fill(~kept_N.view(K, T), 0.0)
        out_TD = (y_KTD * w_KT.unsqueeze(-1).to(y_KTD.dtype)).sum(0)
        return DispatchResult(output_TD=out_TD, kept_TK=kept_N.view(K, T).T)
