"""Progressive layered extraction (Tang et al., RecSys 2020): stacked CGC levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.models.rec.common import (
    SHARED_UNIT,
    as_loss_weights,
    as_widths,
    check_dim,
    check_tasks,
    gate_aux_loss,
    representation_bank,
)
from mtl.models.rec.output import GateLevel, MultiTaskOutput
from mtl.models.rec.towers import TaskTowers
from mtl.moe import DenseSoftmaxGate, MultiGateMixture, MultiGateOutput
from mtl.moe.multi_gate import GateFactory, make_gate


class PLE(nn.Module):
    """PLE: ``num_levels`` customized-gate-control (CGC) levels, then one tower per task.

    The paper's PLE figure, bottom to top: the input, CGC levels (experts, then
    gates mixing them), one tower per task on the last level's task outputs.
    Each level holds ``S`` shared experts and ``K`` experts per task, stored as
    one :class:`~mtl.moe.ExpertBank` (order: shared, then task blocks in task
    order). Task ``t``'s gate is a :class:`~mtl.moe.DenseSoftmaxGate` whose
    ``expert_mask`` allows only the shared experts and ``t``'s own; every level
    but the last also has a shared gate over all experts, whose output feeds the
    next level's shared experts. At level ``l > 0`` each expert reads the
    representation of its owner (shared experts: the shared output; task
    experts: their task's output), and each gate is computed from the same
    representation as its experts. With ``num_levels=1`` this is CGC.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order.
        num_levels: number of CGC levels (>= 1).
        num_shared_experts: ``S`` per level (>= 0).
        num_task_experts: ``K`` per task per level (>= 0; ``S + K >= 1``).
        expert_hidden: widths of each expert MLP (same at every level).
        tower_hidden: hidden widths of each task tower.
        dropout: dropout in the towers.
        expert_activation: expert activation.
        expert_norm: per-expert batch norm before each activation.
        expert_dropout: dropout after each expert layer's activation.
        tower_norm: batch norm before each tower activation.
        gate: builds each gate from ``d_model``, ``num_experts`` (and ``expert_mask``
            for the task gates); default :class:`~mtl.moe.DenseSoftmaxGate`. Top-k,
            noisy top-k, top-p and sigmoid + bias gates are masked through their
            logits (:class:`~mtl.moe.multi_gate.MaskedGate`); expert choice is refused.
        aux_loss_weights: ``{loss name: weight}``, over every gate of every level,
            each restricted to the experts it may use.
        sparse_compute: with sparse gates, run each expert on its routed rows
            only (None: unless ``expert_norm``; False: dense, for A/B runs);
            see :class:`~mtl.moe.MultiGateMixture`.

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``; gate weights ``{task: (B, E)}``
        and expert outputs ``(E, B, expert_hidden[-1])`` of the last level, with
        ``E = S + K * len(tasks)``.

    Example:
        >>> model = PLE(d_in=16, tasks=["click", "like"], num_levels=2,
        ...             num_shared_experts=2, num_task_experts=1, expert_hidden=[32])
        >>> out = model(torch.randn(8, 16))
        >>> out.expert_kinds
        ['shared', 'shared', 'task:click', 'task:like']
    """

    def __init__(
        self,
        *,
        d_in: int,
        tasks: Sequence[str],
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_hidden: Sequence[int] = (256, 128),
        tower_hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        expert_activation: str = "relu",
        expert_norm: bool = False,
        expert_dropout: float = 0.0,
        tower_norm: bool = False,
        gate: GateFactory = DenseSoftmaxGate,
        aux_loss_weights: Mapping[str, float] | None = None,
        sparse_compute: bool | None = None,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        self.num_levels = check_dim("num_levels", num_levels)
        S = check_dim("num_shared_experts", num_shared_experts, minimum=0)
        K = check_dim("num_task_experts", num_task_experts, minimum=0)
        if S + K < 1:
            raise ValueError("PLE needs num_shared_experts + num_task_experts >= 1")
        widths = as_widths("expert_hidden", expert_hidden, allow_empty=False)
        self.aux_loss_weights = as_loss_weights(aux_loss_weights)

        # Unit 0 is the shared representation, unit i + 1 is task i's.
        self.expert_kinds = ["shared"] * S + [f"task:{t}" for t in self.tasks for _ in range(K)]
        self.expert_activation = expert_activation
        owner = [0] * S + [i + 1 for i in range(len(self.tasks)) for _ in range(K)]
        self.register_buffer("owner_E", torch.tensor(owner, dtype=torch.long), persistent=False)
        E = len(owner)
        self.num_experts = E

        levels = []
        d_level = d_in
        for level in range(self.num_levels):
            bank = representation_bank(
                num_experts=E,
                dims=[d_level, *widths],
                activation=expert_activation,
                expert_norm=expert_norm,
                dropout=expert_dropout,
            )
            gates: dict[str, nn.Module] = {}
            for i, t in enumerate(self.tasks):
                allowed = [e for e in range(E) if owner[e] in (0, i + 1)]
                gates[t] = make_gate(
                    gate,
                    d_model=d_level,
                    num_experts=E,
                    expert_mask=allowed,
                    name=f"level {level} gate {t!r}",
                )
            if level < self.num_levels - 1 and S > 0:  # without shared experts nothing reads it
                gates[SHARED_UNIT] = make_gate(
                    gate, d_model=d_level, num_experts=E, name=f"level {level} shared gate"
                )
            levels.append(
                MultiGateMixture(experts=bank, gates=gates, sparse_compute=sparse_compute)
            )
            d_level = widths[-1]
        self.levels = nn.ModuleList(levels)
        self.towers = TaskTowers(
            tasks=self.tasks, d_in=widths[-1], hidden=tower_hidden, dropout=dropout, norm=tower_norm
        )

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        return self._upper_levels(self.levels[0](x_BD))

    def supports_projection(self) -> bool:
        """Whether :meth:`input_weight`/:meth:`forward_projected` apply (dense softmax gates)."""
        return self.levels[0].supports_projection()

    def input_weight(self) -> Tensor:
        """``(d_in, X)``: the first level's experts' first layer and gate logit columns."""
        return self.levels[0].input_weight()

    def forward_projected(self, z_BX: Tensor) -> MultiTaskOutput:
        """:meth:`forward` given ``z_BX = x_BD @ input_weight()`` (float32)."""
        return self._upper_levels(self.levels[0].forward_projected(z_BX))

    def _upper_levels(self, mix: MultiGateOutput) -> MultiTaskOutput:
        """Levels ``1..`` on the first level's output, then the towers."""
        routings = list(mix.routing.values())
        load = {0: mix.expert_load()}
        lower: list[GateLevel] = []
        for i, level in enumerate(self.levels[1:], start=1):
            lower.append(self._gate_level(i, mix))
            reps = mix.outputs
            # unit 0 is a placeholder when there are no shared experts (never indexed)
            shared = reps.get(SHARED_UNIT, reps[self.tasks[0]])
            reps_GBH = torch.stack([shared, *(reps[t] for t in self.tasks)])
            x_EBH = reps_GBH.index_select(0, self.owner_E)  # each expert reads its owner's rep
            gate_inputs = {name: reps[name] for name in level.gates}
            mix = level(x_EBH, gate_inputs=gate_inputs)
            routings += mix.routing.values()
            load[i] = mix.expert_load()
        return MultiTaskOutput(
            logits=self.towers({t: mix.outputs[t] for t in self.tasks}),
            aux_loss=gate_aux_loss(
                routings, self.aux_loss_weights, mix.outputs[self.tasks[0]].device
            ),
            gate_weights={t: mix.routing[t].dense_weights() for t in self.tasks},
            expert_outputs=mix.expert_outputs,
            expert_kinds=list(self.expert_kinds),
            expert_load=load,
            expert_activation=self.expert_activation,
            lower_levels=lower,
        )

    def _gate_level(self, number: int, mix: MultiGateOutput) -> GateLevel:
        """Level ``number`` (from 1) of ``num_levels`` below the top, for the diagnostics."""
        return GateLevel(
            name=f"level {number} of {self.num_levels}",
            gate_weights={name: r.dense_weights() for name, r in mix.routing.items()},
            expert_outputs=mix.expert_outputs,
            expert_kinds=list(self.expert_kinds),
            activation=self.expert_activation,
        )
