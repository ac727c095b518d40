"""DeepSeek-V3's group-limited routing in SigmoidBiasGate, against a per-token reference."""

from __future__ import annotations

import pytest
import torch

from mtl.moe import SigmoidBiasGate
from mtl.moe.gates.sigmoid import group_limited_mask


def _reference(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    *,
    k: int,
    n_group: int,
    topk_group: int,
    scale: float,
) -> tuple[list[set[int]], list[dict[int, float]]]:
    """Token by token, in plain Python: the experts chosen and their weights."""
    T, E = logits_TE.shape
    per = E // n_group
    chosen, weights = [], []
    for t in range(T):
        s = [1.0 / (1.0 + float(torch.exp(-logits_TE[t, e]))) for e in range(E)]
        sel = [s[e] + float(bias_E[e]) for e in range(E)]
        group_score = [
            sum(sorted(sel[g * per : (g + 1) * per], reverse=True)[:2]) for g in range(n_group)
        ]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        top = sorted(allowed, key=lambda e: -sel[e])[:k]
        total = sum(s[e] for e in top)
        chosen.append(set(top))
        weights.append({e: scale * s[e] / total for e in top})
    return chosen, weights


@pytest.mark.parametrize(
    ("E", "k", "n_group", "topk_group"), [(8, 3, 4, 2), (12, 2, 3, 1), (16, 4, 4, 3)]
)
def test_group_limited_matches_reference(E: int, k: int, n_group: int, topk_group: int) -> None:
    torch.manual_seed(0)
    gate = SigmoidBiasGate(
        d_model=6, num_experts=E, k=k, route_scale=2.5, n_group=n_group, topk_group=topk_group
    )
    gate.expert_bias_E.normal_(0.0, 0.3)
    x = torch.randn(40, 6)
    r = gate(x)
    chosen, weights = _reference(
        r.logits_TE.detach(),
        gate.expert_bias_E,
        k=k,
        n_group=n_group,
        topk_group=topk_group,
        scale=2.5,
    )
    for t in range(x.shape[0]):
        got = r.experts_TK[t].tolist()
        assert set(got) == chosen[t]
        for j, e in enumerate(got):
            assert r.weights_TK[t, j].item() == pytest.approx(weights[t][e], abs=1e-6)


def test_group_limit_changes_routing_and_all_groups_is_plain_top_k() -> None:
    """Negative control: limiting groups changes some tokens' experts; topk_group = n_group does not."""
    torch.manual_seed(0)
    plain = SigmoidBiasGate(d_model=6, num_experts=8, k=3)
    limited = SigmoidBiasGate(d_model=6, num_experts=8, k=3, n_group=4, topk_group=2)
    all_groups = SigmoidBiasGate(d_model=6, num_experts=8, k=3, n_group=4, topk_group=4)
    limited.load_state_dict(plain.state_dict())
    all_groups.load_state_dict(plain.state_dict())
    x = torch.randn(64, 6)
    a, b, c = plain(x), limited(x), all_groups(x)
    torch.testing.assert_close(a.dense_weights(), c.dense_weights())
    assert (a.dense_weights() - b.dense_weights()).abs().max() > 0.1


def test_group_mask_keeps_best_groups_by_top2_sum() -> None:
    # group 0: 0.9 + 0.0 = 0.9 (best single expert), group 1: 0.6 + 0.5 = 1.1
    s = torch.tensor([[0.9, 0.0, 0.6, 0.5]])
    assert group_limited_mask(s, n_group=2, topk_group=1).tolist() == [[False, False, True, True]]


def test_gradients_flow_to_the_router() -> None:
    """The router's gradient equals the chain rule written out in float64."""
    torch.manual_seed(0)
    gate = SigmoidBiasGate(d_model=6, num_experts=8, k=2, route_scale=2.5, n_group=4, topk_group=2)
    x = torch.randn(10, 6)
    c_TE = torch.randn(10, 8)  # each token's weights sum to route_scale: weigh them unevenly
    r = gate(x)
    (r.dense_weights() * c_TE).sum().backward()
    # loss = sum_t sum_{e in top_t} c_te * scale * s_te / S_t, S_t = sum_{j in top_t} s_tj,
    # s = sigmoid(x W^T): dloss/ds_te = scale * (c_te - sum_j c_tj s_tj / S_t) / S_t
    s = torch.sigmoid(x.double() @ gate.proj.weight.detach().double().T)
    top = torch.zeros_like(s).scatter_(1, r.experts_TK, 1.0)
    S = (s * top).sum(1, keepdim=True)
    mean_c = (c_TE.double() * s * top).sum(1, keepdim=True) / S
    d_logits = top * 2.5 * (c_TE.double() - mean_c) / S * s * (1 - s)
    want = d_logits.T @ x.double()
    assert want.abs().max() > 0.1
    torch.testing.assert_close(gate.proj.weight.grad, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_experts": 8, "k": 2, "n_group": 3}, "divide num_experts"),
        ({"num_experts": 8, "k": 2, "n_group": 4, "topk_group": 5}, "topk_group"),
        ({"num_experts": 8, "k": 5, "n_group": 4, "topk_group": 2}, "k=5 exceeds"),
        ({"num_experts": 4, "k": 1, "n_group": 4, "topk_group": 2}, ">= 2 experts per group"),
    ],
)
def test_bad_group_settings_are_named(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SigmoidBiasGate(d_model=4, **kw)


def test_deepseek_v3_presets_use_group_limited_routing() -> None:
    """conf/gate/deepseek_v3.yaml (the lm_deepseek_v3 preset's gate) limits groups."""
    from functools import partial

    from mtl.training.build import build
    from mtl.training.gate_config import model_config

    node = model_config("lm_deepseek_v3")["moe"]
    gate_factory = build(node["gate"], what="gate")
    assert isinstance(gate_factory, partial)
    gate = gate_factory(d_model=8, num_experts=node["num_experts"])
    assert isinstance(gate, SigmoidBiasGate)
    assert 1 < gate.topk_group < gate.n_group
