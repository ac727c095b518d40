"""fast_dropout: a Bernoulli(1 - p) mask at 2**-16 resolution, inverted scaling, exact gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mtl.moe.dropout import (
    FastDropout,
    fast_dropout,
    keep_from_uniform16,
    keep_mask,
    rounded_drop_probability,
)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_overall_and_in_every_lane(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 20
    mask = keep_mask((n,), p)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    q = 1.0 - rounded_drop_probability(p)
    for lane in range(4):  # each 16-bit lane of the 64-bit words must be unbiased
        m = n // 4
        rate = float(mask[lane::4].mean())
        assert abs(rate - q) < 6 * math.sqrt(q * (1 - q) / m), (lane, rate, q)
    # neighbouring elements (same word, next word) are independent
    a, b = mask[:-1], mask[1:]
    both = float((a * b).mean())
    assert abs(both - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / (n - 1))


@pytest.mark.parametrize("p", [0.0, 1e-5, 0.1, 0.5, 0.999])
def test_exactly_the_rounded_share_of_all_16_bit_values_keeps(p: float) -> None:
    every_value = torch.arange(-(2**15), 2**15).to(torch.int16)
    kept = int(keep_from_uniform16(every_value, p).sum())
    assert kept == 65536 - round(p * 65536)
    assert kept / 65536 == 1.0 - rounded_drop_probability(p)


def test_rounded_probability_is_a_multiple_of_two_to_minus_16() -> None:
    assert rounded_drop_probability(0.1) == 6554 / 65536
    assert rounded_drop_probability(0.0) == 0.0
    assert rounded_drop_probability(1e-6) == 0.0


def test_output_is_input_times_mask_over_keep_probability_and_gradient_matches() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    y = fast_dropout(x, 0.3)
    torch.manual_seed(7)
    mask = keep_mask(x.shape, 0.3)
    scale = 1.0 / (1.0 - rounded_drop_probability(0.3))
    torch.testing.assert_close(y, x.detach() * mask * scale, rtol=0, atol=0)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    torch.testing.assert_close(grad, g * mask * scale, rtol=0, atol=0)
    assert 0 < float(mask.mean()) < 1


def test_expectation_is_preserved() -> None:
    torch.manual_seed(2)
    x = torch.full((2000, 500), 3.0)
    assert abs(float(fast_dropout(x, 0.2).mean()) - 3.0) < 0.01


def test_identity_in_eval_and_at_zero_rate() -> None:
    x = torch.randn(5, 4)
    assert fast_dropout(x, 0.5, training=False) is x
    assert fast_dropout(x, 0.0) is x
    drop = FastDropout(0.5).eval()
    assert drop(x) is x


def test_reproducible_under_manual_seed_and_rejects_bad_probability() -> None:
    x = torch.randn(100, 10)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.4)
    torch.manual_seed(3)
    torch.testing.assert_close(a, fast_dropout(x, 0.4), rtol=0, atol=0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            fast_dropout(x, bad)
        with pytest.raises(ValueError, match="dropout probability"):
            FastDropout(bad)


def test_bf16_input_is_scaled_like_native_dropout() -> None:
    torch.manual_seed(4)
    x = torch.randn(300, 40).bfloat16()
    torch.manual_seed(5)
    y = fast_dropout(x, 0.1)
    torch.manual_seed(5)
    mask = keep_mask(x.shape, 0.1, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    # the scale multiplies in float and rounds once, as F.dropout does
    scale = 1.0 / (1.0 - rounded_drop_probability(0.1))
    torch.testing.assert_close(y, (x * mask).mul(scale), rtol=0, atol=0)
