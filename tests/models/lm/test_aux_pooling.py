"""``aux_loss_pooling``: per-layer sums or transformers' pooled load-balancing loss, exactly."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.models.lm.aux_pooling import pool_routings
from mtl.moe import SwiGLUExperts, TopKGate, TopPGate, load_balance_loss

N_LAYERS = 3


def _lm(pooling: str, *, k: int, weights: dict[str, float]) -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=6,
        gate=partial(TopKGate, k=k, renormalize=True),
        experts=partial(SwiGLUExperts, d_hidden=16),
        aux_loss_weights=weights,
    )
    # a large init_std makes the routers confident and unbalanced, so the
    # per-layer and pooled conventions differ clearly
    return TransformerLM(
        vocab_size=40,
        d_model=16,
        n_layers=N_LAYERS,
        n_heads=2,
        d_ff=32,
        max_seq_len=16,
        moe=moe,
        init_std=0.5,
        aux_loss_pooling=pooling,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("k", [1, 2])
def test_pooled_load_balance_equals_transformers_loss(k: int) -> None:
    modeling_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    coef = 0.02
    lm = _lm("pooled", k=k, weights={"load_balance": coef * k})
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    out = lm(idx, return_routing=True)
    logits = tuple(out.routing[i].logits_TE for i in range(N_LAYERS))
    want = coef * modeling_mixtral.load_balancing_loss_func(logits, 6, k)
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.aux_losses["load_balance"], want, rtol=1e-6, atol=0)

    # the default sums per-layer losses: about N_LAYERS times as much, and not exact
    summed = _lm("sum_over_layers", k=k, weights={"load_balance": coef * k})(idx)
    ratio = (summed.aux_loss / want).item()
    assert 0.5 * N_LAYERS < ratio < 1.5 * N_LAYERS
    assert abs(ratio - N_LAYERS) > 1e-4


def test_sum_over_layers_is_the_sum_of_each_layers_loss() -> None:
    lm = _lm("sum_over_layers", k=2, weights={"load_balance": 1.0})
    out = lm(torch.randint(0, 40, (2, 16)), return_routing=True)
    per_layer = [
        load_balance_loss(r.probs_TE, r.experts_TK, r.valid_TK) for r in out.routing.values()
    ]
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).sum())


def test_pooled_losses_need_equal_weights_in_every_layer() -> None:
    lm = _lm("pooled", k=2, weights={"load_balance": 1.0})
    lm.layers[1].ffn.aux_loss_weights = {"load_balance": 2.0}
    with pytest.raises(ValueError, match="same aux_loss_weights in every MoE layer"):
        lm(torch.randint(0, 40, (1, 4)))


def test_unknown_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match=r"aux_loss_pooling must be one of .*'mean'"):
        TransformerLM(vocab_size=10, d_model=8, n_layers=1, n_heads=2, aux_loss_pooling="mean")  # type: ignore[arg-type]


def test_pool_routings_pads_slots_and_sums_load_estimates() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    a = TopKGate(d_model=8, num_experts=4, k=1)(x)
    b = TopPGate(d_model=8, num_experts=4, p=0.7)(x)
    pooled = pool_routings([a, b])
    assert pooled.num_tokens == 10 and pooled.slots == max(a.slots, b.slots)
    torch.testing.assert_close(
        pooled.dense_weights(), torch.cat([a.dense_weights(), b.dense_weights()])
    )
    assert int(pooled.valid().sum()) == int(a.valid().sum()) + int(b.valid().sum())
