"""Shared router machinery: the float32 projection that produces logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.moe.routing import RoutingResult


def check_positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_k(k: int, num_experts: int) -> int:
    check_positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}")
    return k


class Router(nn.Module):
    """Base class of all gates: a linear projection to one logit per expert.

    Routing decisions are numerically delicate (ties, softmax saturation), so
    logits are always computed in float32, whatever the input dtype.

    Args:
        d_model: width of the gate input.
        num_experts: ``E``.
        bias: learn a bias on the logits (MMoE-style gates use one).
        input_jitter: multiplicative jitter ``x * U(1 - eps, 1 + eps)`` on the
            gate input during training (Switch Transformer); 0 disables it.

    Subclasses implement :meth:`route` from float32 logits ``(T, E)``.

    Shapes:
        ``x (..., D)``, flattened to ``(T, D)`` -> :class:`RoutingResult` over ``T``
        tokens, with ``(T, E)`` float32 logits.

    Example:
        >>> class Top1Gate(Router):
        ...     def route(self, logits_TE, x_TD):
        ...         probs_TE = logits_TE.softmax(-1)
        ...         weights_TK, experts_TK = probs_TE.max(-1, keepdim=True)
        ...         return RoutingResult(weights_TK=weights_TK, experts_TK=experts_TK,
        ...                              logits_TE=logits_TE, probs_TE=probs_TE)
        >>> gate = Top1Gate(d_model=8, num_experts=4)
        >>> r = gate(torch.randn(2, 3, 8, dtype=torch.bfloat16))
        >>> r.experts_TK.shape, r.logits_TE.dtype
        (torch.Size([6, 1]), torch.float32)
    """

    def __init__(
        self, *, d_model: int, num_experts: int, bias: bool = False, input_jitter: float = 0.0
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        if not 0.0 <= input_jitter < 1.0:
            raise ValueError(f"input_jitter must be in [0, 1), got {input_jitter}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.input_jitter = input_jitter
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def logits(self, x_TD: Tensor) -> Tensor:
        """``(T, D) -> (T, E)`` float32 logits."""
        if x_TD.shape[-1] != self.d_model:
            raise ValueError(
                f"gate input has width {x_TD.shape[-1]}, gate was built with d_model={self.d_model}"
            )
        x = x_TD.float()
        if self.training and self.input_jitter > 0:
            eps = self.input_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        bias = None if self.proj.bias is None else self.proj.bias.float()
        # autocast would run the projection in bf16/fp16 whatever its inputs are
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x, self.proj.weight.float(), bias)

    def forward(self, x_TD: Tensor) -> RoutingResult:
        """Route ``(T, D)`` tokens (or ``(..., D)``, flattened)."""
        x_TD = x_TD.reshape(-1, x_TD.shape[-1])
        return self.route(self.logits(x_TD), x_TD)

    def route(self, logits_TE: Tensor, x_TD: Tensor) -> RoutingResult:
        raise NotImplementedError
