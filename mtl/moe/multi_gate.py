"""Several gates over one expert bank: the multi-gate mixture of MMoE, PLE and HoME."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from mtl.moe.dispatch import combine_dense
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

    def forward(
        self, x: Tensor, gate_inputs: Tensor | Mapping[str, Tensor] | None = None
    ) -> MultiGateOutput:
        """Mix.

        Args:
            x: ``(T, D)`` shared expert input or ``(E, T, D)`` per-expert input.
            gate_inputs: one ``(T, D_g)`` tensor for all gates, a dict per gate
                name, or None to gate on ``x`` (which must then be ``(T, D)``).
        """
        y_ETD = self.experts.forward_all(x)
        outputs: dict[str, Tensor] = {}
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
            r = gate(g)
            routing[name] = r
            outputs[name] = combine_dense(y_ETD, r.dense_weights())
        return MultiGateOutput(outputs=outputs, routing=routing, expert_outputs_ETD=y_ETD)
