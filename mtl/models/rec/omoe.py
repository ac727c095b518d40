"""One-gate mixture of experts: the MMoE paper's OMoE baseline."""

from __future__ import annotations

from mtl.models.rec.mmoe import MMoE

_GATE = "shared"


class OMoE(MMoE):
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
        expert_dropout, tower_norm, gate_norm: as in :class:`~mtl.models.rec.mmoe.MMoE`.
        gate_temperature: softmax temperature of the gate.
        gate: builds the gate from ``d_model`` and ``num_experts``; default
            :class:`~mtl.moe.DenseSoftmaxGate` (see :class:`~mtl.models.rec.mmoe.MMoE`).
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

    def _gate_names(self) -> list[str]:
        return [_GATE]

    def _gate_of(self, task: str) -> str:
        return _GATE
