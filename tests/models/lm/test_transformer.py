"""TransformerLM: layer placement, outputs, aux losses, parameter counts, config errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mtl.models.lm import (
    CausalSelfAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerLM,
)
from mtl.models.lm.moe_ffn import MoEFFN
from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate
from mtl.moe.mixture_of_tokens import token_group_size

from .conftest import LM_PRESETS

SPEC = MoEFFN(
    num_experts=4,
    gate=partial(TopKGate, k=2, renormalize=True),
    experts=partial(SwiGLUExperts, d_hidden=16),
    aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001},
)


def _lm(**kw: object) -> TransformerLM:
    base: dict[str, object] = dict(
        vocab_size=40, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=12
    )
    return TransformerLM(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, [0, 1, 2, 3]),
        ({"moe_every": 2}, [0, 2]),
        ({"moe_every": 2, "moe_offset": 1}, [1, 3]),
        ({"moe_offset": 1}, [1, 2, 3]),
        ({"moe_layers": [3]}, [3]),
    ],
)
def test_moe_layer_placement(kw: dict[str, object], expected: list[int]) -> None:
    model = _lm(moe=SPEC, **kw)
    assert sorted(model.moe_layers()) == expected
    dense = [i for i in range(4) if i not in expected]
    assert all(isinstance(model.layers[i].ffn, SwiGLU) for i in dense)
    out = model(torch.randint(0, 40, (2, 12)))
    assert sorted(out.layer_stats) == expected


def test_output_aux_loss_is_the_sum_over_layers() -> None:
    model = _lm(moe=SPEC)
    x = torch.randint(0, 40, (2, 12))
    out = model(x, x)
    assert out.logits.shape == (2, 12, 40)
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    # per-layer: recompute each MoE layer's losses from its own input
    assert out.aux_losses["load_balance"].item() >= 4 * 0.01 * 0.99  # >= 1 per layer (uniform = 1)
    assert out.loss is not None
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 40), x.reshape(-1)))
    out.loss.backward()
    assert model.layers[0].ffn.gate.proj.weight.grad is not None


def test_aux_loss_flows_to_router_only_through_aux() -> None:
    model = _lm(moe=SPEC)
    out = model(torch.randint(0, 40, (2, 12)))
    out.aux_loss.backward()
    for layer in model.layers:
        assert layer.ffn.gate.proj.weight.grad.abs().sum() > 0
    # "only": the aux losses read the routers' logits, never a layer's output, so the
    # parts that no router reads (the last layer's experts, the final norm) get no
    # gradient; earlier experts do, through the residual stream into later routers.
    untouched = {name for name, p in model.named_parameters() if p.grad is None}
    assert untouched == {
        "layers.3.ffn.experts.w_gate",
        "layers.3.ffn.experts.w_up",
        "layers.3.ffn.experts.w_down",
        "norm.weight",
    }


def test_dense_model_has_zero_aux_and_no_stats() -> None:
    out = _lm()(torch.randint(0, 40, (1, 5)))
    assert out.aux_loss.item() == 0.0 and not out.layer_stats and not out.aux_losses


def test_routing_is_returned_on_request() -> None:
    model = _lm(moe=SPEC)
    x = torch.randint(0, 40, (2, 12))
    assert model(x).routing == {}
    routing = model(x, return_routing=True).routing
    assert sorted(routing) == [0, 1, 2, 3] and routing[0].experts_TK.shape == (24, 2)


def test_factory_and_template_parts() -> None:
    def factory(i: int, d_model: int) -> MoELayer:
        return MoELayer(
            gate=TopKGate(d_model=d_model, num_experts=2, k=1),
            experts=SwiGLUExperts(num_experts=2, d_model=d_model, d_hidden=8),
            dispatch=DroplessDispatch(),
        )

    assert _lm(moe=factory).moe_layers()[0].num_experts == 2
    spec = MoEFFN(
        num_experts=3,
        gate=partial(TopKGate, k=1),
        experts=partial(SwiGLUExperts, d_hidden=8),
        dispatch=DroplessDispatch,
    )
    model = _lm(moe=spec)
    layers = model.moe_layers()
    assert layers[0].gate is not layers[1].gate and layers[0].dispatch is not layers[1].dispatch


def test_spec_errors() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        MoEFFN(num_experts=0, gate=SPEC.gate, experts=SPEC.experts)
    with pytest.raises(ValueError, match="max_seq_len"):
        _lm()(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        _lm(moe=SPEC, moe_layers=[4])


@pytest.mark.parametrize("preset", LM_PRESETS)
def test_every_preset_builds_and_runs(
    preset: str, build_preset: Callable[..., TransformerLM]
) -> None:
    model = build_preset(preset)
    B = 2 * token_group_size(model)  # a Mixture of Tokens mixes whole groups of examples
    x = torch.randint(0, 50, (B, 16))
    out = model(x, x)
    assert out.logits.shape == (B, 16, 50)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), x.flatten()))
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values(), torch.tensor(0.0)))
    (out.loss + out.aux_loss).backward()


def test_dense_baseline_matches_mixtral_active_parameters(
    build_preset: Callable[..., TransformerLM],
) -> None:
    dense = build_preset("lm_dense").parameter_counts()
    mixtral = build_preset("lm_mixtral")
    counts = mixtral.parameter_counts()
    routers = sum(layer.gate.proj.weight.numel() for layer in mixtral.moe_layers().values())
    assert counts["active"] == dense["active"] + routers
    assert counts["total"] > 3 * dense["total"]
    for preset in ("lm_switch", "lm_deepseekmoe", "lm_olmoe", "lm_deepseek_v3", "lm_expert_choice"):
        active = build_preset(preset).parameter_counts()["active"]
        assert abs(active - dense["active"]) / dense["active"] < 0.07, preset


def test_rmsnorm_and_rotary() -> None:
    x = torch.randn(3, 8) * 5
    y = RMSNorm(dim=8)(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=1e-4)
    rope = RotaryEmbedding(head_dim=8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    rq, rk = rope(q, k)
    # rotation keeps norms, and q_i . k_j depends on i - j only
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    scores = rq[0, 0] @ rk[0, 0].T
    torch.testing.assert_close(scores[3, 1], scores[7, 5])
    assert not math.isclose(scores[3, 1].item(), scores[3, 2].item())
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(head_dim=7)


def test_grouped_query_attention_is_causal() -> None:
    attn = CausalSelfAttention(d_model=16, n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 9, 16)
    y = attn(x)
    x2 = x.clone()
    x2[:, 5] += 1.0
    y2 = attn(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert (y[:, 5:] - y2[:, 5:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(d_model=16, n_heads=4, n_kv_heads=3)


def test_dropout_acts_in_training_only_and_keeps_gradients(
    build_preset: Callable[..., TransformerLM],
) -> None:
    x = torch.randint(0, 50, (2, 16))
    torch.manual_seed(1)
    model = build_preset("lm_mixtral", dropout=0.3)
    for m in model.modules():  # attention dropout off: what varies below is the residual dropout
        if isinstance(m, CausalSelfAttention):
            m.dropout = 0.0
    plain = build_preset("lm_mixtral", dropout=0.0)
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x).logits, plain(x).logits)  # eval: no dropout
    model.train()
    plain.train()
    torch.manual_seed(2)
    a = model(x, x)
    torch.manual_seed(3)
    b = model(x, x)
    assert not torch.allclose(a.logits, b.logits)  # a fresh mask per call
    torch.manual_seed(2)
    torch.testing.assert_close(model(x, x).logits, a.logits)  # the same mask per seed
    assert not torch.allclose(a.logits, plain(x, x).logits)
    a.loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()
