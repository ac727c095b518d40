"""Grouped matrix multiply and the token permutations around it.

* :func:`grouped_matmul` -- one matmul per expert over jagged, expert-sorted rows.
* :func:`permute_tokens` / :func:`combine_slots` -- move tokens into an
  expert-major row layout and back, with hand-written backward passes that are
  plain gathers (no ``index_add_``/``index_put_`` accumulation, so they are
  deterministic and parallel on every device).

A *layout* maps the ``S = T * K`` routing slots (token-major: slot ``t * K + j``
is token ``t``'s ``j``-th choice) to ``M >= S`` buffer rows: ``slot_row_S[s]``
is the row that slot ``s`` occupies, ``row_token_M[r]`` the token whose input
row ``r`` holds. Rows that no slot occupies are padding: they hold some valid
token's input (``row_token_M`` points anywhere in ``[0, T)``), are computed and
ignored, and receive zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s CPU backward rejects stride-0 gradients (as produced by
    ``out.sum().backward()``), so the output is routed through this first.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def grouped_mm_supported(x: Tensor, w_EDH: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can run these operands here."""
    if not _HAS_GROUPED_MM or x.dtype != w_EDH.dtype:
        return False
    if x.device.type == "cuda":
        # the CUDA kernels need bf16 and compute capability >= 8.0
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            # the kernel's meta function (what torch.compile traces with) accepts
            # bf16 only, the CUDA rule, although the CPU kernel runs all three
            return False
        # the CPU path needs 16-byte aligned row strides on both operands
        item = x.element_size()
        return (x.shape[-1] * item) % 16 == 0 and (w_EDH.shape[-1] * item) % 16 == 0
    return False


def grouped_matmul(
    x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor, *, use_grouped_mm: bool | None = None
) -> Tensor:
    """Multiply each group of rows by its expert's weight.

    Rows of ``x_ND`` are sorted by expert: the first ``counts_E[0]`` rows belong
    to expert 0, the next ``counts_E[1]`` to expert 1, and so on. Rows past
    ``counts_E.sum()`` are padding and come back as zeros.

    Args:
        x_ND: ``(N, D)`` expert-sorted rows.
        w_EDH: ``(E, D, H)`` stacked expert weights.
        counts_E: ``(E,)`` int64 rows per expert.
        use_grouped_mm: force (True) or forbid (False) the fused kernel; ``None``
            picks it where :func:`grouped_mm_supported` says it runs.

    Returns:
        ``(N, H)`` products.

    Example:
        >>> x, w = torch.randn(5, 4), torch.randn(2, 4, 8)
        >>> y = grouped_matmul(x, w, torch.tensor([2, 3]))
        >>> torch.allclose(y[:2], x[:2] @ w[0], atol=1e-5)
        True
    """
    N = x_ND.shape[0]
    H = w_EDH.shape[-1]
    if N == 0:
        return x_ND.new_zeros(0, H)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_ND, w_EDH)
    if use_grouped_mm:
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        # Rows past the last offset are skipped by the kernel in both directions:
        # their forward output and their input gradient are left uninitialised, so
        # they are masked with ``where`` (it selects, it does not multiply: garbage,
        # even NaN, never leaks). Without such rows (the dropless dispatch's case)
        # the mask's two full-size passes forward and two backward are skipped;
        # reading the count back is free on CPU.
        exact = (
            x_ND.device.type == "cpu" and not torch.compiler.is_compiling() and int(offs[-1]) == N
        )
        in_group_N1 = None
        if not exact:
            in_group_N1 = (torch.arange(N, device=x_ND.device) < offs[-1]).unsqueeze(-1)
            x_ND = torch.where(in_group_N1, x_ND, x_ND.new_zeros(()))
        y = F.grouped_mm(x_ND.contiguous(), w_EDH.contiguous(), offs=offs)
        y = _ContiguousGrad.apply(y)
        return y if in_group_N1 is None else torch.where(in_group_N1, y, y.new_zeros(()))
    # Fallback: a loop of plain matmuls (one host sync for the group sizes).
    sizes = counts_E.tolist()
    rest = N - sum(sizes)
    parts = list(torch.split(x_ND, [*sizes, rest]))
    outs = [p @ w_EDH[e] for e, p in enumerate(parts[:-1])]
    outs.append(x_ND.new_zeros(rest, H))
    return torch.cat(outs, 0)


