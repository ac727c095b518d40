import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from mtl.moe import (
    CapacityDispatch,
    DenseDispatch,
    DenseSoftmaxGate,
    DroplessDispatch,
    ExpertBank,
    MoELayer,
    SwiGLUExperts,
    TopKGate,
    TopPGate,
)
from mtl.moe.grouped import grouped_mm, looped_grouped_mm
from mtl.moe.routing import RoutingResult

from .reference import loop_moe, padded_grouped_mm

CASES = [(E, k) for E in (1, 4, 8, 64) for k in (1, 2, 8) if k <= E]


@pytest.mark.parametrize(("E", "k"), CASES)
def test_dropless_equals_per_expert_loop_outputs_and_gradients(E: int, k: int) -> None:
    torch.manual_seed(E * 10 + k)
    T, D, H = 96, 16, 24
    bank = SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H)
    gate = TopKGate(d_model=D, num_experts=E, k=k, renormalize=True)
    x = torch.randn(T, D, requires_grad=True)
    routing = gate(x)
    out = DroplessDispatch()(x, routing, bank).output_TD
    ref = loop_moe(bank, x, routing.weights_TK, routing.experts_TK)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(out)
    params = [x, gate.proj.weight, *bank.parameters()]
    grads = torch.autograd.grad((out * g).sum(), params)
    routing2 = gate(x)
    ref2 = loop_moe(bank, x, routing2.weights_TK, routing2.experts_TK)
    ref_grads = torch.autograd.grad((ref2 * g).sum(), params)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "dispatch", [DroplessDispatch(), DenseDispatch(), CapacityDispatch(capacity_factor=8.0)]
)
def test_topk_with_k_equal_E_equals_dense_mixing(dispatch: nn.Module) -> None:
    torch.manual_seed(0)
    E, D = 6, 12
    bank = ExpertBank(num_experts=E, dims=[D, 20, D], activation="gelu", bias=True)
    topk = TopKGate(d_model=D, num_experts=E, k=E)
    dense = DenseSoftmaxGate(d_model=D, num_experts=E, bias=False)
    dense.proj.weight.data.copy_(topk.proj.weight.data)
    x = torch.randn(40, D)
    sparse_out = dispatch(x, topk(x), bank).output_TD
    dense_out = DenseDispatch()(x, dense(x), bank).output_TD
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dispatch", [DroplessDispatch(), DenseDispatch(), CapacityDispatch(capacity_factor=1.0)]
)
def test_one_expert_layer_equals_plain_ffn(dispatch: nn.Module) -> None:
    torch.manual_seed(1)
    D, H = 10, 14
    ffn = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D))
    layer = MoELayer(
        gate=TopKGate(d_model=D, num_experts=1, k=1),
        experts=ExpertBank.from_modules([ffn], activation="relu"),
        dispatch=dispatch,
    )
    x = torch.randn(3, 7, D)
    torch.testing.assert_close(layer(x).output, ffn(x), rtol=1e-5, atol=1e-5)


def _fixed_routing(experts_TK: torch.Tensor, E: int) -> RoutingResult:
    T, K = experts_TK.shape
    return RoutingResult(
        weights_TK=torch.ones(T, K),
        experts_TK=experts_TK,
        logits_TE=torch.zeros(T, E),
        probs_TE=torch.full((T, E), 1.0 / E),
    )


def test_capacity_drops_exactly_the_slots_the_rule_says() -> None:
    # E=2, K=2, T=6, capacity_factor=0.5 -> capacity ceil(0.5*6*2/2) = 3 per expert.
    experts_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    routing = _fixed_routing(experts_TK, 2)
    bank = ExpertBank(num_experts=2, dims=[4, 4])
    x = torch.randn(6, 4)
    disp = CapacityDispatch(capacity_factor=0.5)
    assert disp.capacity(6, 2, 2) == 3
    res = disp(x, routing, bank)
    # first choices are queued first: expert 0 takes tokens 0,1,2 (first choice),
    # expert 1 takes tokens 4,5 (first choice) and then token 0's second choice.
    expected = torch.tensor(
        [[True, True], [True, False], [True, False], [False, False], [True, False], [True, False]]
    )
    assert torch.equal(res.kept_TK, expected)
    ref = loop_moe(bank, x, routing.weights_TK, experts_TK, keep_TK=expected)
    torch.testing.assert_close(res.output_TD, ref)
    # token 3 lost both slots: zero output (the residual carries it)
    assert torch.count_nonzero(res.output_TD[3]) == 0


