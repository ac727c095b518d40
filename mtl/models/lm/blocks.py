"""Transformer building blocks: RMSNorm, rotary positions, causal attention, SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32.

    ``y = x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        dim: feature width ``D``.
        eps: added to the mean square.

    Shapes:
        ``(..., D) -> (..., D)``, same dtype as the input.

    Example:
        >>> RMSNorm(dim=8)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, *, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate-half" layout as in LLaMA.

    Channel pairs ``(i, i + d/2)`` of every head are rotated by the angle
    ``pos * base^(-2i/d)``. Tables are built on demand for the sequence length.

    Args:
        head_dim: per-head width (even).
        base: frequency base ``theta`` (10000 in RoFormer/LLaMA).

    Shapes:
        ``q, k (B, A, T, U) -> (B, A, T, U)`` (``A`` heads of width ``U``).

    Example:
        >>> rope = RotaryEmbedding(head_dim=8)
        >>> q = torch.randn(1, 2, 5, 8)
        >>> rope(q, q)[0].shape
        torch.Size([1, 2, 5, 8])
    """

    def __init__(self, *, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.base = base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of shape ``(T, U)`` (float32)."""
        pos_T = torch.arange(seq_len, device=device, dtype=torch.float32)
        half = torch.outer(pos_T, self.inv_freq.to(device))  # (T, U / 2)
        ang_TU = torch.cat([half, half], dim=-1)
        return ang_TU.cos(), ang_TU.sin()

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, q_BATU: Tensor, k_BATU: Tensor) -> tuple[Tensor, Tensor]:
        cos_TU, sin_TU = self.tables(q_BATU.shape[-2], q_BATU.device)

        def rot(x: Tensor) -> Tensor:
            x32 = x.float()
            return (x32 * cos_TU + self._rotate_half(x32) * sin_TU).to(x.dtype)

        return rot(q_BATU), rot(k_BATU)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and optional grouped KV heads.

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` with
    ``is_causal=True`` (flash / memory-efficient kernels where available).

    Args:
        d_model: model width ``D``.
        n_heads: query heads ``A`` (``D % A == 0``).
        n_kv_heads: key/value heads ``J`` (grouped-query attention); None = ``A``.
        rope_base: rotary frequency base.
        dropout: attention dropout (training only).
        qkv_bias: learn biases on the query/key/value projections (Qwen2).
        qk_norm: RMSNorm over the whole query and key projections before the
            rotation (OLMoE), with epsilon ``norm_eps``.
        norm_eps: epsilon of the query/key norms.

    Shapes:
        ``(B, T, D) -> (B, T, D)``.

    Example:
        >>> attn = CausalSelfAttention(d_model=16, n_heads=4)
        >>> attn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(head_dim=self.head_dim, base=rope_base)
        self.q_norm = RMSNorm(dim=n_heads * self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(dim=n_kv_heads * self.head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, _ = x_BTD.shape
        A, J, U = self.n_heads, self.n_kv_heads, self.head_dim
        q_BTO, k_BTO = self.q_proj(x_BTD), self.k_proj(x_BTD)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTO, k_BTO = self.q_norm(q_BTO), self.k_norm(k_BTO)
        q_BATU = q_BTO.view(B, T, A, U).transpose(1, 2)
        k_BJTU = k_BTO.view(B, T, J, U).transpose(1, 2)
        v_BJTU = self.v_proj(x_BTD).view(B, T, J, U).transpose(1, 2)
        q_BATU, k_BJTU = self.rope(q_BATU, k_BJTU)
        # grouped-query attention: each key/value head serves A / J consecutive query heads
        k_BATU = k_BJTU.repeat_interleave(A // J, dim=1) if J != A else k_BJTU
        v_BATU = v_BJTU.repeat_interleave(A // J, dim=1) if J != A else v_BJTU
        y_BATU = F.scaled_dot_product_attention(
            q_BATU,
            k_BATU,
            v_BATU,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y_BATU.transpose(1, 2).reshape(B, T, A * U))


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward network (Shazeer 2020), as in LLaMA.

    ``y = W_down (silu(W_gate x) * (W_up x))``; weight names follow HF LLaMA
    (``gate_proj``, ``up_proj``, ``down_proj``), stored ``(out, in)`` as in
    :class:`torch.nn.Linear`.

    Args:
        d_model: input and output width ``D``.
        d_hidden: hidden width ``H``.

    Shapes:
        ``(..., D) -> (..., D)``.

    Example:
        >>> SwiGLU(d_model=8, d_hidden=32)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, *, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
