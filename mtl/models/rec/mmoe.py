"""Multi-gate mixture of experts (Ma et al., KDD 2018)."""

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
from mtl.moe import DenseSoftmaxGate, MultiGateMixture, MultiGateOutput
from mtl.moe.multi_gate import GateFactory, make_gate


class MMoE(nn.Module):
    """MMoE: ``E`` shared experts, one softmax gate per task, one tower per task.

    The paper's Figure 1(c), bottom to top: ``E`` experts on the input, one
    gate per task, ``h_t = sum_e softmax(x W_t + b_t)_e * Expert_e(x)``, then
    ``logit_t = Tower_t(h_t)``. The experts run once (one batched matmul per
    layer) and every gate mixes their outputs (:class:`~mtl.moe.MultiGateMixture`).
    :meth:`input_weight` and :meth:`forward_projected` expose the first linear
    map on ``x`` (experts' first layer and gate logits) as a seam for
    :class:`~mtl.models.rec.ranker.Ranker`'s embedding fold.

    Args:
        d_in: width of the embedded input.
        tasks: task names, in output order.
        num_experts: ``E``.
        expert_hidden: widths of each expert MLP; the last is the representation width.
        tower_hidden: hidden widths of each task tower.
        dropout: dropout in the towers.
        expert_activation: expert activation (``relu`` as in the paper, or ``swish``...).
        expert_norm: per-expert batch norm before each activation (HoME's fix, for ablations).
        expert_dropout: dropout after each expert layer's activation.
        tower_norm: batch norm before each tower activation.
        gate_norm: batch norm on the gate logits. ``expert_norm``,
            ``expert_dropout = dropout``, ``tower_norm`` and ``gate_norm`` together
            build torch-rechub's ``MMOE`` exactly.
        gate_temperature: softmax temperature of the gates.
        gate: builds each gate from ``d_model`` and ``num_experts`` (a class or
            partial: :class:`~mtl.moe.TopKGate`, a ``conf/gate`` choice...);
            default :class:`~mtl.moe.DenseSoftmaxGate`. ``gate_norm`` and a
            ``gate_temperature`` other than 1 are passed to it as ``logit_norm``
            and ``temperature``, which only the dense gate takes.
        aux_loss_weights: ``{loss name: weight}`` over :mod:`mtl.moe.losses`
            (``importance``, ``z_loss``, ``entropy``...), averaged over gates.
        sparse_compute: with sparse gates, run each expert on its routed rows
            only (None: unless ``expert_norm``; False: dense, for A/B runs);
            see :class:`~mtl.moe.MultiGateMixture`.

    Shapes:
        ``x (B, d_in) ->`` logits ``{task: (B,)}``, gate weights ``{task: (B, E)}``,
        expert outputs ``(E, B, expert_hidden[-1])``.

    Example:
        >>> import torch
        >>> model = MMoE(d_in=16, tasks=["click", "like"], num_experts=4, expert_hidden=[32])
        >>> out = model(torch.randn(8, 16))
        >>> out.gate_weights["like"].shape, out.expert_outputs.shape
        (torch.Size([8, 4]), torch.Size([4, 8, 32]))
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
        expert_dropout: float = 0.0,
        tower_norm: bool = False,
        gate_norm: bool = False,
        gate_temperature: float = 1.0,
        gate: GateFactory = DenseSoftmaxGate,
        aux_loss_weights: Mapping[str, float] | None = None,
        sparse_compute: bool | None = None,
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
            dropout=expert_dropout,
        )
        self.expert_kinds = ["shared"] * num_experts
        self.expert_activation = expert_activation
        # Only settings away from their defaults are passed: any gate takes the defaults.
        options: dict[str, object] = {}
        if gate_temperature != 1.0:
            options["temperature"] = gate_temperature
        if gate_norm:
            options["logit_norm"] = True
        gates = {
            name: make_gate(
                gate, d_model=d_in, num_experts=num_experts, name=f"gate {name!r}", **options
            )
            for name in self._gate_names()
        }
        self.mixture = MultiGateMixture(experts=bank, gates=gates, sparse_compute=sparse_compute)
        self.towers = TaskTowers(
            tasks=self.tasks, d_in=widths[-1], hidden=tower_hidden, dropout=dropout, norm=tower_norm
        )

    def forward(self, x_BD: Tensor) -> MultiTaskOutput:
        return self._towers(self.mixture(x_BD))

    def supports_projection(self) -> bool:
        """Whether :meth:`input_weight`/:meth:`forward_projected` apply (dense softmax gates)."""
        return self.mixture.supports_projection()

    def input_weight(self) -> Tensor:
        """``(d_in, X)``: the experts' first layer and the gates' logit columns."""
        return self.mixture.input_weight()

    def forward_projected(self, z_BX: Tensor) -> MultiTaskOutput:
        """:meth:`forward` given ``z_BX = x_BD @ input_weight()`` (float32)."""
        return self._towers(self.mixture.forward_projected(z_BX))

    def _towers(self, mix: MultiGateOutput) -> MultiTaskOutput:
        """Each task's tower on its gate's mixture, with the gates' diagnostics."""
        w_BE = {name: r.dense_weights() for name, r in mix.routing.items()}
        device = next(iter(mix.outputs.values())).device
        return MultiTaskOutput(
            logits=self.towers({t: mix.outputs[self._gate_of(t)] for t in self.tasks}),
            aux_loss=gate_aux_loss(list(mix.routing.values()), self.aux_loss_weights, device),
            gate_weights={t: w_BE[self._gate_of(t)] for t in self.tasks},
            expert_outputs=mix.expert_outputs,
            expert_kinds=list(self.expert_kinds),
            expert_load={0: mix.expert_load()},
            expert_activation=self.expert_activation,
        )

    def _gate_names(self) -> list[str]:
        """One gate per task; :class:`~mtl.models.rec.omoe.OMoE` overrides this."""
        return list(self.tasks)

    def _gate_of(self, task: str) -> str:
        return task
