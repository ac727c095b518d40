"""Dense softmax gate: every expert weighted (MMoE, PLE, HoME)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.moe.gates.base import Router
from mtl.moe.routing import RoutingResult


class DenseSoftmaxGate(Router):
    """Softmax over all (allowed) experts; the classic multi-gate MoE gate.

    The gate input may differ from the experts' input (task embeddings,
    feature subsets, the lower level's output in PLE/HoME): pass it as the
    ``gate_input`` of the layer. An ``expert_mask`` restricts the gate to a
    subset of a shared expert bank, which is how PLE/CGC and HoME's hierarchy
    masks are expressed: masked experts get weight exactly 0, hence no gradient
    from this gate.

    Args:
        d_model: gate input width.
        num_experts: ``E``.
        expert_mask: ``E`` booleans (or indices of allowed experts); None = all.
        temperature: softmax temperature (> 0).
        bias: learn a logit bias (default on, as in MMoE).
        input_jitter: multiplicative input jitter in training (see :class:`Router`).
        logit_norm: batch-normalise the logits before the softmax (torch-rechub's
            MMoE gate is ``Linear -> BatchNorm -> Softmax``); the routing
            result's ``logits_TE`` (and a z-loss on them) are then the normalised ones.

    Shapes:
        ``(T, d_model) ->`` RoutingResult with ``K = E``.

    Example:
        >>> gate = DenseSoftmaxGate(d_model=8, num_experts=3, expert_mask=[True, False, True])
        >>> gate(torch.randn(4, 8)).dense_weights()[:, 1].abs().sum().item()
        0.0
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        expert_mask: Sequence[bool] | Sequence[int] | Tensor | None = None,
        temperature: float = 1.0,
        bias: bool = True,
        input_jitter: float = 0.0,
        logit_norm: bool = False,
    ) -> None:
        super().__init__(
            d_model=d_model, num_experts=num_experts, bias=bias, input_jitter=input_jitter
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.register_buffer("expert_mask_E", _as_mask(expert_mask, num_experts), persistent=False)
        self._all_allowed = bool(self.expert_mask_E.all())
        self.logit_norm = nn.BatchNorm1d(num_experts) if logit_norm else None

    def route(self, logits_TE: Tensor, x_TD: Tensor | None = None) -> RoutingResult:
        """Softmax over the allowed experts of float32 ``(T, E)`` logits (``x_TD`` is unused)."""
        if self.logit_norm is not None:
            with torch.autocast(device_type=logits_TE.device.type, enabled=False):
                logits_TE = self.logit_norm(logits_TE.float())
        masked_TE = (
            logits_TE
            if self._all_allowed
            else logits_TE.masked_fill(~self.expert_mask_E, float("-inf"))
        )
        probs_TE = torch.softmax(masked_TE.float() / self.temperature, dim=-1)
        T, E = probs_TE.shape
        experts_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
        return RoutingResult(
            weights_TK=probs_TE,
            experts_TK=experts_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_TK=self.expert_mask_E.expand(T, E),
            dense_TE=probs_TE,  # masked experts have probability exactly 0
        )


def _as_mask(mask: Sequence[bool] | Sequence[int] | Tensor | None, num_experts: int) -> Tensor:
    if mask is None:
        return torch.ones(num_experts, dtype=torch.bool)
    t = torch.as_tensor(list(mask) if not isinstance(mask, Tensor) else mask)
    if t.dtype == torch.bool:
        if t.shape != (num_experts,):
            raise ValueError(f"expert_mask must have {num_experts} entries, got {tuple(t.shape)}")
        out = t.clone()
    else:
        idx = t.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_experts):
            raise ValueError(
                f"expert_mask indices must lie in [0, {num_experts}), got {idx.tolist()}"
            )
        out = torch.zeros(num_experts, dtype=torch.bool)
        out[idx] = True
    if not out.any():
        raise ValueError("expert_mask must allow at least one expert")
    return out
