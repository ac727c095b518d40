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
        ``q, k (B, H, T, d) -> (B, H, T, d)``.

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
        """``cos, sin`` of shape ``(T, d)`` (float32)."""
        pos_T = torch.arange(seq_len, device=device, dtype=torch.float32)
        ang_Td2 = torch.outer(pos_T, self.inv_freq.to(device))
        ang_Td = torch.cat([ang_Td2, ang_Td2], dim=-1)
        return ang_Td.cos(), ang_Td.sin()

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, q_BHTd: Tensor, k_BHTd: Tensor) -> tuple[Tensor, Tensor]:
        cos_Td, sin_Td = self.tables(q_BHTd.shape[-2], q_BHTd.device)

        def rot(x: Tensor) -> Tensor:
            x32 = x.float()
            return (x32 * cos_Td + self._rotate_half(x32) * sin_Td).to(x.dtype)

        return rot(q_BHTd), rot(k_BHTd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and optional grouped KV heads.

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` with
    ``is_causal=True`` (flash / memory-efficient kernels where available).

    Args:
        d_model: model width ``D``.
        n_heads: query heads ``H`` (``D % H == 0``).
        n_kv_heads: key/value heads (grouped-query attention); None = ``H``.
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
        d = self.head_dim
        q_BTO, k_BTO = self.q_proj(x_BTD), self.k_proj(x_BTD)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTO, k_BTO = self.q_norm(q_BTO), self.k_norm(k_BTO)
        q_BHTd = q_BTO.view(B, T, self.n_heads, d).transpose(1, 2)
        k_BGTd = k_BTO.view(B, T, self.n_kv_heads, d).transpose(1, 2)
        v_BGTd = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, d).transpose(1, 2)
        q_BHTd, k_BGTd = self.rope(q_BHTd, k_BGTd)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k_BGTd = k_BGTd.repeat_interleave(rep, dim=1)
            v_BGTd = v_BGTd.repeat_interleave(rep, dim=1)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd,
            k_BGTd,
            v_BGTd,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * d))


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
