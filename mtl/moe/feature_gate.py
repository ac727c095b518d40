"""Per-expert low-rank feature gates: each expert sees its own element-wise reweighting of the input."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FeatureGate(nn.Module):
    """HoME feature gate: ``x_e' = x_e * 2 * sigmoid(x_e B_e A_e)`` for every expert ``e``.

    ``B_e`` (``D x r``) and ``A_e`` (``r x D``) are a LoRA-style low-rank
    factorisation, so each expert's gate costs ``2 D r`` parameters instead of
    ``D^2``. The factor 2 makes the gate 1 where the logit is 0, so on average
    the input keeps its scale. All experts are computed in two batched einsums
    and the result ``(E, T, D)`` is fed to
    :meth:`~mtl.moe.experts.ExpertBank.forward_all` as per-expert input.

    Initialisation: ``B`` has fan-in scale (``x B`` has about the variance of
    ``x``) and ``A`` is scaled by ``init_scale / sqrt(r)``, so the gate logits
    start with standard deviation about ``init_scale`` and the gates near 1
    (about ``1 +- init_scale / 2``): the expert first sees almost its plain
    input. Unlike LoRA's zero-initialised ``A``, both factors get gradient from
    the first step and the gate is not an exact no-op at init.

    Args:
        num_experts: ``E``.
        d_model: ``D``, width of the (per-expert) input.
        rank: ``r``, rank of the factorisation.
        init_scale: approximate standard deviation of the initial gate logits.

    Shapes:
        ``(T, D)`` shared or ``(E, T, D)`` per-expert input -> ``(E, T, D)``.

    Example:
        >>> fg = FeatureGate(num_experts=3, d_model=16, rank=4)
        >>> fg(torch.randn(10, 16)).shape
        torch.Size([3, 10, 16])
    """

    def __init__(
        self, *, num_experts: int, d_model: int, rank: int, init_scale: float = 0.1
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not init_scale >= 0:
            raise ValueError(f"init_scale must be >= 0, got {init_scale}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.rank = rank
        self.init_scale = float(init_scale)
        self.down_EDR = nn.Parameter(torch.empty(num_experts, d_model, rank))
        self.up_ERD = nn.Parameter(torch.empty(num_experts, rank, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down_EDR, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.up_ERD, std=self.init_scale / math.sqrt(self.rank))

    def gates(self, x: Tensor) -> Tensor:
        """Gate values ``2 * sigmoid(x B_e A_e)``, ``(E, T, D)``, each in ``(0, 2)``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"feature gate input has width {x.shape[-1]}, expected {self.d_model}")
        if x.dim() == 2:
            z_ETR = torch.einsum("td,edr->etr", x, self.down_EDR)
        elif x.dim() == 3 and x.shape[0] == self.num_experts:
            z_ETR = torch.einsum("etd,edr->etr", x, self.down_EDR)
        else:
            raise ValueError(
                f"feature gate expects (T, D) or ({self.num_experts}, T, D), got {tuple(x.shape)}"
            )
        return 2.0 * torch.sigmoid(torch.einsum("etr,erd->etd", z_ETR, self.up_ERD))

    def forward(self, x: Tensor) -> Tensor:
        """Gated per-expert input ``(E, T, D)``."""
        return x * self.gates(x)  # (T, D) broadcasts against (E, T, D)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, rank={self.rank}"
