"""Multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.lm.blocks import RMSNorm, RotaryEmbedding
from mtl.models.lm.rope_scaling import YarnRotaryEmbedding, YarnScaling


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention (MLA, DeepSeek-V2 section 2.1).

    Queries: ``q = W_qb norm(W_qa x)`` (or ``W_q x`` without a query rank), split
    per head into a position-free part (``qk_nope_head_dim``) and a rotary part
    (``qk_rope_head_dim``). Keys and values come from one compressed latent
    ``c = norm(W_kva x)`` of width ``kv_lora_rank``: ``[k_nope, v] = W_kvb c``
    per head, plus one rotary key part shared by all heads, projected from ``x``
    alongside ``c``. Scores use ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``
    (times YaRN's temperature with ``rope_scaling``).
    Parameter names follow transformers' ``DeepseekV3Attention``.

    ``rope_interleave``: the checkpoint's rotary channels are pairs ``(2i, 2i+1)``
    (DeepSeek's layout); they are de-interleaved to ``(i, i + d/2)`` before the
    usual rotate-half rotation, which is the same rotation in a permuted basis
    applied to both queries and keys, so their dot products are unchanged.

    Args:
        d_model: model width ``D``.
        n_heads: heads ``A``.
        kv_lora_rank: width ``Y`` of the key/value latent.
        qk_nope_head_dim: per-head query/key channels without positions.
        qk_rope_head_dim: per-head query/key channels with rotary positions.
        v_head_dim: per-head value width.
        q_lora_rank: width of the query latent; None projects queries directly.
        rope_base: rotary frequency base.
        rope_interleave: rotary channels interleaved in the weights (see above).
        bias: biases on the down-projections and the output (``attention_bias``).
        norm_eps: epsilon of the latent RMSNorms.
        dropout: attention dropout (training only).
        rope_scaling: YaRN context extension (DeepSeek-V3's released models);
            also multiplies the softmax scale by its ``mscale_all_dim`` term.

    Shapes:
        ``(B, T, D) -> (B, T, D)``.

    Example:
        >>> mla = MultiHeadLatentAttention(d_model=16, n_heads=2, kv_lora_rank=8,
        ...     qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=8)
        >>> mla(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        rope_base: float = 10000.0,
        rope_interleave: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        rope_scaling: YarnScaling | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.q_lora_rank = q_lora_rank
        self.rope_interleave = rope_interleave
        self.dropout = dropout
        q_out = n_heads * self.qk_head_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(dim=q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(dim=kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)
        self.rope_scaling = rope_scaling
        self.rope: RotaryEmbedding
        self.softmax_scale = self.qk_head_dim**-0.5
        if rope_scaling is None:
            self.rope = RotaryEmbedding(head_dim=qk_rope_head_dim, base=rope_base)
        else:
            self.rope = YarnRotaryEmbedding(
                head_dim=qk_rope_head_dim, base=rope_base, scaling=rope_scaling
            )
            self.softmax_scale *= rope_scaling.softmax_scale_multiplier()

    def _queries(self, x_BTD: Tensor) -> Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_BTD)
        assert self.q_a_proj is not None and self.q_a_layernorm is not None
        assert self.q_b_proj is not None
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))

    def _deinterleave(self, x: Tensor) -> Tensor:
        if not self.rope_interleave:
            return x
        return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)

    def forward(self, x_BTD: Tensor) -> Tensor:
        # U is one head's width, whichever part: query/key (nope + rope), value or rotary
        B, T, _ = x_BTD.shape
        A, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_BATU = self._queries(x_BTD).view(B, T, A, self.qk_head_dim).transpose(1, 2)
        q_nope_BATU, q_rot_BATU = q_BATU.split([nope, rope], dim=-1)
        latent_BTY, k_rot_BTU = self.kv_a_proj_with_mqa(x_BTD).split(
            [self.kv_lora_rank, rope], dim=-1
        )
        kv_BATU = (
            self.kv_b_proj(self.kv_a_layernorm(latent_BTY))
            .view(B, T, A, nope + self.v_head_dim)
            .transpose(1, 2)
        )
        k_nope_BATU, v_BATU = kv_BATU.split([nope, self.v_head_dim], dim=-1)
        k_rot_B1TU = k_rot_BTU.unsqueeze(1)  # one rotary key shared by every head
        q_rot_BATU, k_rot_B1TU = self.rope(
            self._deinterleave(q_rot_BATU), self._deinterleave(k_rot_B1TU)
        )
        q_BATU = torch.cat([q_nope_BATU, q_rot_BATU], dim=-1)
        k_BATU = torch.cat([k_nope_BATU, k_rot_B1TU.expand(B, A, T, rope)], dim=-1)
        y_BATU = F.scaled_dot_product_attention(
            q_BATU,
            k_BATU,
            v_BATU,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )
        return self.o_proj(y_BATU.transpose(1, 2).reshape(B, T, A * self.v_head_dim))
