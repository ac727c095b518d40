"""An always-on shared expert whose output a learned sigmoid gate scales per token (Qwen2-MoE)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl.moe.experts import GroupedExperts


class SigmoidGatedSharedExpert(nn.Module):
    """``y = sigmoid(x W_sg) * expert(x)``: a shared expert with a scalar gate per token.

    Qwen2-MoE adds this to the routed output of every MoE layer; it plugs into
    :class:`~mtl.moe.MoELayer` as ``shared=`` (the layer adds ``shared(x)`` to
    the routed output). DeepSeekMoE's shared experts are the ungated case (pass
    the bank itself as ``shared``).

    Args:
        d_model: width ``D`` of the input and output.
        expert: the shared expert, a module ``(T, D) -> (T, D)`` (e.g.
            :class:`~mtl.models.lm.SwiGLU`) or a stacked bank whose experts'
            outputs are summed (e.g. ``SwiGLUExperts(num_experts=1, ...)``); or a
            factory of one, called with ``d_model=`` (a ``_partial_`` config node).

    Shapes:
        ``(T, D) -> (T, D)``.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> shared = SigmoidGatedSharedExpert(
        ...     d_model=8, expert=SwiGLUExperts(num_experts=1, d_model=8, d_hidden=16))
        >>> x = torch.randn(5, 8)
        >>> with torch.no_grad():
        ...     _ = shared.gate.weight.zero_()  # sigmoid(0) = 1/2 for every token
        >>> torch.allclose(shared(x), 0.5 * shared.expert.forward_all(x).sum(0))
        True
    """

    def __init__(self, *, d_model: int, expert: nn.Module | Callable[..., nn.Module]) -> None:
        super().__init__()
        self.expert = expert if isinstance(expert, nn.Module) else expert(d_model=d_model)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x_TD: Tensor) -> Tensor:
        if isinstance(self.expert, GroupedExperts):
            y_TD = self.expert.forward_all(x_TD).sum(0)
        else:
            y_TD = self.expert(x_TD)
        return torch.sigmoid(self.gate(x_TD)) * y_TD
