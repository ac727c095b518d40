"""YaRN context extension of rotary positions (Peng et al. 2023), as DeepSeek-V3 uses it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtl.models.lm.blocks import RotaryEmbedding


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 mscale ln(factor) + 1`` (1 for ``factor <= 1``).

    Example:
        >>> round(yarn_mscale(40.0), 4)
        1.3689
    """
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnScaling:
    """YaRN's "NTK-by-parts" frequencies and attention temperature.

    Frequencies that rotate fewer than ``beta_slow`` times over the original
    context are interpolated (divided by ``factor``), those that rotate more than
    ``beta_fast`` times are kept, with a linear ramp between; cos/sin are scaled
    by ``attention_factor`` (default ``mscale(factor, mscale) / mscale(factor,
    mscale_all_dim)``). Latent attention also multiplies its softmax scale by
    ``mscale(factor, mscale_all_dim)^2`` (:meth:`softmax_scale_multiplier`).

    Args:
        factor: context extension factor.
        original_max_position_embeddings: the context the model was trained with.
        beta_fast: rotations above which a frequency is kept.
        beta_slow: rotations below which a frequency is interpolated.
        mscale: numerator of the default ``attention_factor``.
        mscale_all_dim: denominator of it, and latent attention's temperature.
        attention_factor: overrides the default cos/sin factor.
        truncate: round the ramp's ends to whole dimensions.

    Example:
        >>> y = YarnScaling(factor=4.0, original_max_position_embeddings=16)
        >>> f = y.inv_freq(head_dim=8, base=10000.0)
        >>> f.shape, bool(f[0] == 1.0), bool(f[-1] < 10000.0 ** (-6 / 8))
        (torch.Size([4]), True, True)
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_config(cls, params: Mapping[str, Any], *, max_position_embeddings: int) -> YarnScaling:
        """From a transformers ``rope_parameters`` (or ``rope_scaling``) dict of type yarn."""
        original = params.get("original_max_position_embeddings") or max_position_embeddings
        factor = params.get("factor") or max_position_embeddings / original
        return cls(
            factor=float(factor),
            original_max_position_embeddings=int(original),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )

    def to_config(self, base: float) -> dict[str, Any]:
        """The transformers ``rope_parameters`` dict (unset options left out)."""
        params = {
            "rope_type": "yarn",
            "rope_theta": base,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "attention_factor": self.attention_factor,
            "truncate": self.truncate,
        }
        return {k: v for k, v in params.items() if v is not None}

    def cos_sin_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_mscale(self.factor)

    def softmax_scale_multiplier(self) -> float:
        """Factor on latent attention's ``1 / sqrt(d)`` (1 without ``mscale_all_dim``)."""
        if not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def inv_freq(self, *, head_dim: int, base: float) -> Tensor:
        """``(head_dim / 2,)`` float32 inverse frequencies."""

        def correction_dim(rotations: float) -> float:
            ctx = self.original_max_position_embeddings
            return head_dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # a ramp of zero width
        pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
        return (1.0 / (self.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


class YarnRotaryEmbedding(RotaryEmbedding):
    """:class:`~mtl.models.lm.RotaryEmbedding` with YaRN's frequencies and cos/sin factor.

    Args:
        head_dim: rotated channels per head.
        base: frequency base.
        scaling: the YaRN parameters.

    Example:
        >>> rope = YarnRotaryEmbedding(head_dim=8, base=10000.0,
        ...     scaling=YarnScaling(factor=4.0, original_max_position_embeddings=16))
        >>> q = torch.randn(1, 2, 5, 8)
        >>> rope(q, q)[0].shape
        torch.Size([1, 2, 5, 8])
    """

    def __init__(self, *, head_dim: int, base: float, scaling: YarnScaling) -> None:
        super().__init__(head_dim=head_dim, base=base)
        self.scaling = scaling
        self.inv_freq = scaling.inv_freq(head_dim=head_dim, base=base)
        self.cos_sin_factor = scaling.cos_sin_factor()

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cos_TU, sin_TU = super().tables(seq_len, device)
        return cos_TU * self.cos_sin_factor, sin_TU * self.cos_sin_factor