class _PermuteTokens(torch.autograd.Function):
    """``x_MD[r] = x_TD[row_token_M[r]]``; backward sums each token's ``K`` slot rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_TD: Tensor, row_token_M: Tensor, slot_row_S: Tensor, k: int
    ) -> Tensor:
        ctx.save_for_backward(slot_row_S)
        ctx.k = k
        return x_TD.index_select(0, row_token_M)

    @staticmethod
    def backward(ctx, grad_MD: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (slot_row_S,) = ctx.saved_tensors
        # fused gather + sum over each token's K rows (no (S, D) temporary);
        # padding rows are read by no slot, so their gradient is simply dropped
        grad_TD = F.embedding_bag(slot_row_S.view(-1, ctx.k), grad_MD.contiguous(), mode="sum")
        return grad_TD, None, None, None


class _CombineSlots(torch.autograd.Function):
    """``out_TD[t] = sum_j w_TK[t, j] * y_MD[slot_row_S[t * K + j]]``.

    Backward works in the row layout: ``grad_y[r] = w(r) * grad_out[token(r)]``
    (zero on padding rows) and ``grad_w[s] = <y[row(s)], grad_out[token(s)]>``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, y_MD: Tensor, w_TK: Tensor, slot_row_S: Tensor, row_token_M: Tensor
    ) -> Tensor:
        T, K = w_TK.shape
        w_TK = w_TK.to(y_MD.dtype)
        # fused weighted gather-sum: no (S, D) temporary
        out_TD = F.embedding_bag(slot_row_S.view(T, K), y_MD, per_sample_weights=w_TK, mode="sum")
        # each row's combine weight (zero on padding rows) for the backward
        w_M = w_TK.new_zeros(y_MD.shape[0]).index_put_((slot_row_S,), w_TK.reshape(-1))
        ctx.save_for_backward(y_MD, w_M, slot_row_S, row_token_M)
        ctx.w_shape = (T, K)
        ctx.w_dtype = w_TK.dtype
        return out_TD

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_TD: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        y_MD, w_M, slot_row_S, row_token_M = ctx.saved_tensors
        g_MD = grad_TD.index_select(0, row_token_M)  # grad of each row's token
        grad_y = grad_w = None
        if ctx.needs_input_grad[1]:
            gw_M = torch.bmm(y_MD.unsqueeze(1), g_MD.unsqueeze(-1)).view(-1)
            grad_w = gw_M.index_select(0, slot_row_S).view(ctx.w_shape)
        if ctx.needs_input_grad[0]:
            grad_y = g_MD.mul_(w_M.unsqueeze(-1))
        return grad_y, grad_w, None, None


def permute_tokens(x_TD: Tensor, row_token_M: Tensor, slot_row_S: Tensor, k: int) -> Tensor:
    """Gather token rows into a routing layout.

    Args:
        x_TD: ``(T, D)`` token inputs.
        row_token_M: ``(M,)`` int64, the token each buffer row holds (any
            token for padding rows).
        slot_row_S: ``(T * K,)`` int64, the row of each slot (injective).
        k: ``K``, slots per token.

    Returns:
        ``(M, D)`` rows; the gradient of a token is the sum over its ``K`` slots.

    Example:
        >>> x = torch.arange(6.0).view(3, 2)
        >>> permute_tokens(x, torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]), 1).tolist()
        [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    """
    return _PermuteTokens.apply(x_TD, row_token_M, slot_row_S, k)


def combine_slots(y_MD: Tensor, w_TK: Tensor, slot_row_S: Tensor, row_token_M: Tensor) -> Tensor:
    """Weighted sum of each token's ``K`` expert output rows: the inverse of :func:`permute_tokens`.

    Args:
        y_MD: ``(M, D)`` expert outputs in the routing layout.
        w_TK: ``(T, K)`` combine weights (cast to ``y``'s dtype; an invalid
            slot must carry weight 0).
        slot_row_S: ``(T * K,)`` int64 row of each slot.
        row_token_M: ``(M,)`` int64 token of each row (as for :func:`permute_tokens`).

    Returns:
        ``(T, D)``.

    Example:
        >>> y = torch.tensor([[1.0], [10.0], [100.0]])
        >>> combine_slots(y, torch.tensor([[0.5, 2.0]]), torch.tensor([2, 0]), torch.tensor([0, 0, 0])).tolist()
        [[52.0]]
    """
    return _CombineSlots.apply(y_MD, w_TK, slot_row_S, row_token_M)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``x``'s matmuls run in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


ExpertChunk = tuple[int, int, int, int]
"""``(e0, e1, C, base)``: experts ``e0..e1-1``, ``C`` rows each, from row ``base``."""


