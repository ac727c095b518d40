"""Always-on shared experts: their output, and the sigmoid-gated shared expert of Qwen2-MoE."""

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
        return torch.sigmoid(self.gate(x_TD)) * shared_output(self.expert, x_TD)


def shared_output(shared: nn.Module, x_TD: Tensor) -> Tensor:
    """The output of an always-on expert part: a stacked bank's experts summed, else ``shared(x_TD)``.

    Args:
        shared: a stacked bank (:class:`~mtl.moe.experts.GroupedExperts`) or any
            module ``(T, D) -> (T, D_out)``.
        x_TD: ``(T, D)`` input.

    Example:
        >>> from mtl.moe import SwiGLUExperts
        >>> bank = SwiGLUExperts(num_experts=2, d_model=4, d_hidden=8)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(shared_output(bank, x), bank.forward_all(x)[0] + bank.forward_all(x)[1])
        True
    """
    if isinstance(shared, GroupedExperts):
        return shared.forward_all(x_TD).sum(0)
    return shared(x_TD)
