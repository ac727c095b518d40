"""One-gate mixture of experts: the MMoE paper's OMoE baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl.models.rec.common import (
    as_loss_weights,
    as_widths,
    check_dim,
    check_tasks,
    gate_aux_loss,
    representation_bank,
)
from mtl.models.rec.output import MultiTaskOutput
from mtl.models.rec.towers import TaskTowers
from mtl.moe import DenseSoftmaxGate, MultiGateMixture

_GATE = "shared"


class OMoE(nn.Module):
    """OMoE: ``E`` experts mixed by a single softmax gate shared by all tasks.

    ``h = sum_e softmax(x W + b)_e * Expert_e(x)``, ``logit_t = Tower_t(h)``: a
    shared bottom made of experts. It isolates what MMoE's per-task gates add.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order.
        num_experts: ``E``.
        expert_hidden: widths of each expert MLP; the last is the representation width.
        tower_hidden: hidden widths of each task tower.
        dropout: dropout in the towers.
        expert_activation: expert activation.
        expert_norm: per-expert batch norm before each activation.
        gate_temperature: softmax temperature of the gate.
        aux_loss_weights: ``{loss name: weight}`` over :mod:`mtl.moe.losses`.

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``; ``gate_weights[task]`` is the
        same ``(B, E)`` tensor for every task.

    Example:
        >>> import torch
        >>> model = OMoE(d_in=16, tasks=["click", "like"], num_experts=4, expert_hidden=[32])
        >>> out = model(torch.randn(8, 16))
        >>> out.gate_weights["click"] is out.gate_weights["like"]
        True
    """

    def __init__(
        self,
        *,
        d_in: int,
        tasks: Sequence[str],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        expert_activation: str = "relu",
        expert_norm: bool = False,
        gate_temperature: float = 1.0,
        aux_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        self.num_experts = check_dim("num_experts", num_experts)
        widths = as_widths("expert_hidden", expert_hidden, allow_empty=False)
        self.aux_loss_weights = as_loss_weights(aux_loss_weights)
        bank = representation_bank(
            num_experts=num_experts,
            dims=[d_in, *widths],
            activation=expert_activation,
            expert_norm=expert_norm,
        )
        gate = DenseSoftmaxGate(d_model=d_in, num_experts=num_experts, temperature=gate_temperature)
        self.mixture = MultiGateMixture(experts=bank, gates={_GATE: gate})
        self.towers = TaskTowers(
            tasks=self.tasks, d_in=widths[-1], hidden=tower_hidden, dropout=dropout
        )
        self.expert_kinds = ["shared"] * num_experts

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        mix = self.mixture(x_BD)
        routing = mix.routing[_GATE]
        w_BE = routing.dense_weights()
        return MultiTaskOutput(
            logits=self.towers(mix.outputs[_GATE]),
            aux_loss=gate_aux_loss([routing], self.aux_loss_weights, x_BD.device),
            gate_weights=dict.fromkeys(self.tasks, w_BE),
            expert_outputs=mix.expert_outputs_ETD,
            expert_kinds=list(self.expert_kinds),
        )
