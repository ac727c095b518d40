"""The rankers accept every auxiliary loss of ``AUX_LOSSES`` that their gates' routing supports."""

from __future__ import annotations

import pytest
import torch

from mtl.models.rec import PLE, HoME, MMoE, OMoE
from mtl.moe import NoisyTopKGate, RoutingResult
from mtl.moe.losses import AUX_LOSSES

from .helpers import TASKS


@pytest.mark.parametrize("cls", [MMoE, OMoE, PLE, HoME], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(AUX_LOSSES))
def test_every_aux_loss_name_is_accepted(cls: type, name: str) -> None:
    model = cls(d_in=8, tasks=TASKS, aux_loss_weights={name: 0.5})
    assert model.aux_loss_weights == {name: 0.5}


@pytest.mark.parametrize("name", sorted(AUX_LOSSES))
def test_mmoe_with_noisy_top_k_gates_computes_every_aux_loss(name: str) -> None:
    torch.manual_seed(0)
    model = MMoE(
        d_in=8, tasks=TASKS, num_experts=4, expert_hidden=[16], aux_loss_weights={name: 2.0}
    )
    routings: list[RoutingResult] = []
    for task in TASKS:
        gate = NoisyTopKGate(d_model=8, num_experts=4, k=2)
        gate.register_forward_hook(lambda _m, _i, r: routings.append(r))
        model.mixture.gates[task] = gate
    model.train()
    out = model(torch.randn(32, 8))
    want = torch.stack([2.0 * AUX_LOSSES[name](r) for r in routings]).mean()
    assert len(routings) == len(TASKS)
    torch.testing.assert_close(out.aux_loss, want)
    if name in ("load_cv", "load_balance", "importance"):  # not trivially zero
        assert out.aux_loss.item() > 0
    out.aux_loss.backward()


def test_load_cv_of_a_gate_without_a_load_estimate_names_the_gate_kind() -> None:
    model = MMoE(d_in=8, tasks=TASKS, num_experts=4, aux_loss_weights={"load_cv": 1.0})
    with pytest.raises(ValueError, match="load_cv needs a gate that estimates load"):
        model(torch.randn(4, 8))
