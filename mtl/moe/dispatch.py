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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from mtl.moe.experts import ExpertBank
from mtl.moe.grouped import (
    chunk_row_starts,
    combine_slots,
    expert_chunks,
    fused_swiglu_moe,
    permute_tokens,
)
from mtl.moe.routing import RoutingResult, bin_counts


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
    # A broadcast multiply and a sum over E, not einsum: einsum maps this to T
    # tiny (1, E) @ (E, D) matmuls, several times slower on CPU.
    w_ET1 = weights_TE.to(y_ETD.dtype).t().unsqueeze(-1)
    return (y_ETD * w_ET1).sum(0)


def combine_dense_many(y_ETD: Tensor, weights_TE: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Mix the same ``(E, T, D)`` expert outputs with ``G`` weightings ``(T, E)`` at once.

    ``weights_TE`` is a sequence of ``(T, E)`` weightings or one ``(T, G, E)`` tensor.

    One batched product ``(T, G, E) @ (T, E, D) -> (T, G, D)`` replaces ``G``
    broadcast multiplies and sums; in the backward it is two batched products
    instead of ``G`` full-size ``(E, T, D)`` products and their sum (1 ms less
    per training step of an MMoE with 3 gates over 8 experts of width 64 at
    batch 1024, on 2 CPU cores). Fastest when ``y_ETD`` is a view of a
    ``(T, E, D)`` tensor, as :meth:`~mtl.moe.experts.ExpertBank.forward_all`
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
    """Sparse, dropless: sort slots by expert, run each expert on exactly its rows.

    Two row layouts, picked per call:

    * **padded** (CPU, or wherever ``grouped_mm`` has no fused kernel): the
      experts run as batched matmuls over row blocks padded to a common count.
      Generic experts get one ``(E, C, D)`` block with ``C = max_e count_e``
      (:meth:`ExpertBank.forward_all`); the fused CPU SwiGLU path pads each
      chunk of consecutive experts only to its own largest count
      (:func:`~mtl.moe.grouped.expert_chunks`), so experts with ``chunk_rows``
      or more rows run alone and unpadded. Used while the global padding costs
      at most ``max_padding`` of the real rows; nothing is ever dropped,
      padding rows are computed and ignored.
    * **sorted** (CUDA bf16 ``grouped_mm``; or routing too skewed to pad):
      rows are the slots sorted by expert, one grouped matmul per layer
      (:meth:`ExpertBank.forward_grouped`).

    Tokens move in and out with gathers whose backward passes are gathers too
    (:func:`~mtl.moe.grouped.permute_tokens`, :func:`~mtl.moe.grouped.combine_slots`):
    no ``index_add_`` accumulation, deterministic on every device. Invalid
    slots (top-p padding, expert-choice non-selections) are sorted after every
    valid one and never computed.

    On CPU, plain SwiGLU experts in the padded layout take a fused path
    (:func:`~mtl.moe.grouped.fused_swiglu_moe`): gather, experts and combine
    in one autograd node, a few experts at a time, so that no full-size
    temporary is allocated.

    Under ``torch.compile`` the dispatch runs eagerly between the compiled
    graphs (one graph break): its row layout is sized from per-expert counts
    read back to the host, and traced, every new routing would recompile.

    Attributes:
        max_padding: largest padded-layout overhead, as a fraction of the real
            rows, accepted before switching to the sorted layout.
        chunk_rows: padded rows per chunk of experts on the fused CPU path
            (1: every expert alone, no padding; large: all experts padded to
            the largest count, one batched matmul).

    Example:
        >>> from mtl.moe import ExpertBank, TopKGate
        >>> bank = ExpertBank.swiglu(num_experts=4, d_model=8, d_hidden=16)
        >>> x = torch.randn(6, 8)
        >>> DroplessDispatch()(x, TopKGate(d_model=8, num_experts=4, k=2)(x), bank).output_TD.shape
        torch.Size([6, 8])
    """

    max_padding: float = 0.25
    chunk_rows: int = 1024

    # The row layout is sized from per-expert counts read back to the host (chunk
    # bounds, padded capacity): traced, each new set of counts would be baked in and
    # recompile the graph. Under torch.compile the dispatch runs eagerly between the
    # compiled graphs of the router and the rest.
    @torch.compiler.disable
    def forward(self, x_TD: Tensor, routing: RoutingResult, experts: Experts) -> DispatchResult:
        T, K = routing.experts_TK.shape
        E = experts.num_experts
        flat_ids = routing.experts_TK.reshape(-1)
        w_TK = routing.weights_TK
        if routing.valid_TK is not None:
            # invalid slots go to a sentinel group E, sorted last and never computed
            flat_ids = flat_ids.masked_fill(~routing.valid_TK.reshape(-1), E)
            w_TK = w_TK.masked_fill(~routing.valid_TK, 0.0)
        # Sorting a (1, N) view along its last dim takes ATen's plain per-row
        # stable sort; 1-D integer tensors go to a parallel radix sort that is
        # ~100x slower on CPU for E >= 64 at these sizes.
        ids_sorted_N, order_N = torch.sort(flat_ids.view(1, -1), dim=-1, stable=True)
        ids_sorted_N, order_N = ids_sorted_N.view(-1), order_N.view(-1)
        counts_E = bin_counts(flat_ids, E + 1)[:E]
        token_N = order_N // K  # token of each sorted row
        capacity = self._padded_capacity(x_TD, routing, experts, counts_E)
        if capacity is not None:
            fused = _fusable(experts, x_TD)
            # fused path: each chunk of experts padded to its own largest count;
            # otherwise all experts to the global one (one batched matmul)
            chunks = (
                expert_chunks(counts_E.tolist(), self.chunk_rows)
                if fused
                else [(0, E, capacity, 0)]
            )
            start_E, n_rows = chunk_row_starts(chunks, x_TD.device)
            # sorted row n of expert e goes to row start_e + (n - first sorted row of e)
            shift_E = start_E - (torch.cumsum(counts_E, 0) - counts_E)
            row_N = torch.arange(T * K, device=x_TD.device) + shift_E[ids_sorted_N]
            row_token_M = torch.zeros(n_rows, dtype=torch.long, device=x_TD.device)
            row_token_M.index_put_((row_N,), token_N)
            slot_row_N = torch.empty_like(order_N).index_put_((order_N,), row_N)
            if fused:
                bank: ExpertBank = experts  # type: ignore[assignment]
                out_TD = fused_swiglu_moe(
                    x_TD,
                    w_TK,
                    bank.weights[0],
                    bank.gate_weights[0],
                    bank.weights[1],
                    row_token_M,
                    slot_row_N,
                    chunks,
                )
                return DispatchResult(output_TD=out_TD)
            x_MD = permute_tokens(x_TD, row_token_M, slot_row_N, K)
            y_ECD = experts.forward_all(x_MD.view(E, capacity, -1))
            y_MD = y_ECD.reshape(E * capacity, -1)
        else:
            slot_row_N = torch.empty_like(order_N).index_put_(
                (order_N,), torch.arange(T * K, device=x_TD.device)
            )
            row_token_M = token_N
            x_MD = permute_tokens(x_TD, row_token_M, slot_row_N, K)
            if routing.valid_TK is not None:
                # compute only the valid prefix; one host sync buys skipping padding
                n_valid = int(counts_E.sum())
                y_valid = experts.forward_grouped(x_MD[:n_valid], counts_E, ids_sorted_N[:n_valid])
                y_MD = torch.cat([y_valid, y_valid.new_zeros(T * K - n_valid, y_valid.shape[-1])])
            else:
                y_MD = experts.forward_grouped(x_MD, counts_E, ids_sorted_N)
        out_TD = combine_slots(y_MD, w_TK, slot_row_N, row_token_M)
        return DispatchResult(output_TD=out_TD)

    def _padded_capacity(
        self, x_TD: Tensor, routing: RoutingResult, experts: Experts, counts_E: Tensor
    ) -> int | None:
        """Rows per expert of the padded layout, or None to use the sorted layout."""
        if routing.valid_TK is not None or getattr(experts, "norms", None):
            # invalid slots are skipped by the sorted layout; padding rows would
            # corrupt per-expert batch statistics
            return None
        if x_TD.device.type == "cuda" and x_TD.dtype == torch.bfloat16:
            return None  # fused grouped_mm kernel, and no host sync
        capacity = int(counts_E.max())  # host sync: free on CPU
        n_rows = routing.experts_TK.numel()
        if capacity == 0 or counts_E.numel() * capacity > (1.0 + self.max_padding) * n_rows:
            return None
        return capacity


def _fusable(experts: Experts, x_TD: Tensor) -> bool:
    """Whether the fused CPU SwiGLU path applies."""
    return (
        x_TD.device.type == "cpu"
        and isinstance(experts, ExpertBank)
        and experts._is_plain_swiglu()
        and (experts.weights[0].dtype == x_TD.dtype or torch.is_autocast_enabled("cpu"))
    )


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