def test_capacity_matches_rule_on_random_routing() -> None:
    torch.manual_seed(5)
    T, E, K, cf = 200, 8, 2, 0.75
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    disp = CapacityDispatch(capacity_factor=cf)
    C = math.ceil(cf * T * K / E)
    res = disp(
        torch.randn(T, 4), _fixed_routing(experts_TK, E), ExpertBank(num_experts=E, dims=[4, 4])
    )
    # naive queue: walk slot 0 of every token, then slot 1
    fill = [0] * E
    expected = torch.zeros(T, K, dtype=torch.bool)
    for j in range(K):
        for t in range(T):
            e = int(experts_TK[t, j])
            if fill[e] < C:
                fill[e] += 1
                expected[t, j] = True
    assert torch.equal(res.kept_TK, expected)
    assert int((~expected).sum()) > 0  # the case really drops


def test_dropless_drops_nothing_under_heavy_imbalance() -> None:
    torch.manual_seed(6)
    E, D = 8, 8
    gate = TopKGate(d_model=D, num_experts=E, k=2)
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0] += 5.0  # every token prefers expert 0
    layer = MoELayer(
        gate=gate, experts=ExpertBank(num_experts=E, dims=[D, D]), dispatch=DroplessDispatch()
    )
    out = layer(torch.rand(64, D) + 0.1)
    assert out.stats.dropped_slots.item() == 0
    assert out.stats.tokens_per_expert_E[0].item() == 64
    assert out.stats.tokens_per_expert_E.sum().item() == 128


def _layer(dispatch: nn.Module) -> MoELayer:
    torch.manual_seed(7)
    return MoELayer(
        gate=TopKGate(d_model=8, num_experts=4, k=2),
        experts=SwiGLUExperts(num_experts=4, d_model=8, d_hidden=16),
        dispatch=dispatch,
    )


