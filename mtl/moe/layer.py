"""The MoE layer: a gate, an expert bank and a dispatch, plus optional shared experts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtl.moe.dispatch import DispatchResult
from mtl.moe.losses import aux_losses, check_aux_loss_weights
from mtl.moe.routing import RoutingResult, RoutingStats, routing_stats
from mtl.moe.shared_expert import shared_output


@dataclass
class MoEOutput:
    """Result of :class:`MoELayer`.

    Attributes:
        output: ``(..., D_out)``, same leading shape as the input.
        aux_loss: float32 scalar, the weighted sum of ``aux_losses`` (0 if none).
        aux_losses: weighted auxiliary losses by name (already multiplied by weight).
        stats: routing statistics of this call (detached).
        routing: the gate's decision.

    Example:
        >>> from mtl.moe import DenseDispatch, DenseSoftmaxGate, SwiGLUExperts
        >>> layer = MoELayer(
        ...     gate=DenseSoftmaxGate(d_model=4, num_experts=2),
        ...     experts=SwiGLUExperts(num_experts=2, d_model=4, d_hidden=8),
        ...     dispatch=DenseDispatch())
        >>> out = layer(torch.randn(2, 3, 4))
        >>> out.output.shape, out.aux_loss.item(), out.aux_losses
        (torch.Size([2, 3, 4]), 0.0, {})
        >>> out.stats.tokens_per_expert_E.tolist(), out.routing.experts_TK.shape  # dense: K = E
        ([6.0, 6.0], torch.Size([6, 2]))
    """

    output: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: RoutingStats | None = None
    routing: RoutingResult | None = None


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer assembled from its parts.

    ``y = output_scale * sum_j w_j(x) E_{e_j}(x) + shared(x)``. The gate decides
    (:mod:`mtl.moe.gates`), the dispatch moves tokens (:mod:`mtl.moe.dispatch`),
    the experts compute (:mod:`mtl.moe.experts`). DeepSeekMoE's fine-grained and
    shared experts are configuration: more, narrower experts and a larger ``k``;
    ``shared`` is an always-on expert bank whose experts' outputs are summed.

    Args:
        gate: a :class:`~mtl.moe.gates.Router`.
        experts: :class:`~mtl.moe.experts.SwiGLUExperts`, ``ExpertBank`` or ``ExpertList``.
        dispatch: a dense, dropless or capacity dispatch module.
        shared: always-active experts (a stacked bank: outputs summed) or any
            module mapping ``(T, D) -> (T, D_out)`` (e.g. Qwen2-MoE's
            :class:`~mtl.moe.SigmoidGatedSharedExpert`); None for none.
        aux_loss_weights: ``{name: weight}`` with names from
            :data:`mtl.moe.losses.AUX_LOSSES` (load_balance, z_loss, importance,
            load_cv, entropy).
        output_scale: multiplies the routed output (LLaMA-MoE's ``E / k``
            rescaling of split experts).

    Shapes:
        ``x (..., D) -> MoEOutput.output (..., D_out)``.

    Example:
        >>> from mtl.moe import DroplessDispatch, SwiGLUExperts, TopKGate
        >>> layer = MoELayer(
        ...     gate=TopKGate(d_model=16, num_experts=8, k=2),
        ...     experts=SwiGLUExperts(num_experts=8, d_model=16, d_hidden=32),
        ...     dispatch=DroplessDispatch(),
        ...     aux_loss_weights={"load_balance": 0.01, "z_loss": 1e-3})
        >>> out = layer(torch.randn(2, 5, 16))
        >>> out.output.shape, sorted(out.aux_losses)
        (torch.Size([2, 5, 16]), ['load_balance', 'z_loss'])
    """

    def __init__(
        self,
        *,
        gate: nn.Module,
        experts: nn.Module,
        dispatch: nn.Module,
        shared: nn.Module | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        gate_E = getattr(gate, "num_experts", None)
        if gate_E is not None and gate_E != experts.num_experts:
            raise ValueError(
                f"gate routes to num_experts={gate_E} but the expert bank has {experts.num_experts}"
            )
        self.gate = gate
        self.experts = experts
        self.dispatch = dispatch
        self.shared = shared
        self.aux_loss_weights = check_aux_loss_weights(aux_loss_weights or {})
        self.output_scale = output_scale

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, gate_input: Tensor | None = None) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: ``(..., D)`` expert input.
            gate_input: ``(..., D_g)`` gate input with the same leading shape;
                defaults to ``x``.
        """
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, x.shape[-1])
        g_TD = x_TD if gate_input is None else gate_input.reshape(-1, gate_input.shape[-1])
        if g_TD.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"gate_input has {g_TD.shape[0]} tokens but x has {x_TD.shape[0]} (shapes must share leading dims)"
            )
        routing: RoutingResult = self.gate(g_TD)
        res: DispatchResult = self.dispatch(x_TD, routing, self.experts)
        out_TD = res.output_TD
        if self.output_scale != 1.0:
            out_TD = out_TD * self.output_scale
        if self.shared is not None:
            out_TD = out_TD + shared_output(self.shared, x_TD)
        losses = aux_losses(routing, self.aux_loss_weights)
        total = (
            torch.stack(list(losses.values())).sum()
            if losses
            else x.new_zeros((), dtype=torch.float32)
        )
        return MoEOutput(
            output=out_TD.reshape(*lead, out_TD.shape[-1]),
            aux_loss=total,
            aux_losses=losses,
            stats=routing_stats(routing, res.kept_TK),
            routing=routing,
        )
