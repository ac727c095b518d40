"""``gate_aux_loss``: a gate's losses over the experts it may use, never over a token's row."""

from __future__ import annotations

import pytest
import torch

from mtl.models.rec.common import gate_aux_loss
from mtl.moe import DenseSoftmaxGate, ExpertChoiceGate, TopPGate, load_balance_loss


def _routings(gate: torch.nn.Module, x_TD: torch.Tensor) -> tuple:
    """The routing of ``x`` and of ``x`` with its rows in reverse order."""
    torch.manual_seed(0)
    return gate(x_TD), gate(x_TD.flip(0))


@pytest.mark.parametrize(
    "gate",
    [
        ExpertChoiceGate(d_model=16, num_experts=4, capacity_factor=1.0),
        TopPGate(d_model=16, num_experts=4, p=0.6),
    ],
    ids=["expert_choice", "top_p"],
)
def test_sparse_gates_balance_over_all_experts_whatever_the_row_order(
    gate: torch.nn.Module,
) -> None:
    torch.manual_seed(1)
    x_TD = torch.randn(64, 16)
    r, r_flipped = _routings(gate, x_TD)
    w = {"load_balance": 1.0}
    loss = gate_aux_loss([r], w, x_TD.device)
    # the loss of the routing itself, over all E experts (slots that vary per token
    # are not an expert mask)
    assert loss.item() == pytest.approx(
        load_balance_loss(r.probs_TE, r.experts_TK, r.valid_TK).item(), rel=1e-6
    )
    assert gate_aux_loss([r_flipped], w, x_TD.device).item() == pytest.approx(loss.item(), rel=1e-5)


def test_dense_gate_with_expert_mask_balances_over_its_allowed_experts() -> None:
    torch.manual_seed(2)
    gate = DenseSoftmaxGate(d_model=8, num_experts=4, expert_mask=[True, True, False, True])
    x_TD = torch.randn(32, 8)
    r = gate(x_TD)
    loss = gate_aux_loss([r], {"importance": 1.0}, x_TD.device)
    # reference: the importance loss (CV^2 of per-expert weight sums) over the 3 allowed experts
    imp_E = r.dense_weights()[:, [0, 1, 3]].sum(0)
    cv2 = imp_E.var(unbiased=False) / imp_E.mean() ** 2
    assert loss.item() == pytest.approx(cv2.item(), rel=1e-4)