def expert_chunks(counts: list[int], target_rows: int) -> list[ExpertChunk]:
    """Group consecutive experts into chunks padded to their own largest count.

    A chunk takes experts while its padded size stays within ``target_rows``
    (it always takes at least one). Padding each chunk only to its own largest
    count, rather than every expert to the global largest, wastes less: with
    one expert per chunk nothing is padded at all.

    Args:
        counts: rows routed to each expert.
        target_rows: padded rows per chunk.

    Returns:
        chunks covering all experts in order; row ranges are contiguous.

    Example:
        >>> expert_chunks([5, 3, 8, 0], target_rows=10)
        [(0, 2, 5, 0), (2, 3, 8, 10), (3, 4, 0, 18)]
    """
    chunks: list[ExpertChunk] = []
    base = e0 = 0
    cap = 0
    for e, n in enumerate(counts):
        new_cap = max(cap, n)
        if e > e0 and (e + 1 - e0) * new_cap > target_rows:
            chunks.append((e0, e, cap, base))
            base += (e - e0) * cap
            e0, new_cap = e, n
        cap = new_cap
    if counts:
        chunks.append((e0, len(counts), cap, base))
    return chunks


def chunk_row_starts(chunks: list[ExpertChunk], device: torch.device) -> tuple[Tensor, int]:
    """``(E,)`` first row of each expert in the chunked padded layout, and the total rows."""
    starts = [base + (e - e0) * cap for e0, e1, cap, base in chunks for e in range(e0, e1)]
    e0, e1, cap, base = chunks[-1]
    return torch.tensor(starts, device=device), base + (e1 - e0) * cap


