"""Auxiliary losses of masked sparse gates count only the experts each gate may use."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from mtl.models.rec import PLE
from mtl.moe import NoisyTopKGate, TopKGate, TopPGate
from mtl.moe.losses import aux_losses
from mtl.moe.masked_routing import restrict_to_allowed
from mtl.moe.multi_gate import MaskedGate

K = 2


def _cv2(v: Tensor) -> Tensor:
    return v.var(unbiased=False) / v.mean() ** 2


def _by_hand(gate: MaskedGate, x: Tensor, allowed: list[int]) -> dict[str, Tensor]:
    """Top-k over the allowed experts alone: softmax, choices and losses written out."""
    logits = gate.gate.logits(x)[:, allowed]  # (T, E_allowed), the other experts never exist
    probs = torch.softmax(logits, -1)
    weights, top_i = probs.topk(K, dim=-1)  # renormalize=False: the plain probabilities
    T, n = probs.shape
    f = torch.zeros(n)
    gate_sum = torch.zeros(n)
    for t in range(T):
        for j in range(K):
            f[top_i[t, j]] += 1.0 / (T * K)
            gate_sum[top_i[t, j]] += weights[t, j]
    return {
        "load_balance": n * (f * probs.mean(0)).sum(),
        "z_loss": (torch.logsumexp(logits, -1) ** 2).mean(),
        "importance": _cv2(gate_sum),
    }


def test_ple_top_k_aux_losses_normalise_by_the_allowed_experts() -> None:
    torch.manual_seed(0)
    weights = {"load_balance": 1.0, "z_loss": 0.1, "importance": 0.5}
    model = PLE(
        d_in=6,
        tasks=["a", "b"],
        num_levels=1,
        num_shared_experts=2,
        num_task_experts=3,
        expert_hidden=[4],
        gate=functools.partial(TopKGate, k=K, renormalize=False),
        aux_loss_weights=weights,
    ).eval()
    x = torch.randn(40, 6)
    owner = model.owner_E.tolist()
    expected = []
    for i, task in enumerate(model.tasks):
        gate = model.levels[0].gates[task]
        allowed = [e for e in range(len(owner)) if owner[e] in (0, i + 1)]
        assert isinstance(gate, MaskedGate) and len(allowed) == 5 < len(owner)
        hand = _by_hand(gate, x, allowed)
        expected.append(sum(w * hand[name] for name, w in weights.items()))
    aux = model(x).aux_loss
    torch.testing.assert_close(aux, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)


def test_restricted_routing_renumbers_experts_and_drops_padding_on_masked_ones() -> None:
    torch.manual_seed(1)
    allowed = [0, 2, 5]
    gate = MaskedGate(gate=TopPGate(d_model=4, num_experts=6, p=0.9), expert_mask=allowed)
    x = torch.randn(30, 4)
    r = gate(x)
    sub = restrict_to_allowed(r)
    assert sub.num_experts == 3
    # every valid slot keeps its weight, on the renumbered expert
    torch.testing.assert_close(sub.dense_weights(), r.dense_weights()[:, allowed])
    # top-p pads its slots with the remaining (masked) experts: they must not count
    assert bool((~r.valid()).any())
    torch.testing.assert_close(sub.probs_TE.sum(-1), torch.ones(30))


def test_noisy_top_k_load_cv_counts_allowed_experts_only() -> None:
    torch.manual_seed(2)
    allowed = [1, 2, 3]
    gate = MaskedGate(
        gate=NoisyTopKGate(d_model=4, num_experts=5, k=1), expert_mask=allowed
    ).train()
    with torch.no_grad():
        gate.gate.noise_proj.weight.normal_()  # a real noise scale, so the estimate is smooth
    r = gate(torch.randn(64, 4))
    assert r.load_estimate_E is not None
    full = aux_losses(r, {"load_cv": 1.0})["load_cv"]
    restricted = aux_losses(restrict_to_allowed(r), {"load_cv": 1.0})["load_cv"]
    torch.testing.assert_close(restricted, _cv2(r.load_estimate_E[allowed]))
    assert float(full.detach()) > float(
        restricted.detach()
    )  # the masked experts' zero load inflates the CV


def test_unmasked_routing_is_left_alone() -> None:
    r = TopKGate(d_model=4, num_experts=3, k=1)(torch.randn(5, 4))
    assert restrict_to_allowed(r) is r


@pytest.mark.parametrize("mask", [[0, 1], [1, 3]])
def test_dense_masked_gate_keeps_its_restriction(mask: list[int]) -> None:
    from mtl.moe import DenseSoftmaxGate

    gate = DenseSoftmaxGate(d_model=4, num_experts=4, expert_mask=mask)
    r = gate(torch.randn(7, 4))
    sub = restrict_to_allowed(r)
    torch.testing.assert_close(sub.dense_weights(), r.dense_weights()[:, mask])
    lb = aux_losses(sub, {"load_balance": 1.0})["load_balance"]
    torch.testing.assert_close(lb, torch.tensor(1.0))  # a dense gate uses all its experts
