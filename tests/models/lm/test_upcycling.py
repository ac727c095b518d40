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
from mtl.models.lm.upcycling import gate_total_weight, preserving_scale
from mtl.moe import CapacityDispatch, SigmoidBiasGate, TopKGate, TopPGate
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
    assert moe.output_scale == 1.0  # unit weights, all experts: E / W = E / E
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


def test_split_with_top_k_scales_renormalised_weights_by_e(ffn: SwiGLU) -> None:
    """Weights summing to 1 over 2 of 8 experts: scale E / W = 8 (E / k = 4 would halve y)."""
    moe = split_ffn(ffn, num_experts=8, k=2, method="contiguous", preserve="expectation")
    assert isinstance(moe.gate, TopKGate) and moe.gate.renormalize
    assert moe.output_scale == pytest.approx(8.0)
    x = torch.randn(6, D)
    out = moe(x)
    # by hand: scale * sum over the chosen experts of weight * expert output
    r = out.routing
    y_ETD = moe.experts.forward_all(x)
    manual = torch.stack(
        [sum(r.weights_TK[t, j] * y_ETD[r.experts_TK[t, j], t] for j in range(2)) for t in range(6)]
    )
    torch.testing.assert_close(out.output, 8.0 * manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("k", "renormalize"), [(1, True), (2, True), (2, False), (4, False)])
def test_split_with_top_k_keeps_the_expected_output(ffn: SwiGLU, k: int, renormalize: bool) -> None:
    """Averaged over the routers' choices, the split MoE's output is the dense output.

    One input token, 40000 copies routed on random gate inputs; the router's rows
    are orthogonal and of equal norm, so the logits are i.i.d., every subset of k
    experts is equally likely and the weights are near uniform: the mean output
    estimates the expectation over the choice (standard error ~1.5% of |y| here).
    """
    E = 8
    moe = split_ffn(ffn, num_experts=E, k=k, renormalize=renormalize, preserve="expectation")
    with torch.no_grad():
        moe.gate.proj.weight.copy_(1e-3 * torch.eye(E, D))
    x_1D = torch.randn(1, D)
    n = 40_000
    gate_in = torch.randn(n, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = moe(x_1D.expand(n, D), gate_input=gate_in).output
    with torch.no_grad():
        dense = ffn(x_1D)[0]
    err = float((out.mean(0) - dense).norm() / dense.norm())
    assert err < 0.06, err
    # the E / k scale on renormalised weights (LLaMA-MoE's score_scale_factor) is k times short
    if renormalize and k > 1:
        shrunk = out.mean(0) * (E / k) / moe.output_scale
        assert ((shrunk - dense).norm() / dense.norm()) > 0.3


def test_split_with_top_k_is_refused_unless_expectation_is_accepted(ffn: SwiGLU) -> None:
    with pytest.raises(
        ValueError, match=r"split-upcycling with k=2 of E=8.*preserve='expectation'"
    ):
        split_ffn(ffn, num_experts=8, k=2)
    with pytest.raises(ValueError, match="k=1 of E=4"):
        split_ffn(ffn, num_experts=4, gate=TopKGate(d_model=D, num_experts=4, k=1))
    with pytest.raises(ValueError, match="preserve must be"):
        split_ffn(ffn, num_experts=4, k=4, preserve="roughly")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gate", "total", "copy_scale", "split_scale"),
    [
        (TopKGate(d_model=D, num_experts=8, k=8, renormalize=True), 1.0, 1.0, 8.0),
        (TopKGate(d_model=D, num_experts=8, k=8), 1.0, 1.0, 8.0),
        (TopKGate(d_model=D, num_experts=8, k=2), 0.25, 4.0, 32.0),
        (TopKGate(d_model=D, num_experts=8, k=2, softmax_after_topk=True), 1.0, 1.0, 8.0),
        (ConstantGate(num_experts=4), 4.0, 0.25, 1.0),
        (ConstantGate(num_experts=4, weight=0.25), 1.0, 1.0, 4.0),
        (SigmoidBiasGate(d_model=D, num_experts=4, k=4, route_scale=2.0), 2.0, 0.5, 2.0),
        (SigmoidBiasGate(d_model=D, num_experts=4, k=4, normalize=False), 2.0, 0.5, 2.0),
    ],
)
def test_preserving_scale_per_gate(
    gate: torch.nn.Module, total: float, copy_scale: float, split_scale: float
) -> None:
    assert gate_total_weight(gate) == pytest.approx(total)
    assert preserving_scale(method="copy", gate=gate) == pytest.approx(copy_scale)
    scale = preserving_scale(method="split", gate=gate, preserve="expectation")
    assert scale == pytest.approx(split_scale)


def test_preserving_scale_refuses_a_gate_of_unknown_weight() -> None:
    with pytest.raises(ValueError, match=r"TopPGate.*output_scale"):
        gate_total_weight(TopPGate(d_model=D, num_experts=4, p=0.5))
    with pytest.raises(ValueError, match="method must be"):
        preserving_scale(method="clone", gate=ConstantGate(num_experts=2))  # type: ignore[arg-type]


def test_split_rejects_bad_groups(ffn: SwiGLU) -> None:
    with pytest.raises(ValueError, match="partition"):
        split_ffn(ffn, num_experts=2, k=2, groups=[torch.arange(0, 30), torch.arange(20, 48)])
    with pytest.raises(ValueError, match="gate or k"):
        split_ffn(ffn, num_experts=2)


def test_copy_upcycled_moe_with_renormalised_top_k_equals_dense(ffn: SwiGLU) -> None:
    moe = copy_ffn(ffn, num_experts=8, k=2)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)
    # also with another router whose weights sum to one
    moe = copy_ffn(ffn, num_experts=8, gate=SigmoidBiasGate(d_model=D, num_experts=8, k=3))
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)


def test_copy_upcycling_without_renormalisation_is_rescaled_by_e_over_k(ffn: SwiGLU) -> None:
    """Softmax-then-top-k weights sum to ~k/E at a near-uniform router: scale E/k keeps y."""
    x = torch.randn(4, D)
    moe = copy_ffn(ffn, num_experts=8, k=2, renormalize=False, router_std=1e-4)
    assert moe.output_scale == pytest.approx(4.0)
    torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-3, rtol=1e-3)
    # guards against a vacuous comparison: without the scale the output is a quarter
    moe.output_scale = 1.0
    assert not torch.allclose(moe(x).output, ffn(x), atol=1e-2)


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
