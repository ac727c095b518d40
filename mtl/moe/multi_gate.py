"""Several gates over one expert bank: the multi-gate mixture of MMoE, PLE and HoME."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtl.moe.dispatch import combine_dense_many
from mtl.moe.experts import ExpertBank
from mtl.moe.gates.dense import DenseSoftmaxGate, route_dense_gates, routes_together
from mtl.moe.linear_input import LinearInput, input_width, materialize, project
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

    MMoE is one bank and one :class:`~mtl.moe.gates.DenseSoftmaxGate` per task;
    PLE/CGC and HoME are the same with ``expert_mask`` on each gate restricting
    it to shared + own experts. Experts may receive one input per expert
    (``(E, T, D)``, HoME's feature-gated views) or a shared ``(T, D)``.

    When the input is shared, the bank is an :class:`~mtl.moe.experts.ExpertBank`
    and every gate is a :class:`~mtl.moe.gates.DenseSoftmaxGate` on that input
    (MMoE, OMoE, PLE's first level), the experts' first layer and all gate logits come from one
    ``x @ [W_experts | W_gate_1 | ...]`` matmul, in float32. The input may then
    also be a :class:`~mtl.moe.linear_input.LinearInput`, which computes that
    product without forming ``x``.

    Args:
        experts: an :class:`~mtl.moe.experts.ExpertBank` or ``ExpertList``.
        gates: ``{name: gate}``; each gate routes over all ``E`` experts.

    Shapes:
        ``x (T, D) | (E, T, D) | LinearInput``, gate inputs ``(T, D_g)`` -> outputs ``(T, D_out)``.

    Example:
        >>> from mtl.moe import DenseSoftmaxGate, ExpertBank
        >>> mix = MultiGateMixture(
        ...     experts=ExpertBank(num_experts=4, dims=[8, 16], activation="relu", activate_last=True),
        ...     gates={t: DenseSoftmaxGate(d_model=8, num_experts=4) for t in ("click", "like")})
        >>> out = mix(torch.randn(5, 8))
        >>> out.outputs["like"].shape
        torch.Size([5, 16])
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

    def fuses(self, x: Tensor | LinearInput, gate_inputs: object = None) -> bool:
        """Whether :meth:`forward` takes the one-matmul path for this input."""
        if gate_inputs is not None or not isinstance(self.experts, ExpertBank):
            return False
        if any(
            not isinstance(g, DenseSoftmaxGate) or (g.training and g.input_jitter > 0)
            for g in self.gates.values()
        ):
            return False
        if not isinstance(x, Tensor):
            return True  # a LinearInput's products are float32 by contract
        # gate logits must be float32: no fusion into a bf16/fp16 matmul
        return (
            x.dim() == 2
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _fused_weight(self) -> Tensor:
        """``(D, N)``: the experts' first layer, then each gate's logit columns."""
        gates = [g.proj.weight.t() for g in self.gates.values()]  # type: ignore[union-attr]
        return torch.cat([self.experts.first_layer_weight(), *gates], dim=1)  # type: ignore[operator]

    def _forward_fused(self, x: Tensor | LinearInput) -> MultiGateOutput:
        bank: ExpertBank = self.experts  # type: ignore[assignment]
        if input_width(x) != bank.d_in:
            raise ValueError(f"expert input has width {input_width(x)}, experts expect {bank.d_in}")
        w_DN = self._fused_weight()
        E = bank.num_experts
        n_experts = w_DN.shape[1] - E * len(self.gates)
        gates: list[DenseSoftmaxGate] = list(self.gates.values())  # type: ignore[arg-type]
        z_TN = project(x, w_DN)
        if len(gates) > 1 and routes_together(gates):
            # the gates' columns are side by side in the product: route them in one pass
            z_expert, z_gates_TN = z_TN.split([n_experts, E * len(gates)], dim=1)
            y_ETD = bank.forward_all_projected(z_expert)
            routes, probs_TGE = route_dense_gates(gates, z_gates_TN)
            mixed = combine_dense_many(y_ETD, probs_TGE)
            return MultiGateOutput(
                outputs=dict(zip(self.gates, mixed, strict=True)),
                routing=dict(zip(self.gates, routes, strict=True)),
                expert_outputs_ETD=y_ETD,
            )
        # split, not slicing: each slice's backward would zero-fill a full-size gradient
        z_expert, *z_gates = z_TN.split([n_experts] + [E] * len(gates), dim=1)
        y_ETD = bank.forward_all_projected(z_expert)
        routing: dict[str, RoutingResult] = {}
        for (name, gate), z_TE in zip(self.gates.items(), z_gates, strict=True):
            logits_TE = z_TE.float()
            if gate.proj.bias is not None:
                logits_TE = logits_TE + gate.proj.bias.float()
            routing[name] = gate.route(logits_TE)
        return self._mix(y_ETD, routing)

    @staticmethod
    def _mix(y_ETD: Tensor, routing: dict[str, RoutingResult]) -> MultiGateOutput:
        mixed = combine_dense_many(y_ETD, [r.dense_weights() for r in routing.values()])
        return MultiGateOutput(
            outputs=dict(zip(routing, mixed, strict=True)),
            routing=routing,
            expert_outputs_ETD=y_ETD,
        )

    def forward(
        self,
        x: Tensor | LinearInput,
        gate_inputs: Tensor | Mapping[str, Tensor] | None = None,
    ) -> MultiGateOutput:
        """Mix.

        Args:
            x: ``(T, D)`` shared expert input, ``(E, T, D)`` per-expert input, or
                a :class:`~mtl.moe.linear_input.LinearInput` shared input.
            gate_inputs: one ``(T, D_g)`` tensor for all gates, a dict per gate
                name, or None to gate on ``x`` (which must then be shared).
        """
        if self.fuses(x, gate_inputs):
            return self._forward_fused(x)
        x = materialize(x)
        y_ETD = self.experts.forward_all(x)
        routing: dict[str, RoutingResult] = {}
        for name, gate in self.gates.items():
            if gate_inputs is None:
                if x.dim() != 2:
                    raise ValueError("per-expert inputs (E, T, D) need explicit gate_inputs")
                g = x
            elif isinstance(gate_inputs, Tensor):
                g = gate_inputs
            else:
                if name not in gate_inputs:
                    raise ValueError(f"gate_inputs has no entry for gate {name!r}")
                g = gate_inputs[name]
            routing[name] = gate(g)
        return self._mix(y_ETD, routing)