def test_dropless_output_of_a_sample_is_independent_of_the_batch() -> None:
    layer = _layer(DroplessDispatch())
    torch.manual_seed(8)
    sample = torch.randn(1, 16, 8)
    alone = layer(sample).output
    for _ in range(3):
        others = torch.randn(7, 16, 8) * 3.0
        batch = torch.cat([sample, others])
        torch.testing.assert_close(layer(batch).output[:1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_equals_the_loop_over_kept_slots_outputs_and_gradients(k: int) -> None:
    # dropped slots are copied onto a dummy row that no expert output reads: they must
    # get no output and send no gradient back to their tokens, their weights or the experts
    torch.manual_seed(7 + k)
    T, D, H, E = 64, 12, 20, 4
    bank = SwiGLUExperts(num_experts=E, d_model=D, d_hidden=H)
    gate = TopKGate(d_model=D, num_experts=E, k=k, renormalize=True)
    disp = CapacityDispatch(capacity_factor=0.6)
    x = torch.randn(T, D, requires_grad=True)
    routing = gate(x)
    res = disp(x, routing, bank)
    assert 0 < int((~res.kept_TK).sum()) < T * k  # some slots dropped, some kept
    ref = loop_moe(bank, x, routing.weights_TK, routing.experts_TK, keep_TK=res.kept_TK)
    torch.testing.assert_close(res.output_TD, ref, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(ref)
    params = [x, gate.proj.weight, *bank.parameters()]
    grads = torch.autograd.grad((res.output_TD * g).sum(), params)
    routing2 = gate(x)
    ref2 = loop_moe(bank, x, routing2.weights_TK, routing2.experts_TK, keep_TK=res.kept_TK)
    ref_grads = torch.autograd.grad((ref2 * g).sum(), params)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_output_of_a_sample_depends_on_the_batch() -> None:
    """Documents the token-dropping side channel: other requests change your output."""
    layer = _layer(CapacityDispatch(capacity_factor=1.0))
    torch.manual_seed(9)
    sample = torch.randn(1, 16, 8)
    # a batch whose tokens all crowd the sample's favourite expert
    fav = layer.gate(sample.reshape(-1, 8)).experts_TK[:, 0].mode().values
    crowd = torch.randn(7, 16, 8) + 4.0 * layer.gate.proj.weight[fav].detach()
    out_a = layer(torch.cat([sample, torch.randn(7, 16, 8) * 0.01])).output[:1]
    out_b = layer(torch.cat([sample, crowd])).output[:1]
    assert not torch.allclose(out_a, out_b, atol=1e-4)


def test_top_p_dropless_equals_loop_with_variable_experts() -> None:
    torch.manual_seed(10)
    E, D = 8, 8
    bank = ExpertBank(num_experts=E, dims=[D, 12, D], activation="gelu")
    gate = TopPGate(d_model=D, num_experts=E, p=0.6)
    x = torch.randn(50, D)
    r = gate(x)
    out = DroplessDispatch()(x, r, bank).output_TD
    ref = loop_moe(bank, x, r.weights_TK, r.experts_TK, keep_TK=r.valid_TK)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert r.valid_TK.sum(-1).min() >= 1 and r.valid_TK.sum(-1).max() > 1


def test_bad_capacity_factor() -> None:
    with pytest.raises(ValueError, match="capacity_factor"):
        CapacityDispatch(capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        CapacityDispatch(capacity_factor=-1.0)


SEAMS = [grouped_mm, looped_grouped_mm, padded_grouped_mm]


def _overriding(cls: type, seam: Callable[[Tensor, Tensor, Tensor], Tensor]) -> type:
    """A subclass of ``cls`` whose grouped-matmul seam is ``seam``, counting its calls."""

    class Overridden(cls):  # type: ignore[misc, valid-type]
        seam_calls = 0

        def _grouped_mm(self, x_ND: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
            self.seam_calls += 1
            return seam(x_ND, w_EDH, counts_E)

    return Overridden


def _bank(cls: type, swiglu: bool, E: int, D: int, H: int) -> nn.Module:
    if swiglu:
        return cls(num_experts=E, d_model=D, d_hidden=H)
    return cls(num_experts=E, dims=[D, H, D], activation="gelu", bias=True)


@pytest.mark.parametrize("seam", SEAMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize(("E", "k"), [(4, 2), (64, 8)])
def test_an_overridden_grouped_mm_seam_equals_the_loop_outputs_and_gradients(
    seam: Callable[[Tensor, Tensor, Tensor], Tensor], swiglu: bool, E: int, k: int
) -> None:
    """Any implementation of the grouped-matmul contract, put in by overriding the
    bank's one seam, gives the reference loop's outputs and gradients."""
    torch.manual_seed(E + k + int(swiglu))
    T, D, H = 80, 16, 12
    base = SwiGLUExperts if swiglu else ExpertBank
    bank = _bank(_overriding(base, seam), swiglu, E, D, H)
    gate = TopKGate(d_model=D, num_experts=E, k=k, renormalize=True)
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    params = [x, gate.proj.weight, *bank.parameters()]
    r = gate(x)
    out = DroplessDispatch()(x, r, bank).output_TD
    assert bank.seam_calls == (3 if swiglu else 2)  # every projection went through the seam
    grads = torch.autograd.grad((out * g).sum(), params)
    r2 = gate(x)
    ref = loop_moe(bank, x, r2.weights_TK, r2.experts_TK)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seam", SEAMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_experts_that_get_no_rows(
    swiglu: bool, seam: Callable[[Tensor, Tensor, Tensor], Tensor]
) -> None:
    """Dead experts (no rows) between live ones: same outputs and gradients as the loop,
    and exactly zero gradient for the dead experts' weights."""
    torch.manual_seed(7)
    T, D, H, E, K = 24, 8, 6, 6, 2
    bank = _bank(_overriding(SwiGLUExperts if swiglu else ExpertBank, seam), swiglu, E, D, H)
    # experts 1 and 4 get nothing; 0 gets 16 rows, 2 gets 17, 3 and 5 get 8 and 7
    first = torch.tensor([0] * 16 + [3] * 8)
    second = torch.tensor([2] * 17 + [5] * 7)
    experts_TK = torch.stack([first, second], dim=1)
    weights_TK = torch.rand(T, K, requires_grad=True)
    routing = RoutingResult(
        weights_TK=weights_TK,
        experts_TK=experts_TK,
        logits_TE=torch.zeros(T, E),
        probs_TE=torch.full((T, E), 1.0 / E),
    )
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    params = [x, weights_TK, *bank.parameters()]
    out = DroplessDispatch()(x, routing, bank).output_TD
    grads = torch.autograd.grad((out * g).sum(), params)
    ref = loop_moe(bank, x, weights_TK, experts_TK)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for grad in grads[2:]:
        if grad.shape[0] == E:
            assert grad[[1, 4]].abs().max() == 0  # dead experts: exactly zero
