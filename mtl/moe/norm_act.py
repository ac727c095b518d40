"""Batch norm, ReLU and dropout as one autograd node: the hidden layer of rec experts and towers.

torch-rechub's and DeepCTR's MLPs (and mtl's MMoE in their layout) run every
hidden layer as ``Linear -> BatchNorm -> ReLU -> Dropout``. Done op by op in
training this is a bias add, the batch norm, the ReLU, the dropout mask, its
multiply and scale, and as many backward nodes, each a pass over the
``(B, E*H)`` activations. :func:`batch_norm_relu_dropout` does the same maths
with fewer passes:

* the dropout scale ``1 / (1 - p)`` is folded into the norm's affine weight and
  bias (``relu(s * a) = s * relu(a)`` for ``s > 0``), so the mask is a plain
  0/1 multiply;
* ReLU and the mask are applied in place on the norm's output;
* the backward needs no mask of its own: a unit passes gradient exactly where
  the output is positive (kept and above zero), so one ``threshold_backward``
  on the output, then ATen's batch-norm backward.

In training the output does not depend on the shift added before the norm (the
batch mean removes it), so its gradient is exactly zero; it still moves the
running mean, which eval mode uses. Outside training, or off CPU, or for
inputs it does not cover, the function runs the plain modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.dropout import fast_dropout, keep_mask, rounded_drop_probability


def fuses(z_TN: Tensor, norm: nn.BatchNorm1d) -> bool:
    """Whether :func:`batch_norm_relu_dropout` takes its one-node path for this input."""
    return (
        norm.training
        and norm.affine
        and z_TN.device.type == "cpu"
        and z_TN.dtype == torch.float32
        and z_TN.dim() == 2
        and z_TN.shape[0] > 1
    )


def batch_norm_relu_dropout(
    z_TN: Tensor,
    norm: nn.BatchNorm1d,
    *,
    shift_N: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """``fast_dropout(relu(norm(z_TN + shift_N)), dropout)``, one autograd node in CPU training.

    Dropout is :func:`~mtl.moe.dropout.fast_dropout`'s (``p`` rounded to a
    multiple of ``2**-16``) and acts only while ``norm`` is training. The
    result and every gradient equal the op-by-op computation up to float
    rounding; the shift's gradient, zero in exact arithmetic, is returned as
    exact zeros.

    Args:
        z_TN: ``(T, N)`` pre-activations (the layer's matmul, without its bias).
        norm: ``nn.BatchNorm1d(N)``; its running statistics update as usual.
        shift_N: ``(N,)`` bias added before the norm, or None.
        dropout: drop probability in ``[0, 1)``.

    Returns:
        ``(T, N)``.

    Example:
        >>> norm = nn.BatchNorm1d(4)
        >>> z = torch.randn(8, 4)
        >>> y = batch_norm_relu_dropout(z, norm)
        >>> torch.allclose(y, torch.relu(nn.BatchNorm1d(4)(z)), atol=1e-6)
        True
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
    if not fuses(z_TN, norm):
        h_TN = z_TN if shift_N is None else z_TN + shift_N
        return fast_dropout(F.relu(norm(h_TN)), dropout, norm.training)
    factor = 0.0
    if norm.track_running_stats:
        assert norm.num_batches_tracked is not None
        norm.num_batches_tracked.add_(1)
        # nn.BatchNorm1d's rule: momentum None means a cumulative average
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    p = rounded_drop_probability(dropout)
    return _BatchNormReLUKeep.apply(
        z_TN,
        norm.weight,
        norm.bias,
        shift_N,
        norm.running_mean,
        norm.running_var,
        factor,
        norm.eps,
        p,
    )


class _BatchNormReLUKeep(torch.autograd.Function):
    """Training-mode ``relu(BN(z + shift)) * keep / (1 - p)``; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z_TN: Tensor,
        weight_N: Tensor,
        bias_N: Tensor,
        shift_N: Tensor | None,
        running_mean_N: Tensor | None,
        running_var_N: Tensor | None,
        factor: float,
        eps: float,
        p: float,
    ) -> Tensor:
        # one pass either way: ATen's batch norm is several times slower on a
        # strided input (a column block of a wider product) than on a dense one
        h_TN = z_TN + shift_N if shift_N is not None else z_TN.contiguous()
        scale = 1.0 / (1.0 - p)
        w_N, b_N = (weight_N * scale, bias_N * scale) if p else (weight_N, bias_N)
        y_TN, mean_N, invstd_N = torch.native_batch_norm(
            h_TN, w_N, b_N, running_mean_N, running_var_N, True, factor, eps
        )
        y_TN.clamp_min_(0.0)
        if p:
            y_TN.mul_(keep_mask(y_TN.shape, p, device=y_TN.device, dtype=y_TN.dtype))
        ctx.save_for_backward(h_TN, w_N, mean_N, invstd_N, y_TN)
        ctx.eps = eps
        ctx.scale = scale
        ctx.shift_shape = None if shift_N is None else shift_N.shape
        return y_TN

    @staticmethod
    def backward(ctx, grad_TN: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h_TN, w_N, mean_N, invstd_N, y_TN = ctx.saved_tensors
        # y > 0 exactly where the unit was kept and its normalised value positive
        g_TN = torch.ops.aten.threshold_backward(grad_TN, y_TN, 0.0)
        need = ctx.needs_input_grad
        g_z, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            g_TN,
            h_TN,
            w_N,
            None,
            None,
            mean_N,
            invstd_N,
            True,
            ctx.eps,
            [need[0], need[1], need[2]],
        )
        if ctx.scale != 1.0:
            # the kernel differentiated w.r.t. scale * weight and scale * bias
            g_w = None if g_w is None else g_w * ctx.scale
            g_b = None if g_b is None else g_b * ctx.scale
        g_shift = (
            torch.zeros(ctx.shift_shape, dtype=grad_TN.dtype, device=grad_TN.device)
            if need[3]
            else None
        )
        return g_z, g_w, g_b, g_shift, None, None, None, None, None
