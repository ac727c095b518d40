"""Autoregressive sampling from a :class:`~mtl.models.lm.TransformerLM`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.moe.mixture_of_tokens import token_group_size


@torch.no_grad()
def sample_next(
    logits_BV: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from ``(B, V)`` logits.

    Args:
        logits_BV: next-token logits.
        temperature: ``> 0`` divides the logits; ``0`` means greedy (argmax).
        top_k: keep only the ``top_k`` most likely tokens (None = all).
        generator: random generator for reproducible samples.

    Returns:
        ``(B, 1)`` int64 token ids.

    Example:
        >>> sample_next(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0).tolist()
        [[1]]
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx_BT: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend ``idx_BT`` by ``max_new_tokens`` sampled tokens.

    The context is cropped to the model's ``max_seq_len`` (no KV cache: the
    models here are small, and recomputation keeps MoE routing exactly as in
    training). The model is put in eval mode for the call and restored after.
    A model with Mixture-of-Tokens layers mixes groups of ``g`` examples and
    runs on full groups only: a batch that ``g`` does not divide is filled
    with copies of its last prompt, sampled along and dropped from the result
    (one prompt is sampled as ``g`` continuations of itself, as in training).

    Args:
        model: maps ``(B, T)`` ids to an object with ``.logits (B, T, V)``.
        idx_BT: ``(B, T)`` int64 prompt ids, ``T >= 1``.
        max_new_tokens: number of tokens to append (``>= 0``).
        temperature: sampling temperature (0 = greedy).
        top_k: sample from the ``top_k`` most likely tokens only.
        generator: random generator for reproducible samples.

    Returns:
        ``(B, T + max_new_tokens)`` int64 ids.

    Example:
        >>> from mtl.models.lm import TransformerLM
        >>> lm = TransformerLM(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16)
        >>> generate(lm, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape
        torch.Size([1, 7])
    """
    if idx_BT.dim() != 2 or idx_BT.shape[1] < 1:
        raise ValueError(f"prompt must have shape (B, T) with T >= 1, got {tuple(idx_BT.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_len = int(getattr(model, "max_seq_len", idx_BT.shape[1] + max_new_tokens))
    B = idx_BT.shape[0]
    fill = -B % token_group_size(model)
    idx_BT = torch.cat([idx_BT, idx_BT[-1:].expand(fill, -1)])
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits_BTV = model(idx_BT[:, -max_len:]).logits
            nxt_B1 = sample_next(
                logits_BTV[:, -1], temperature=temperature, top_k=top_k, generator=generator
            )
            idx_BT = torch.cat([idx_BT, nxt_B1.to(idx_BT)], dim=1)
    finally:
        model.train(was_training)
    return idx_BT[:B]
