"""MMoE's optional norms and dropout build the classic DeepCTR/torch-rechub MMoE layout exactly."""

from __future__ import annotations

import torch
from torch import nn

from mtl.models.rec import MMoE, Tower

from .helpers import TASKS


class _ReferenceMMoE(nn.Module):
    """Written out module by module: experts ``Linear -> BN -> ReLU -> Dropout``,
    gates ``Linear -> BN -> Softmax``, towers ``Linear -> BN -> ReLU -> Dropout -> Linear``."""

    def __init__(self, d_in: int, num_experts: int, hidden: int, tower: int, p: float) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p))
            for _ in range(num_experts)
        )
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, num_experts), nn.BatchNorm1d(num_experts), nn.Softmax(-1))
            for _ in TASKS
        )
        self.towers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden, tower),
                nn.BatchNorm1d(tower),
                nn.ReLU(),
                nn.Dropout(p),
                nn.Linear(tower, 1),
            )
            for _ in TASKS
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y_BEH = torch.stack([e(x) for e in self.experts], dim=1)
        out = {}
        for t, gate, tower in zip(TASKS, self.gates, self.towers, strict=True):
            h = (gate(x).unsqueeze(-1) * y_BEH).sum(1)
            out[t] = tower(h).squeeze(-1)
        return out


def _copy_into(mm: MMoE, ref: _ReferenceMMoE) -> None:
    bank = mm.mixture.experts
    with torch.no_grad():
        for e, expert in enumerate(ref.experts):
            lin, bn = expert[0], expert[1]
            bank.weights[0][e].copy_(lin.weight.T)
            bank.biases[0][e].copy_(lin.bias)
            H = lin.out_features
            bank.norms[0].weight[e * H : (e + 1) * H].copy_(bn.weight)
            bank.norms[0].bias[e * H : (e + 1) * H].copy_(bn.bias)
        for t, gate in zip(TASKS, ref.gates, strict=True):
            mine = mm.mixture.gates[t]
            mine.proj.load_state_dict(gate[0].state_dict())
            mine.logit_norm.load_state_dict(gate[1].state_dict())
        for t, tower in zip(TASKS, ref.towers, strict=True):
            mine_tower: Tower = mm.towers.towers[t]
            mine_tower.mlp[0].load_state_dict(tower[0].state_dict())
            mine_tower.mlp[1].load_state_dict(tower[1].state_dict())
            mine_tower.head.load_state_dict(tower[4].state_dict())


def _pair(p: float) -> tuple[MMoE, _ReferenceMMoE]:
    torch.manual_seed(0)
    mm = MMoE(
        d_in=12,
        tasks=TASKS,
        num_experts=3,
        expert_hidden=[8],
        tower_hidden=[5],
        dropout=p,
        expert_norm=True,
        expert_dropout=p,
        tower_norm=True,
        gate_norm=True,
    )
    ref = _ReferenceMMoE(12, 3, 8, 5, p)
    with torch.no_grad():  # non-trivial norm parameters, so that a swapped one shows
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    _copy_into(mm, ref)
    return mm, ref


def test_rechub_layout_has_the_same_parameters_and_outputs_in_train_and_eval() -> None:
    mm, ref = _pair(p=0.0)
    assert sum(p.numel() for p in mm.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(64, 12, requires_grad=True)
    out, want = mm(x).logits, ref(x)  # training mode: batch statistics
    for t in TASKS:
        torch.testing.assert_close(out[t], want[t])
    g_out = torch.autograd.grad(sum(out[t].sum() * (i + 1) for i, t in enumerate(TASKS)), x)
    g_ref = torch.autograd.grad(sum(want[t].sum() * (i + 1) for i, t in enumerate(TASKS)), x)
    torch.testing.assert_close(g_out[0], g_ref[0])
    mm.eval()
    ref.eval()  # running statistics, updated identically by the forward above
    x2 = torch.randn(16, 12)
    for t in TASKS:
        torch.testing.assert_close(mm(x2).logits[t], ref(x2)[t])


def test_expert_and_tower_dropout_act_in_training_only() -> None:
    mm, _ = _pair(p=0.5)
    x = torch.randn(64, 12)
    torch.manual_seed(1)
    a = mm(x).logits["click"]
    torch.manual_seed(2)
    b = mm(x).logits["click"]
    assert not torch.allclose(a, b)
    mm.eval()
    torch.testing.assert_close(mm(x).logits["click"], mm(x).logits["click"])
    # without dropout the same seeds give the same training output
    mm0, _ = _pair(p=0.0)
    torch.manual_seed(1)
    a0 = mm0(x).logits["click"]
    torch.manual_seed(2)
    torch.testing.assert_close(a0, mm0(x).logits["click"])
