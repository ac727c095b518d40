"""Sampling: greedy, temperature, top-k, context cropping."""

from __future__ import annotations

import pytest
import torch

from mtl.models.lm import TransformerLM, generate, sample_next


def test_sample_next_top_k_and_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]]).expand(500, 4)
    assert sample_next(logits, temperature=0).unique().tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, top_k=2, generator=gen)
    assert set(picks.unique().tolist()) == {1, 2}
    gen = torch.Generator().manual_seed(0)
    cold = sample_next(logits, temperature=0.05, generator=gen)
    assert cold.unique().tolist() == [1]
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, top_k=0)


def test_generate_crops_context_and_restores_mode() -> None:
    torch.manual_seed(0)
    lm = TransformerLM(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=6)
    lm.train()
    prompt = torch.randint(0, 11, (2, 4))
    out = generate(lm, prompt, max_new_tokens=10, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :4], prompt)
    assert lm.training
    again = generate(lm, prompt, max_new_tokens=10, temperature=0)
    assert torch.equal(out, again)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(
        generate(lm, prompt, max_new_tokens=5, generator=g1),
        generate(lm, prompt, max_new_tokens=5, generator=g2),
    )
    with pytest.raises(ValueError, match="prompt"):
        generate(lm, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)
