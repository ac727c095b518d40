"""Causality: the logits before position t never depend on the token at t.

Every token-choice router is causal (its decision for token s depends on token s
only), dropless dispatch and capacity dispatch with room for everyone too. Expert
choice is not: each expert ranks all tokens of the batch, later ones included.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mtl.models.lm import TransformerLM

V, T = 50, 24

CAUSAL_PRESETS: dict[str, dict[str, object]] = {
    "lm_mixtral": {},
    # dispatch.capacity_factor = num_experts: every expert can take every token, nothing dropped
    "lm_switch": {"moe.dispatch.capacity_factor": 8.0},
    "lm_deepseekmoe": {},
    "lm_olmoe": {},
    "lm_top_p": {},
    "lm_deepseek_v3": {},
    "lm_dense": {},
}


def _perturb(x_BT: torch.Tensor, t: int) -> torch.Tensor:
    y = x_BT.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def _max_diff_before_and_after(
    model: TransformerLM, x_BT: torch.Tensor, t: int
) -> tuple[float, float]:
    with torch.no_grad():
        a = model(x_BT).logits
        b = model(_perturb(x_BT, t)).logits
    before = (a[:, :t] - b[:, :t]).abs().max().item() if t > 0 else 0.0
    after = (a[:, t:] - b[:, t:]).abs().max().item()
    return before, after


@pytest.mark.parametrize("preset", sorted(CAUSAL_PRESETS))
def test_token_choice_presets_are_causal(
    preset: str, build_preset: Callable[..., TransformerLM]
) -> None:
    model = build_preset(preset, vocab_size=V, max_seq_len=T, **CAUSAL_PRESETS[preset]).eval()
    assert preset == "lm_dense" or model.moe_layers(), "preset should contain MoE layers"
    x = torch.randint(0, V, (3, T))
    for t in (1, T // 2, T - 1):
        before, after = _max_diff_before_and_after(model, x, t)
        assert after > 1e-4, f"{preset}: changing token {t} changed nothing (test is vacuous)"
        assert before <= 1e-5, (
            f"{preset}: changing token {t} changed earlier logits by {before:.2e}"
        )


def test_switch_with_stats_reports_no_drops_when_capacity_is_large(
    build_preset: Callable[..., TransformerLM],
) -> None:
    model = build_preset(
        "lm_switch", vocab_size=V, max_seq_len=T, **{"moe.dispatch.capacity_factor": 8.0}
    ).eval()
    out = model(torch.randint(0, V, (3, T)))
    assert all(float(s.dropped_slots) == 0 for s in out.layer_stats.values())


def _find_leak(model: TransformerLM, trials: int = 20) -> float:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(trials):
        x = torch.randint(0, V, (2, T), generator=gen)
        for t in (T // 2, T - 1):
            worst = max(worst, _max_diff_before_and_after(model, x, t)[0])
        if worst > 1e-3:
            break
    return worst


def test_expert_choice_breaks_causality(build_preset: Callable[..., TransformerLM]) -> None:
    """Documented caveat (conf/model/lm_expert_choice.yaml): a later token changes earlier logits."""
    model = build_preset("lm_expert_choice", vocab_size=V, max_seq_len=T).eval()
    assert _find_leak(model) > 1e-3


def test_capacity_dropping_breaks_causality(build_preset: Callable[..., TransformerLM]) -> None:
    """With a tight capacity, whether a token is dropped depends on the tokens queued before it,
    which include later positions of the sequences earlier in the batch."""
    model = build_preset(
        "lm_switch",
        vocab_size=V,
        max_seq_len=T,
        **{"moe.dispatch.capacity_factor": 0.5, "moe.dispatch.min_capacity": 1},
    ).eval()
    assert _find_leak(model) > 1e-3