class _FusedSwiGLUMoE(torch.autograd.Function):
    """Gather -> SwiGLU experts -> weighted combine, as one autograd node.

    Works in the chunked padded layout (:func:`expert_chunks`) and processes
    one chunk of experts at a time, so that every temporary (gathered inputs,
    hidden activations, their gradients) is a few MiB, stays in cache and is
    reused from the allocator's free lists instead of fresh, page-faulting
    memory. Only ``h1 = x W1``, ``h3 = x W3`` and the expert outputs ``y`` are
    kept for the backward; the gathered inputs and ``silu(h1) * h3`` are
    recomputed per chunk. Each token's input gradient is the sum of its ``K``
    rows, gathered in one ``embedding_bag`` (no scatter-add; deterministic).
    This path is CPU-only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_TD: Tensor,
        w_TK: Tensor,
        w1_EDH: Tensor,
        w3_EDH: Tensor,
        w2_EHD: Tensor,
        row_token_M: Tensor,
        slot_row_S: Tensor,
        chunks: list[ExpertChunk],
    ) -> Tensor:
        H = w1_EDH.shape[-1]
        T, K = w_TK.shape
        M = row_token_M.shape[0]
        # under autocast, run every matmul in the autocast dtype (explicitly: the
        # out= calls below are not autocast) and hand gradients back in the
        # inputs' own dtypes
        ctx.dtypes = (x_TD.dtype, w1_EDH.dtype, w3_EDH.dtype, w2_EHD.dtype)
        dt = _compute_dtype(x_TD)
        x_TD, w1_EDH, w3_EDH, w2_EHD = (
            t.to(dt).contiguous() for t in (x_TD, w1_EDH, w3_EDH, w2_EHD)
        )
        D, D_out = x_TD.shape[-1], w2_EHD.shape[-1]
        h1 = x_TD.new_empty(M, H)
        h3 = x_TD.new_empty(M, H)
        y_MD = x_TD.new_empty(M, D_out)
        # Sizes are spelled out in every view: a chunk of experts that got no rows
        # (C = 0) has no elements, and a -1 there would be ambiguous.
        for e0, e1, C, base in chunks:
            rows = slice(base, base + (e1 - e0) * C)
            x_c = x_TD.index_select(0, row_token_M[rows]).view(e1 - e0, C, D)
            h1_c, h3_c = h1[rows].view(e1 - e0, C, H), h3[rows].view(e1 - e0, C, H)
            torch.bmm(x_c, w1_EDH[e0:e1], out=h1_c)
            torch.bmm(x_c, w3_EDH[e0:e1], out=h3_c)
            a_c = F.silu(h1_c).mul_(h3_c)
            torch.bmm(a_c, w2_EHD[e0:e1], out=y_MD[rows].view(e1 - e0, C, D_out))
        ctx.w_dtype = w_TK.dtype
        w_TK = w_TK.to(y_MD.dtype)
        out_TD = F.embedding_bag(slot_row_S.view(T, K), y_MD, per_sample_weights=w_TK, mode="sum")
        w_M = w_TK.new_zeros(M).index_put_((slot_row_S,), w_TK.reshape(-1))
        ctx.save_for_backward(
            x_TD, w1_EDH, w3_EDH, w2_EHD, row_token_M, slot_row_S, w_M, h1, h3, y_MD
        )
        ctx.chunks = chunks
        ctx.w_shape = (T, K)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_TD, w1, w3, w2, row_token_M, slot_row_S, w_M, h1, h3, y_MD = ctx.saved_tensors
        M, H = h1.shape
        D, D_out = x_TD.shape[-1], y_MD.shape[-1]
        grad_TD = grad_TD.to(y_MD.dtype).contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_xm = x_TD.new_empty(M, D) if need_x else None
        gw_M = w_M.new_empty(M) if need_w else None
        grad_w1, grad_w3, grad_w2 = (torch.empty_like(w) for w in (w1, w3, w2))
        for e0, e1, C, base in ctx.chunks:
            n = e1 - e0
            rows = slice(base, base + n * C)
            g_c = grad_TD.index_select(0, row_token_M[rows])  # (n*C, D) token grads
            if gw_M is not None:
                y_c = y_MD[rows]
                torch.bmm(y_c.unsqueeze(1), g_c.unsqueeze(-1), out=gw_M[rows].view(-1, 1, 1))
            gy = g_c.mul_(w_M[rows].unsqueeze(-1)).view(n, C, D_out)  # padding rows: 0
            h1_c, h3_c = h1[rows].view(n, C, H), h3[rows].view(n, C, H)
            s = F.silu(h1_c)
            torch.bmm((s * h3_c).transpose(1, 2), gy, out=grad_w2[e0:e1])
            grad_a = torch.bmm(gy, w2[e0:e1].transpose(1, 2))
            grad_h3 = s.mul_(grad_a)
            grad_h1 = grad_a.mul_(h3_c)
            torch.ops.aten.silu_backward.grad_input(grad_h1, h1_c, grad_input=grad_h1)
            x_c = x_TD.index_select(0, row_token_M[rows]).view(n, C, D)
            torch.bmm(x_c.transpose(1, 2), grad_h1, out=grad_w1[e0:e1])
            torch.bmm(x_c.transpose(1, 2), grad_h3, out=grad_w3[e0:e1])
            if grad_xm is not None:
                gx_c = torch.bmm(
                    grad_h1, w1[e0:e1].transpose(1, 2), out=grad_xm[rows].view(n, C, D)
                )
                gx_c.baddbmm_(grad_h3, w3[e0:e1].transpose(1, 2))
        grad_x = grad_w = None
        if grad_xm is not None:
            # each token's K rows summed in one fused gather (padding rows unread)
            T, K = ctx.w_shape
            grad_x = F.embedding_bag(slot_row_S.view(T, K), grad_xm, mode="sum")
        if gw_M is not None:
            grad_w = gw_M.index_select(0, slot_row_S).view(ctx.w_shape).to(ctx.w_dtype)
        dx, d1, d3, d2 = ctx.dtypes
        grad_x = None if grad_x is None else grad_x.to(dx)
        grads_w = (grad_w1.to(d1), grad_w3.to(d3), grad_w2.to(d2))
        return (grad_x, grad_w, *grads_w, None, None, None)


def fused_swiglu_moe(
    x_TD: Tensor,
    w_TK: Tensor,
    w1_EDH: Tensor,
    w3_EDH: Tensor,
    w2_EHD: Tensor,
    row_token_M: Tensor,
    slot_row_S: Tensor,
    chunks: list[ExpertChunk],
) -> Tensor:
    """Dropless SwiGLU MoE in a chunked padded layout, gather and combine fused in (CPU).

    ``out[t] = sum_j w_TK[t, j] * E_e(x[t])`` with ``E_e(x) = (silu(x W1_e) * (x W3_e)) W2_e``,
    the slots laid out as for :func:`permute_tokens` over the ``M`` rows of
    ``chunks`` (:func:`expert_chunks`): chunk ``(e0, e1, C, base)`` holds experts
    ``e0..e1-1`` with ``C`` rows each from row ``base``.

    Args:
        x_TD: ``(T, D)`` tokens.
        w_TK: ``(T, K)`` combine weights.
        w1_EDH, w3_EDH: ``(E, D, H)`` gate and up projections.
        w2_EHD: ``(E, H, D_out)`` down projection.
        row_token_M: ``(M,)`` int64 token of each row.
        slot_row_S: ``(T * K,)`` int64 row of each slot.
        chunks: the layout's expert chunks, processed one at a time.

    Returns:
        ``(T, D_out)``.
    """
    return _FusedSwiGLUMoE.apply(
        x_TD, w_TK, w1_EDH, w3_EDH, w2_EHD, row_token_M, slot_row_S, chunks
    )
