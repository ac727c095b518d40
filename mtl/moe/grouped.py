"""Grouped matrix multiply: one matmul per expert over jagged, expert-sorted rows."""

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
        y = F.grouped_mm(x_ND.contiguous(), w_EDH.contiguous(), offs=offs)
        y = _ContiguousGrad.apply(y)
        total = offs[-1]
        # rows past the last offset are not written by the kernel: zero them
        row_N = torch.arange(N, device=x_ND.device)
        return torch.where((row_N < total).unsqueeze(-1), y, torch.zeros((), dtype=y.dtype))
    # Fallback: a loop of plain matmuls (one host sync for the group sizes).
    sizes = counts_E.tolist()
    rest = N - sum(sizes)
    parts = list(torch.split(x_ND, [*sizes, rest]))
    outs = [p @ w_EDH[e] for e, p in enumerate(parts[:-1])]
    outs.append(x_ND.new_zeros(rest, H))
    return torch.cat(outs, 0)
