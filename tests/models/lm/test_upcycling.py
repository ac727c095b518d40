"""Upcycling a dense SwiGLU FFN into MoE layers (LLaMA-MoE splitting, sparse upcycling)."""

from __future__ import annotations

import pytest
import torch

from mtl.models.lm import (
    SwiGLU,
    TransformerLM,
    copy_ffn,
    split_ffn,
    split_indices,
    upcycle_transformer,
)
from mtl.moe import CapacityDispatch, SigmoidBiasGate, TopKGate
from mtl.moe.gates import ConstantGate

D, H = 16, 48


@pytest.fixture
def ffn() -> SwiGLU:
    torch.manual_seed(0)
    f = SwiGLU(d_model=D, d_hidden=H)
    with torch.no_grad():  # larger weights than the init, so mistakes are not hidden by scale
        for p in f.parameters():
            p.normal_(0.0, 0.5)
    return f


@pytest.mark.parametrize("method", ["random", "contiguous"])
@pytest.mark.parametrize("num_experts", [4, 5, 48])  # 5: groups of unequal size (48 % 5 != 0)
def test_split_with_all_experts_at_weight_one_reproduces_dense(
    ffn: SwiGLU, method: str, num_experts: int
) -> None:
    moe = split_ffn(
        ffn, num_experts=num_experts, gate=ConstantGate(num_experts=num_experts), method=method
    )
    assert moe.output_scale == 1.0  # k = E
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)


def test_split_is_a_partition(ffn: SwiGLU) -> None:
    groups = split_indices(H, 5, method="random", seed=3)
    assert sorted(torch.cat(groups).tolist()) == list(range(H))
    assert [len(g) for g in groups] == [10, 10, 10, 9, 9]
    assert split_indices(H, 5, method="random", seed=3)[0].tolist() == groups[0].tolist()
    assert split_indices(H, 5, method="random", seed=4)[0].tolist() != groups[0].tolist()
    assert split_indices(H, 4, method="contiguous")[1].tolist() == list(range(12, 24))


def test_each_split_expert_is_its_neuron_slice(ffn: SwiGLU) -> None:
    groups = split_indices(H, 4, method="random", seed=0)
    moe = split_ffn(ffn, num_experts=4, gate=ConstantGate(num_experts=4), groups=groups)
    x = torch.randn(5, D)
    y_ETD = moe.experts.forward_all(x)
    g = groups[2]
    h = torch.nn.functional.silu(x @ ffn.gate_proj.weight[g].T) * (x @ ffn.up_proj.weight[g].T)
    torch.testing.assert_close(y_ETD[2], h @ ffn.down_proj.weight[:, g].T, atol=1e-5, rtol=1e-5)


def test_split_with_top_k_rescales_by_e_over_k(ffn: SwiGLU) -> None:
    moe = split_ffn(ffn, num_experts=8, k=2, method="contiguous")
    assert isinstance(moe.gate, TopKGate) and moe.gate.renormalize
    assert moe.output_scale == pytest.approx(4.0)
    x = torch.randn(6, D)
    out = moe(x)
    # by hand: E/k * sum over the chosen experts of weight * expert output
    r = out.routing
    y_ETD = moe.experts.forward_all(x)
    manual = torch.stack(
        [sum(r.weights_TK[t, j] * y_ETD[r.experts_TK[t, j], t] for j in range(2)) for t in range(6)]
    )
    torch.testing.assert_close(out.output, 4.0 * manual, atol=1e-5, rtol=1e-5)


def test_split_rejects_bad_groups(ffn: SwiGLU) -> None:
    with pytest.raises(ValueError, match="partition"):
        split_ffn(ffn, num_experts=2, k=1, groups=[torch.arange(0, 30), torch.arange(20, 48)])
    with pytest.raises(ValueError, match="gate or k"):
        split_ffn(ffn, num_experts=2)


def test_copy_upcycled_moe_with_renormalised_top_k_equals_dense(ffn: SwiGLU) -> None:
    moe = copy_ffn(ffn, num_experts=8, k=2)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)
    # also with another router whose weights sum to one
    moe = copy_ffn(ffn, num_experts=8, gate=SigmoidBiasGate(d_model=D, num_experts=8, k=3))
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)


def test_copy_upcycling_without_renormalisation_is_not_dense(ffn: SwiGLU) -> None:
    """The equivalence needs weights summing to 1: guards against a vacuous comparison."""
    moe = copy_ffn(
        ffn, num_experts=8, gate=TopKGate(d_model=D, num_experts=8, k=2, renormalize=False)
    )
    x = torch.randn(4, D)
    assert not torch.allclose(moe(x).output, ffn(x), atol=1e-3)


def test_copy_noise_breaks_symmetry(ffn: SwiGLU) -> None:
    moe = copy_ffn(ffn, num_experts=4, k=2, noise_std=0.01, seed=1)
    w = moe.experts.w_gate
    assert not torch.equal(w[0], w[1])
    assert (w[0] - ffn.gate_proj.weight.T).abs().max() < 0.05


def test_upcycled_transformer_keeps_its_logits() -> None:
    torch.manual_seed(0)
    lm = TransformerLM(
        vocab_size=30, d_model=D, n_layers=3, n_heads=2, d_ff=H, max_seq_len=16
    ).eval()
    x = torch.randint(0, 30, (2, 16))
    before = lm(x).logits
    replaced = upcycle_transformer(
        lm, make_moe=lambda f, i: copy_ffn(f, num_experts=4, k=2), layers=[0, 2]
    )
    assert replaced == [0, 2] and sorted(lm.moe_layers()) == [0, 2]
    torch.testing.assert_close(lm(x).logits, before, atol=1e-5, rtol=1e-5)
    upcycle_transformer(
        lm,
        make_moe=lambda f, i: split_ffn(
            f,
            num_experts=4,
            gate=ConstantGate(num_experts=4),
            dispatch=CapacityDispatch(capacity_factor=1.0),
        ),
    )
    assert sorted(lm.moe_layers()) == [0, 1, 2]
    torch.testing.assert_close(lm(x).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no dense"):
        upcycle_transformer(lm, make_moe=lambda f, i: copy_ffn(f, num_experts=2, k=1), layers=[0])
