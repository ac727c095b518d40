"""Dropout whose random mask is cheap to draw on CPU.

``torch.nn.functional.dropout`` on CPU draws one Bernoulli sample per element
through ``bernoulli_``, about 6 ns each on the 2-core benchmark machine: 3-5 ms
for the ``(1024, 512)`` hidden layer of a batch-1024 MMoE's experts, more than
the layer's matmul. :func:`fast_dropout` draws one 64-bit random word per four
elements and compares each 16-bit lane with a threshold, which is the same
Bernoulli dropout with the drop probability rounded to a multiple of
``2**-16`` (``p = 0.1`` becomes ``0.100006``): 0.6 ms instead of 3.2 ms for a
``(1024, 512)`` tensor there. The kept values are scaled by
``1 / (1 - p_rounded)``, so the expectation is preserved exactly. Other
devices use the native kernel (on GPU it is already fused and fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16
"""Resolution of the drop probability: one 16-bit uniform per element."""
_LANES_PER_WORD = 4


def _checked(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return float(p)


def rounded_drop_probability(p: float) -> float:
    """The drop probability :func:`fast_dropout` applies for ``p``: ``round(p * 2**16) / 2**16``."""
    return round(p * _LEVELS) / _LEVELS


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Mask of ``shape``: each element 1 independently with probability ``1 - p_rounded``, else 0.

    Args:
        shape: mask shape.
        p: drop probability in ``[0, 1)``.
        device: where to draw it (from that device's global generator).
        dtype: mask dtype (0 and 1 are exact in every floating dtype).

    Example:
        >>> keep_mask((2, 3), 0.0).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    n = 1
    for s in shape:
        n *= int(s)
    words = (n + _LANES_PER_WORD - 1) // _LANES_PER_WORD
    # full-range int64 words: every bit uniform, so each int16 lane is uniform on [-2**15, 2**15)
    bits = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None)
    return keep_from_uniform16(bits.view(torch.int16)[:n], p, dtype).view(shape)


def keep_from_uniform16(lanes: Tensor, p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """0/1 mask from int16 values uniform on ``[-2**15, 2**15)``: 0 for the lowest
    ``round(p * 2**16)`` values, so exactly ``1 - p_rounded`` of all values keep.

    Example:
        >>> every_value = torch.arange(-(2**15), 2**15).to(torch.int16)
        >>> float(keep_from_uniform16(every_value, 0.25).mean())
        0.75
    """
    threshold = round(p * _LEVELS) - _LEVELS // 2  # drop iff lane < threshold
    # a comparison written straight into a float tensor: no bool tensor and no cast pass
    out = torch.empty(lanes.shape, dtype=dtype, device=lanes.device)
    return torch.ge(lanes, threshold, out=out)


class _ScaleKept(torch.autograd.Function):
    """``x * keep * scale`` with a 0/1 mask in ``x``'s dtype; the scale is applied
    after the mask so that a bf16 ``x`` is scaled like ``F.dropout`` scales it."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest.

    On CPU the mask comes from :func:`keep_mask` (``p`` rounded to a multiple of
    ``2**-16``, kept values scaled by ``1 / (1 - p_rounded)``); elsewhere this is
    ``F.dropout``. Identity when not training or when ``p`` rounds to 0.

    Args:
        x: any shape, any floating dtype.
        p: drop probability in ``[0, 1)``.
        training: apply dropout (False: return ``x``).

    Example:
        >>> y = fast_dropout(torch.ones(4, 1000), p=0.5)
        >>> sorted(set(y.flatten().tolist()))
        [0.0, 2.0]
    """
    _checked(p)
    if not training or x.numel() == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    p_rounded = rounded_drop_probability(p)
    if p_rounded == 0.0:
        return x
    keep = keep_mask(x.shape, p, device=x.device, dtype=x.dtype)
    return _ScaleKept.apply(x, keep, 1.0 / (1.0 - p_rounded))


class FastDropout(nn.Module):
    """:func:`fast_dropout` as a module; a drop-in for ``nn.Dropout(p)``.

    Args:
        p: drop probability in ``[0, 1)``.

    Shapes:
        any -> same.

    Example:
        >>> drop = FastDropout(0.1).eval()
        >>> bool((drop(torch.ones(3)) == 1).all())
        True
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _checked(p)

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
