"""Low-rank adapters (LoRA, Hu et al. 2021) on the stacked weights of a SwiGLU expert bank.

Every expert ``e`` of every projection ``W_e`` (``w_gate``, ``w_up``: ``(D, H)``;
``w_down``: ``(H, D)``) gets its own adapter ``A_e (D, r)``, ``B_e (r, H)``;
the adapted product of a row ``x`` routed to ``e`` is

    ``x W_e + (alpha / r) (x A_e) B_e``.

The adapters are stacked like the weights, ``A (E, D, r)`` and ``B (E, r, H)``,
and multiplied through the same two seams as the weights
(:meth:`~mtl.moe.experts.GroupedExperts._grouped_mm` on expert-sorted rows,
:meth:`~mtl.moe.experts.GroupedExperts._batched_mm` on dense inputs): two more
grouped (or batched) matmuls of width ``r`` per projection, no loop over experts
and no ``(E, D, H)`` update materialised in the forward pass. The SwiGLU
computation itself stays :class:`~mtl.moe.SwiGLUExperts`'s.

``B`` starts at zero, so an adapted bank computes exactly what its base did;
:meth:`LoRASwiGLUExperts.merged` folds ``(alpha / r) A_e B_e`` into ``W_e``
(one batched ``(E, D, r) @ (E, r, H)`` product).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtl.moe.experts import SwiGLUExperts

PROJECTIONS: tuple[str, ...] = ("gate", "up", "down")
"""The adapted projections of a bank: ``w_gate``, ``w_up``, ``w_down``."""


class LoRASwiGLUExperts(SwiGLUExperts):
    """A :class:`~mtl.moe.SwiGLUExperts` bank with one rank-``r`` adapter per expert and projection.

    Build it around a trained bank with :meth:`from_bank`: the base weights are
    the bank's own parameters (same names, so a base state dict loads into it),
    the adapters are new parameters ``lora_A_<proj>``, ``lora_B_<proj>``.

    Args:
        num_experts: ``E``.
        d_model: ``D``.
        d_hidden: ``H``.
        rank: adapter rank ``r`` (``Y`` in shape suffixes).
        alpha: adapter scale numerator; the update is ``(alpha / r) A B``.
        hidden_sizes: as :class:`~mtl.moe.SwiGLUExperts`.

    Attributes:
        lora_A_gate, lora_A_up: ``(E, D, r)``; ``lora_A_down``: ``(E, H, r)``.
        lora_B_gate, lora_B_up: ``(E, r, H)``; ``lora_B_down``: ``(E, r, D)``.
        scaling: ``alpha / r``.

    Shapes:
        as :class:`~mtl.moe.SwiGLUExperts`.

    Example:
        >>> bank = SwiGLUExperts(num_experts=4, d_model=16, d_hidden=32)
        >>> lora = LoRASwiGLUExperts.from_bank(bank, rank=2, alpha=4.0)
        >>> x = torch.randn(10, 16)
        >>> torch.equal(lora.forward_all(x), bank.forward_all(x))  # B starts at zero
        True
        >>> lora.lora_A_gate.shape, lora.lora_B_down.shape
        (torch.Size([4, 16, 2]), torch.Size([4, 2, 16]))
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        rank: int,
        alpha: float,
        hidden_sizes: list[int] | None = None,
    ) -> None:
        super().__init__(
            num_experts=num_experts, d_model=d_model, d_hidden=d_hidden, hidden_sizes=hidden_sizes
        )
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        E, D, H, r = num_experts, d_model, d_hidden, self.rank
        self.lora_A_gate = nn.Parameter(torch.empty(E, D, r))
        self.lora_B_gate = nn.Parameter(torch.zeros(E, r, H))
        self.lora_A_up = nn.Parameter(torch.empty(E, D, r))
        self.lora_B_up = nn.Parameter(torch.zeros(E, r, H))
        self.lora_A_down = nn.Parameter(torch.empty(E, H, r))
        self.lora_B_down = nn.Parameter(torch.zeros(E, r, D))
        self.reset_adapters()

    @classmethod
    def from_bank(cls, bank: SwiGLUExperts, *, rank: int, alpha: float) -> LoRASwiGLUExperts:
        """Adapters around ``bank``: its weight parameters are shared, not copied."""
        if type(bank) is not SwiGLUExperts:
            raise TypeError(f"LoRA adapters wrap a plain SwiGLUExperts, got {type(bank).__name__}")
        lora = cls(
            num_experts=bank.num_experts,
            d_model=bank.d_model,
            d_hidden=bank.d_hidden,
            rank=rank,
            alpha=alpha,
        )
        lora.to(device=bank.w_gate.device, dtype=bank.w_gate.dtype)
        lora.w_gate, lora.w_up, lora.w_down = bank.w_gate, bank.w_up, bank.w_down
        lora.hidden_mask_EH = bank.hidden_mask_EH
        return lora

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """``A`` as nn.Linear draws its weight (per expert), ``B = 0``: the update starts at zero."""
        for name in PROJECTIONS:
            a = getattr(self, f"lora_A_{name}")
            bound = 1.0 / math.sqrt(a.shape[1])
            nn.init.uniform_(a, -bound, bound)
            nn.init.zeros_(getattr(self, f"lora_B_{name}"))

    def _adapter(self, w_EDH: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of the projection whose stacked weight is ``w_EDH``."""
        for name in PROJECTIONS:
            if w_EDH is getattr(self, f"w_{name}"):
                return getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
        raise ValueError("weight is not one of this bank's projections")

    def _batched_mm(self, x: Tensor, w_EDH: Tensor) -> Tensor:
        a_EDY, b_EYH = self._adapter(w_EDH)
        # (T, D) @ (E, D, Y) broadcasts to (E, T, Y); then (E, T, Y) @ (E, Y, H) is a bmm
        low_ETH = super()._batched_mm(super()._batched_mm(x, a_EDY), b_EYH)
        return super()._batched_mm(x, w_EDH) + self.scaling * low_ETH

    def _grouped_mm(self, x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
        a_EDY, b_EYH = self._adapter(w_EDH)
        low_NH = super()._grouped_mm(super()._grouped_mm(x_ND, a_EDY, counts_E), b_EYH, counts_E)
        return super()._grouped_mm(x_ND, w_EDH, counts_E) + self.scaling * low_NH

    def delta_weight(self, name: str) -> Tensor:
        """``(alpha / r) A_e B_e`` for every expert of projection ``name``: ``(E, D, H)``."""
        if name not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {name!r}")
        a_EDY, b_EYH = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
        return self.scaling * torch.bmm(a_EDY, b_EYH)

    @torch.no_grad()
    def merged(self) -> SwiGLUExperts:
        """Fold the adapters into the weights; returns a plain bank holding the merged weights.

        The base parameters are updated in place (they are shared with the
        returned bank), so call it once and use the result.
        """
        plain = SwiGLUExperts(
            num_experts=self.num_experts, d_model=self.d_model, d_hidden=self.d_hidden
        )
        for name in PROJECTIONS:
            w = getattr(self, f"w_{name}")
            w.add_(self.delta_weight(name).to(w.dtype))
            setattr(plain, f"w_{name}", w)
        plain.hidden_mask_EH = self.hidden_mask_EH
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"
