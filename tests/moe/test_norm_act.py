"""batch_norm_relu_dropout: one autograd node equal to bias -> BatchNorm -> ReLU -> dropout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.models.rec.towers import MLP
from mtl.moe.dropout import keep_mask, rounded_drop_probability
from mtl.moe.norm_act import batch_norm_relu_dropout, fuses


def _norm(n: int, momentum: float | None = 0.1) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(n, momentum=momentum)
    with torch.no_grad():  # away from the identity init, so a swapped weight and bias show
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _reference(
    z: torch.Tensor, bn: nn.BatchNorm1d, shift: torch.Tensor | None, p: float, seed: int
) -> torch.Tensor:
    """Op by op, with the mask the fused function draws from the same seed."""
    h = bn(z if shift is None else z + shift)
    y = F.relu(h)
    if p:
        torch.manual_seed(seed)
        y = y * keep_mask(y.shape, p) / (1.0 - rounded_drop_probability(p))
    return y


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_shift", [True, False])
@pytest.mark.parametrize("strided", [True, False])
def test_values_gradients_and_running_stats_match_the_op_by_op_layer(
    p: float, with_shift: bool, strided: bool
) -> None:
    torch.manual_seed(0)
    T, N = 64, 12
    wide = torch.randn(T, N + 5) * 3 + 1
    z = (wide[:, :N] if strided else wide[:, :N].contiguous()).requires_grad_()
    if strided:
        assert not z.is_contiguous()
    shift = torch.randn(N, requires_grad=True) if with_shift else None
    bn = _norm(N)
    ref_bn = copy.deepcopy(bn)
    z_ref = z.detach().clone().requires_grad_()
    shift_ref = None if shift is None else shift.detach().clone().requires_grad_()
    assert fuses(z, bn)

    torch.manual_seed(5)
    y = batch_norm_relu_dropout(z, bn, shift_N=shift, dropout=p)
    want = _reference(z_ref, ref_bn, shift_ref, p, seed=5)
    torch.testing.assert_close(y, want)
    if p:
        assert 0.5 < float((y == 0).float().mean()) < 0.85  # ReLU zeros and dropped units
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1

    g = torch.randn(T, N)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
    if shift is not None:
        # zero in exact arithmetic (the batch mean removes the shift): exact zeros here
        assert shift.grad is not None and not shift.grad.any()
        torch.testing.assert_close(shift_ref.grad, torch.zeros(N), atol=1e-5, rtol=0)


def test_cumulative_momentum_and_eval_mode_follow_batchnorm() -> None:
    torch.manual_seed(1)
    bn = _norm(6, momentum=None)
    ref_bn = copy.deepcopy(bn)
    shift = torch.randn(6)
    for _ in range(3):
        z = torch.randn(32, 6) * 2
        batch_norm_relu_dropout(z, bn, shift_N=shift)
        _reference(z, ref_bn, shift, 0.0, seed=0)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    bn.eval()
    ref_bn.eval()
    z = torch.randn(8, 6)
    assert not fuses(z, bn)
    torch.testing.assert_close(
        batch_norm_relu_dropout(z, bn, shift_N=shift, dropout=0.5),
        F.relu(ref_bn(z + shift)),  # eval: running statistics, no dropout
    )


def test_single_row_batches_and_bad_dropout_are_errors() -> None:
    bn = _norm(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_relu_dropout(torch.randn(1, 4), bn)
    with pytest.raises(ValueError, match="dropout probability"):
        batch_norm_relu_dropout(torch.randn(3, 4), bn, dropout=1.0)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_mlp_fused_training_forward_equals_its_modules_in_sequence(p: float) -> None:
    torch.manual_seed(2)
    mlp = MLP(d_in=7, hidden=[9, 5], dropout=p, norm=True)
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(mlp)
    x = torch.randn(40, 7)
    torch.manual_seed(3)
    y = mlp(x)
    torch.manual_seed(3)
    want = nn.Sequential.forward(plain, x)  # the same modules, one after the other
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    for (name, a), b in zip(mlp.named_parameters(), plain.parameters(), strict=True):
        if name.endswith(".bias") and name.split(".")[0] in ("0", str(mlp._block)):
            # a Linear bias before batch norm: exact zero against rounding noise
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    for a, b in zip(mlp.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    mlp.eval()
    plain.eval()
    torch.testing.assert_close(mlp(x), nn.Sequential.forward(plain, x))
