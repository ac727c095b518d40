"""Several gates over one expert bank: the multi-gate mixture of MMoE, PLE and HoME."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtl.moe.dispatch import combine_dense_many
from mtl.moe.experts import ExpertBank
from mtl.moe.gates.dense import DenseSoftmaxGate
from mtl.moe.routing import RoutingResult


@dataclass
class MultiGateOutput:
    """Result of :class:`MultiGateMixture`.

    Attributes:
        outputs: ``{gate name: (T, D_out)}`` mixed representation per gate.
        routing: ``{gate name: RoutingResult}`` (``K = E``, weights per expert).
        expert_outputs_ETD: ``(E, T, D_out)`` every expert's output, for
            diagnostics (dead units, output scale spread).
    """

    outputs: dict[str, Tensor]
    routing: dict[str, RoutingResult]
    expert_outputs_ETD: Tensor


class MultiGateMixture(nn.Module):
    """Experts computed once, mixed by one gate per task (or per lower-level unit).

    ``h_g = sum_e w_g(x)_e * Expert_e(x)`` for every gate ``g``. MMoE is one
    bank and one :class:`~mtl.moe.gates.DenseSoftmaxGate` per task; PLE/CGC and
    HoME are the same with ``expert_mask`` on each gate restricting it to shared
    + own experts. Experts may receive one input per expert (``(E, T, D)``,
    HoME's feature-gated views, PLE's upper levels) or a shared ``(T, D)``.

    On a shared input the mixture's only linear maps of ``x`` are the experts'
    first layer and the gates' logits: :meth:`input_weight` gives them as one
    matrix and :meth:`forward_projected` continues from ``x @ input_weight()``,
    a seam for callers that compute that product more cheaply than by forming
    ``x`` (:class:`~mtl.models.rec.ranker.Ranker` folds embedding tables into it).

    Args:
        experts: an :class:`~mtl.moe.experts.ExpertBank` or ``ExpertList``.
        gates: ``{name: gate}``; each gate routes over all ``E`` experts.

    Shapes:
        ``x (T, D) | (E, T, D)``, gate inputs ``(T, D_g)`` -> outputs ``(T, D_out)``.

    Example:
        >>> from mtl.moe import DenseSoftmaxGate, ExpertBank
        >>> mix = MultiGateMixture(
        ...     experts=ExpertBank(num_experts=4, dims=[8, 16], activation="relu", activate_last=True),
        ...     gates={t: DenseSoftmaxGate(d_model=8, num_experts=4) for t in ("click", "like")})
        >>> x = torch.randn(5, 8)
        >>> out = mix(x)
        >>> out.outputs["like"].shape
        torch.Size([5, 16])
        >>> torch.allclose(mix.forward_projected(x @ mix.input_weight()).outputs["like"],
        ...                out.outputs["like"], atol=1e-6)
        True
    """

    def __init__(self, *, experts: nn.Module, gates: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not gates:
            raise ValueError("MultiGateMixture needs at least one gate")
        for name, g in gates.items():
            if getattr(g, "num_experts", experts.num_experts) != experts.num_experts:
                raise ValueError(
                    f"gate {name!r} routes to {g.num_experts} experts, bank has {experts.num_experts}"
                )
        self.experts = experts
        self.gates = nn.ModuleDict(dict(gates))

    def forward(
        self, x: Tensor, gate_inputs: Tensor | Mapping[str, Tensor] | None = None
    ) -> MultiGateOutput:
        """Run every expert once, route with every gate, mix.

        Args:
            x: ``(T, D)`` shared expert input or ``(E, T, D)`` one input per expert.
            gate_inputs: one ``(T, D_g)`` tensor for all gates, a dict per gate
                name, or None to gate on ``x`` (which must then be shared).
        """
        y_ETD = self.experts.forward_all(x)
        routing = {
            name: gate(self._gate_input(name, x, gate_inputs)) for name, gate in self.gates.items()
        }
        return _mix(y_ETD, routing)

    @staticmethod
    def _gate_input(
        name: str, x: Tensor, gate_inputs: Tensor | Mapping[str, Tensor] | None
    ) -> Tensor:
        if gate_inputs is None:
            if x.dim() != 2:
                raise ValueError("per-expert inputs (E, T, D) need explicit gate_inputs")
            return x
        if isinstance(gate_inputs, Tensor):
            return gate_inputs
        if name not in gate_inputs:
            raise ValueError(f"gate_inputs has no entry for gate {name!r}")
        return gate_inputs[name]

    def _dense_gates(self) -> list[DenseSoftmaxGate]:
        """The gates, checked to be linear in a shared input (what the projected path needs)."""
        if not isinstance(self.experts, ExpertBank):
            raise TypeError("a projected input needs an ExpertBank")
        gates = list(self.gates.values())
        for g in gates:
            if not isinstance(g, DenseSoftmaxGate) or g.input_jitter > 0:
                raise TypeError("a projected input needs dense softmax gates without input jitter")
        return gates  # type: ignore[return-value]

    def input_weight(self) -> Tensor:
        """``(D, N)``: the experts' first layer, then each gate's ``E`` logit columns."""
        bank: ExpertBank = self.experts  # type: ignore[assignment]
        w_gates = [g.proj.weight.t() for g in self._dense_gates()]
        return torch.cat([bank.first_layer_weight(), *w_gates], dim=1)

    def forward_projected(self, z_TN: Tensor) -> MultiGateOutput:
        """:meth:`forward` of a shared input ``x`` given ``z_TN = x @ input_weight()``.

        Args:
            z_TN: ``(T, N)`` products, float32 (the gate logits are taken from them).
        """
        gates = self._dense_gates()
        bank: ExpertBank = self.experts  # type: ignore[assignment]
        E = bank.num_experts
        n_experts = z_TN.shape[1] - E * len(gates)
        # split, not slicing: each slice's backward would zero-fill a full-size gradient
        z_expert, *z_gates = z_TN.split([n_experts] + [E] * len(gates), dim=1)
        y_ETD = bank.forward_all_projected(z_expert)
        routing = {}
        for (name, gate), z_TE in zip(self.gates.items(), z_gates, strict=True):
            bias = gate.proj.bias
            routing[name] = gate.route(
                z_TE.float() if bias is None else z_TE.float() + bias.float()
            )
        return _mix(y_ETD, routing)


def _mix(y_ETD: Tensor, routing: dict[str, RoutingResult]) -> MultiGateOutput:
    """Each gate's weighted sum of the experts' outputs."""
    mixed = combine_dense_many(y_ETD, [r.dense_weights() for r in routing.values()])
    return MultiGateOutput(
        outputs=dict(zip(routing, mixed, strict=True)),
        routing=routing,
        expert_outputs_ETD=y_ETD,
    )
