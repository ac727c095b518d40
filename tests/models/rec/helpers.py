"""Shared helpers of the ranking-model tests: a learnable synthetic batch and a training loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.rec import MultiTaskOutput

TASKS = ["click", "like", "comment"]


def synthetic_batch(
    n: int = 64, d: int = 16, tasks: Sequence[str] = TASKS, seed: int = 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """``x (n, d)`` and binary labels that are a (noise-free) function of ``x``.

    Each task thresholds its own random projection with a non-linear term, so
    a model must fit three different decision boundaries from one input.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    labels = {}
    for t in tasks:
        w, u = torch.randn(d, generator=g), torch.randn(d, generator=g)
        score = x @ w + 2.0 * torch.sin(x @ u)
        labels[t] = (score > score.median()).float()
    return x, labels


def esmm_batch(n: int = 64, d: int = 16, seed: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """``ctr`` and ``ctcvr`` labels with ``ctcvr <= ctr`` (conversion needs a click)."""
    x, lab = synthetic_batch(n, d, ["ctr", "cvr"], seed)
    return x, {"ctr": lab["ctr"], "ctcvr": lab["ctr"] * lab["cvr"]}


def task_loss(out: MultiTaskOutput, labels: dict[str, Tensor]) -> Tensor:
    """Mean over tasks of BCE (with logits, or on probabilities for ``probs``) plus aux loss."""
    losses = []
    for t, y in labels.items():
        if t in out.logits:
            losses.append(F.binary_cross_entropy_with_logits(out.logits[t], y))
        else:
            losses.append(F.binary_cross_entropy(out.probs[t].clamp(1e-7, 1 - 1e-7), y))
    return torch.stack(losses).mean() + out.aux_loss


def fit(
    model: nn.Module, x: Tensor, labels: dict[str, Tensor], steps: int = 300, lr: float = 1e-2
) -> float:
    """Full-batch Adam; returns the loss of the last step (train mode)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = task_loss(model(x), labels)
        loss.backward()
        opt.step()
    return float(loss.detach())


def copied_experts(bank: nn.Module) -> list[nn.Sequential]:
    """The bank's experts as independent ``Linear -> ReLU`` stacks with copied weights."""
    experts = []
    for e in range(bank.num_experts):
        layers: list[nn.Module] = []
        for w, b in zip(bank.weights, bank.biases, strict=True):
            lin = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                lin.weight.copy_(w[e].T)
                lin.bias.copy_(b[e])
            layers += [lin, nn.ReLU()]
        experts.append(nn.Sequential(*layers))
    return experts


def copied_gate(gate: nn.Module) -> nn.Linear:
    """The gate's projection as an independent ``nn.Linear``."""
    lin = nn.Linear(gate.proj.in_features, gate.proj.out_features)
    lin.load_state_dict(gate.proj.state_dict())
    return lin


def mix(
    experts: list[nn.Module],
    inputs: list[Tensor],
    gate: nn.Linear,
    g_in: Tensor,
    allowed: Sequence[int] | None = None,
) -> Tensor:
    """``sum_e softmax(gate(g_in))_e * expert_e(input_e)``, the softmax over ``allowed`` only."""
    logits = gate(g_in)
    if allowed is not None:
        blocked = torch.ones(logits.shape[-1], dtype=torch.bool)
        blocked[list(allowed)] = False
        logits = logits.masked_fill(blocked, float("-inf"))
    w_BE = torch.softmax(logits, dim=-1)
    return sum(w_BE[:, e : e + 1] * ex(inputs[e]) for e, ex in enumerate(experts))
