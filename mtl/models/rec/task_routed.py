"""Task-routed mixture of experts: one gate for all tasks, routing on the task (MoDE-style).

MMoE gives every task its own gate on the input. Here a single gate, shared by
the tasks, routes on a *condition*: a learned embedding of the task id, alone
(``route_on="task"``: the routing depends on the task only, a learned
per-task choice of experts, as in task-level routing / MoDE's
condition-routed experts) or concatenated with the input
(``route_on="task_and_input"``: per example, with the gate's parameters shared
across tasks). The experts see the input; the gate sees the condition.

The mixing is :class:`~mtl.moe.MultiGateMixture`'s, with the one gate module
serving every task's name and each task's condition as that name's gate input,
so a sparse gate means sparse compute here as in MMoE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
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
from mtl.moe import DenseSoftmaxGate
from mtl.moe.multi_gate import GateFactory, MultiGateMixture, make_gate

RouteOn = Literal["task", "task_and_input"]


class TaskRoutedMoE(nn.Module):
    """``E`` shared experts, one gate routing on a task embedding, one tower per task.

    ``h_t = sum_e g(c_t)_e * Expert_e(x)`` with ``c_t = emb(t)`` (``route_on="task"``)
    or ``c_t = [emb(t); x]`` (``"task_and_input"``), ``g`` one gate shared by
    every task, then ``logit_t = Tower_t(h_t)``. The experts run once (on the
    rows some task routed to them when the gate is sparse); the gate runs once
    per task.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order (a task's id is its position).
        num_experts: ``E``.
        expert_hidden: widths of each expert MLP; the last is the representation width.
        tower_hidden: hidden widths of each task tower.
        dropout: dropout in the towers.
        expert_activation: expert activation.
        task_dim: width of the learned task embedding.
        route_on: ``"task"`` (the routing depends on the task only) or
            ``"task_and_input"``.
        gate: builds the gate from ``d_model`` and ``num_experts`` (a ``conf/gate``
            choice); default :class:`~mtl.moe.DenseSoftmaxGate`.
        aux_loss_weights: ``{loss name: weight}`` over :mod:`mtl.moe.losses`,
            averaged over the tasks' routings.
        sparse_compute: as :class:`~mtl.moe.MultiGateMixture`'s: None computes
            sparsely with a sparse gate, False always densely (the A/B reference).

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``, gate weights ``{task: (B, E)}``,
        expert outputs ``(E, B, expert_hidden[-1])``.

    Example:
        >>> model = TaskRoutedMoE(d_in=16, tasks=["click", "like"], num_experts=4,
        ...                       expert_hidden=[32], task_dim=8)
        >>> out = model(torch.randn(8, 16))
        >>> w = out.gate_weights["like"]
        >>> w.shape, bool((w == w[0]).all())  # route_on="task": one routing per task
        (torch.Size([8, 4]), True)
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
        task_dim: int = 16,
        route_on: RouteOn = "task",
        gate: GateFactory = DenseSoftmaxGate,
        aux_loss_weights: Mapping[str, float] | None = None,
        sparse_compute: bool | None = None,
    ) -> None:
        super().__init__()
        self.d_in = check_dim("d_in", d_in)
        self.tasks = check_tasks(tasks)
        self.num_experts = check_dim("num_experts", num_experts)
        self.task_dim = check_dim("task_dim", task_dim)
        if route_on not in ("task", "task_and_input"):
            raise ValueError(f"route_on must be 'task' or 'task_and_input', got {route_on!r}")
        self.route_on = route_on
        widths = as_widths("expert_hidden", expert_hidden, allow_empty=False)
        self.aux_loss_weights = as_loss_weights(aux_loss_weights)
        experts = representation_bank(
            num_experts=num_experts, dims=[d_in, *widths], activation=expert_activation
        )
        self.expert_activation = expert_activation
        self.task_embedding = nn.Embedding(len(self.tasks), task_dim)
        d_gate = task_dim + (d_in if route_on == "task_and_input" else 0)
        gate_module = make_gate(gate, d_model=d_gate, num_experts=num_experts, name="task gate")
        # one module under every task's name: the mixture routes each task's condition with it
        self.mixture = MultiGateMixture(
            experts=experts,
            gates={t: gate_module for t in self.tasks},
            sparse_compute=sparse_compute,
        )
        self.towers = TaskTowers(
            tasks=self.tasks, d_in=widths[-1], hidden=tower_hidden, dropout=dropout
        )

    @property
    def gate(self) -> nn.Module:
        """The gate shared by the tasks."""
        return self.mixture.gates[self.tasks[0]]

    @property
    def experts(self) -> nn.Module:
        """The expert bank."""
        return self.mixture.experts

    def gate_input(self, x_BD: Tensor, task: str) -> Tensor:
        """``(B, d_gate)``: the condition the gate sees for ``task``."""
        vec = self.task_embedding.weight[self.tasks.index(task)]  # no id tensor to copy over
        condition = vec.to(x_BD.dtype).expand(x_BD.shape[0], -1)  # (B, task_dim)
        return condition if self.route_on == "task" else torch.cat([condition, x_BD], dim=-1)

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        mix = self.mixture(x_BD, gate_inputs={t: self.gate_input(x_BD, t) for t in self.tasks})
        routing = mix.routing
        return MultiTaskOutput(
            logits=self.towers(mix.outputs),
            aux_loss=gate_aux_loss(list(routing.values()), self.aux_loss_weights, x_BD.device),
            gate_weights={t: r.dense_weights() for t, r in routing.items()},
            expert_outputs=mix.expert_outputs,
            expert_kinds=["shared"] * self.num_experts,
            expert_load={0: mix.expert_load()},
            expert_activation=self.expert_activation,
        )
