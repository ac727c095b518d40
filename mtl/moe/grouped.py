"""The grouped matrix multiply: each expert's weight on its own block of expert-sorted rows.

Rows ``x_ND`` are sorted by expert: the first ``counts_E[0]`` rows belong to
expert 0, the next ``counts_E[1]`` to expert 1, and so on (``N = counts_E.sum()``).
The grouped product is ``y[rows of e] = x[rows of e] @ w_EDH[e]``.

Every expert bank multiplies through its ``_grouped_mm`` method, which calls
:func:`grouped_mm` here; a faster kernel is a subclass overriding that one
method, never a branch inside the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mm_supported(x_ND: Tensor, w_EDH: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can run these operands here."""
    if not hasattr(F, "grouped_mm") or x_ND.dtype != w_EDH.dtype:
        return False
    if x_ND.device.type == "cuda":
        # the CUDA kernels need bf16 and compute capability >= 8.0
        return (
            x_ND.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device)[0] >= 8
        )
    if x_ND.device.type != "cpu" or x_ND.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_ND.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # the kernel's meta function (what torch.compile traces with) accepts bf16 only
        return False
    # the CPU kernel needs 16-byte aligned row strides on both operands
    item = x_ND.element_size()
    return (x_ND.shape[-1] * item) % 16 == 0 and (w_EDH.shape[-1] * item) % 16 == 0


def grouped_mm(x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """Multiply each expert's block of rows by that expert's weight.

    ``torch.nn.functional.grouped_mm`` where it runs, otherwise one matmul per
    expert. Both are plain autograd.

    Args:
        x_ND: ``(N, D)`` rows sorted by expert, ``N = counts_E.sum()``.
        w_EDH: ``(E, D, H)`` stacked expert weights.
        counts_E: ``(E,)`` int64 rows per expert.

    Returns:
        ``(N, H)``.

    Example:
        >>> x, w = torch.randn(5, 4), torch.randn(2, 4, 8)
        >>> y = grouped_mm(x, w, torch.tensor([2, 3]))
        >>> torch.allclose(y[2:], x[2:] @ w[1], atol=1e-5)
        True
    """
    if x_ND.shape[0] == 0 or not grouped_mm_supported(x_ND, w_EDH):
        return looped_grouped_mm(x_ND, w_EDH, counts_E)
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_NH = F.grouped_mm(x_ND.contiguous(), w_EDH.contiguous(), offs=offs_E)
    if y_NH.requires_grad:
        # the CPU kernel's backward rejects stride-0 gradients (``y.sum().backward()``)
        y_NH.register_hook(torch.Tensor.contiguous)
    return y_NH


def looped_grouped_mm(x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """:func:`grouped_mm` as one matmul per expert (reads the counts back to the host).

    Example:
        >>> x, w = torch.randn(3, 4), torch.randn(2, 4, 8)
        >>> looped_grouped_mm(x, w, torch.tensor([0, 3])).shape
        torch.Size([3, 8])
    """
    blocks = x_ND.split(counts_E.tolist())
    # unbind, not w_EDH[e]: one stacked weight gradient instead of E full-size ones
    return torch.cat([x @ w for x, w in zip(blocks, w_EDH.unbind(0), strict=True)])
