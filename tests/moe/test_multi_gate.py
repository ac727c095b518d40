"""MultiGateMixture's one-matmul path (experts' first layer + gate logits) against naive loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from mtl.moe import DenseSoftmaxGate, ExpertBank, MultiGateMixture, TopKGate
from mtl.moe.dispatch import combine_dense_many
from mtl.moe.gates.dense import route_dense_gates, routes_together
from mtl.moe.linear_input import LinearInput

from .reference import expert_forward

TASKS = ("click", "like", "buy")


def _mixture(**bank_kw: object) -> MultiGateMixture:
    bank = ExpertBank(num_experts=4, **bank_kw)  # type: ignore[arg-type]
    gates = {t: DenseSoftmaxGate(d_model=6, num_experts=4, temperature=0.7) for t in TASKS}
    return MultiGateMixture(experts=bank, gates=gates)


def _reference(mix: MultiGateMixture, x: Tensor) -> dict[str, Tensor]:
    """Per-expert loop and per-gate softmax, no fusion."""
    bank = mix.experts
    y = torch.stack([expert_forward(bank, e, x) for e in range(bank.num_experts)])  # (E, T, H)
    out = {}
    for t, g in mix.gates.items():
        w = torch.softmax(g.proj(x) / g.temperature, -1)  # (T, E)
        out[t] = torch.einsum("eth,te->th", y, w)
    return out


def _grads(mix: MultiGateMixture, outputs: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    torch.manual_seed(99)
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs.values())
    params = [p for p in mix.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, [*params, x]))


@pytest.mark.parametrize(
    "bank_kw",
    [
        dict(dims=[6, 5], activation="relu", bias=True, activate_last=True),
        dict(dims=[6, 8, 5], activation="gelu", bias=True),
        dict(dims=[6, 8, 5], activation="silu", glu=True),
        dict(dims=[6, 8, 5], activation="silu", glu=True, hidden_sizes=[8, 2, 5, 8]),
    ],
)
def test_fused_path_matches_per_expert_and_per_gate_reference(bank_kw: dict) -> None:
    torch.manual_seed(0)
    mix = _mixture(**bank_kw)
    x = torch.randn(9, 6, requires_grad=True)
    assert mix.fuses(x)
    out = mix(x)
    ref = _reference(mix, x)
    for t in TASKS:
        torch.testing.assert_close(out.outputs[t], ref[t])
        torch.testing.assert_close(
            out.routing[t].dense_weights(),
            torch.softmax(mix.gates[t].proj(x) / 0.7, -1),
        )
    for g, r in zip(_grads(mix, out.outputs, x), _grads(mix, ref, x), strict=True):
        torch.testing.assert_close(g, r)


def test_fused_and_unfused_paths_agree_with_batch_norm_experts() -> None:
    torch.manual_seed(1)
    mix = _mixture(dims=[6, 5], activation="relu", activate_last=True, norm="batch")
    x = torch.randn(16, 6, requires_grad=True)
    fused = mix(x)
    unfused = mix(x, gate_inputs=x)  # explicit gate inputs: the separate-matmul path
    assert mix.fuses(x) and not mix.fuses(x, gate_inputs=x)
    for t in TASKS:
        torch.testing.assert_close(fused.outputs[t], unfused.outputs[t])
    for g, r in zip(_grads(mix, fused.outputs, x), _grads(mix, unfused.outputs, x), strict=True):
        torch.testing.assert_close(g, r)


def test_no_fusion_where_logits_would_not_be_float32_or_gates_differ() -> None:
    mix = _mixture(dims=[6, 5], activation="relu", activate_last=True)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mix.fuses(x)
        out = mix(x)
    assert all(r.logits_TE.dtype == torch.float32 for r in out.routing.values())
    assert not mix.fuses(x.bfloat16())
    assert not mix.fuses(x.expand(4, 4, 6))  # per-expert inputs
    jittery = MultiGateMixture(
        experts=ExpertBank(num_experts=4, dims=[6, 5]),
        gates={"a": DenseSoftmaxGate(d_model=6, num_experts=4, input_jitter=0.1)},
    )
    assert not jittery.fuses(x)
    jittery.eval()
    assert jittery.fuses(x)  # jitter is off in eval
    topk = MultiGateMixture(
        experts=ExpertBank(num_experts=4, dims=[6, 5]),
        gates={"a": TopKGate(d_model=6, num_experts=4, k=2)},
    )
    assert not topk.fuses(x)


class _CountingInput:
    """A LinearInput over a dense tensor that records the products asked of it."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.calls: list[tuple[int, ...]] = []

    @property
    def num_rows(self) -> int:
        return self.x.shape[0]

    @property
    def width(self) -> int:
        return self.x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def matmul(self, w_DN: Tensor) -> Tensor:
        self.calls.append(tuple(w_DN.shape))
        return self.x @ w_DN

    def materialize(self) -> Tensor:
        return self.x


def test_linear_input_gets_one_product_for_experts_and_all_gates() -> None:
    torch.manual_seed(2)
    mix = _mixture(dims=[6, 8, 5], activation="silu", glu=True)
    x = torch.randn(5, 6, requires_grad=True)
    lin = _CountingInput(x)
    assert isinstance(lin, LinearInput) and mix.fuses(lin)
    out = mix(lin)
    # one (D, 2*E*H + G*E) product: expert units, their GLU gates, then every gate's logits
    assert lin.calls == [(6, 2 * 4 * 8 + len(TASKS) * 4)]
    ref = _reference(mix, x)
    for t in TASKS:
        torch.testing.assert_close(out.outputs[t], ref[t])
    # a mixture that cannot fuse materialises the input instead
    topk = MultiGateMixture(
        experts=ExpertBank(num_experts=4, dims=[6, 5]),
        gates={"a": TopKGate(d_model=6, num_experts=4, k=2)},
    )
    lin2 = _CountingInput(x)
    topk(lin2)
    assert lin2.calls == []


def test_forward_all_projected_rejects_wrong_width() -> None:
    bank = ExpertBank(num_experts=2, dims=[4, 3, 4], activation="silu", glu=True)
    assert bank.first_layer_weight().shape == (4, 2 * 2 * 3)
    with pytest.raises(ValueError, match=r"first-layer products must be \(T, 12\)"):
        bank.forward_all_projected(torch.randn(5, 6))


@pytest.mark.parametrize("layout", ["TED view", "ETD contiguous"])
@pytest.mark.parametrize("num_gates", [1, 3])
def test_combine_dense_many_matches_a_per_gate_weighted_sum(layout: str, num_gates: int) -> None:
    torch.manual_seed(3)
    T, E, D = 7, 4, 5
    base = torch.randn(T, E, D) if layout == "TED view" else torch.randn(E, T, D)
    base.requires_grad_(True)
    y_ETD = base.transpose(0, 1) if layout == "TED view" else base
    ws = [torch.softmax(torch.randn(T, E), -1).requires_grad_(True) for _ in range(num_gates)]
    out = combine_dense_many(y_ETD, ws)
    ref = [sum(w[:, e : e + 1] * y_ETD[e] for e in range(E)) for w in ws]  # per-expert loop
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r)
    gs = [torch.randn(T, D) for _ in ws]
    got = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, gs, strict=True)), [base, *ws])
    want = torch.autograd.grad(
        sum((r * g).sum() for r, g in zip(ref, gs, strict=True)), [base, *ws]
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_gate_logit_norm_fused_and_unfused_equal_softmax_of_batch_normed_logits() -> None:
    torch.manual_seed(5)
    bank = ExpertBank(num_experts=4, dims=[6, 5], activation="relu", bias=True, activate_last=True)
    gates = {t: DenseSoftmaxGate(d_model=6, num_experts=4, logit_norm=True) for t in TASKS}
    mix = MultiGateMixture(experts=bank, gates=gates)
    with torch.no_grad():
        for g in mix.gates.values():
            g.logit_norm.weight.uniform_(0.5, 2.0)
            g.logit_norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(16, 6, requires_grad=True)
    fused = mix(x)
    unfused = mix(x, gate_inputs=x)
    for t, g in mix.gates.items():
        z = g.proj(x)
        z_hat = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + g.logit_norm.eps)
        want = torch.softmax(z_hat * g.logit_norm.weight + g.logit_norm.bias, -1)
        torch.testing.assert_close(fused.routing[t].dense_weights(), want)
        torch.testing.assert_close(unfused.routing[t].dense_weights(), want)
    for a, b in zip(_grads(mix, fused.outputs, x), _grads(mix, unfused.outputs, x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("logit_norm", [True, False])
def test_gates_routed_together_equal_each_gate_routed_alone(logit_norm: bool) -> None:

    torch.manual_seed(7)
    T, D, E, G = 24, 6, 4, 3
    gates = [DenseSoftmaxGate(d_model=D, num_experts=E, logit_norm=logit_norm) for _ in range(G)]
    if logit_norm:
        with torch.no_grad():
            for g in gates:
                g.logit_norm.weight.uniform_(0.5, 2.0)
                g.logit_norm.bias.uniform_(-1.0, 1.0)
                g.logit_norm.running_mean.uniform_(-1.0, 1.0)
    alone = copy.deepcopy(gates)
    assert routes_together(gates)
    x = torch.randn(T, D, requires_grad=True)
    for _ in range(2):  # two training steps: running statistics accumulate alike
        z = torch.cat([x @ g.proj.weight.t() for g in gates], dim=1)
        routes, probs_TGE = route_dense_gates(gates, z)
        want = [g(x) for g in alone]
        for gi, (r, w) in enumerate(zip(routes, want, strict=True)):
            torch.testing.assert_close(r.logits_TE, w.logits_TE)
            torch.testing.assert_close(r.dense_weights(), w.dense_weights())
            torch.testing.assert_close(probs_TGE[:, gi], w.probs_TE)
            torch.testing.assert_close(r.experts_TK, w.experts_TK)
        g_out = torch.randn(T, G, E)
        params = [p for g in gates for p in g.parameters()]
        params_alone = [p for g in alone for p in g.parameters()]
        got = torch.autograd.grad((probs_TGE * g_out).sum(), [x, *params])
        ref = torch.autograd.grad(
            sum((w.probs_TE * g_out[:, i]).sum() for i, w in enumerate(want)), [x, *params_alone]
        )
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b)
    for a, b in zip(gates, alone, strict=True):
        for (name, u), v in zip(a.named_buffers(), b.buffers(), strict=True):
            torch.testing.assert_close(u, v, msg=name)
    for g in gates + alone:
        g.eval()
    z = torch.cat([x @ g.proj.weight.t() for g in gates], dim=1)
    routes, _ = route_dense_gates(gates, z)
    for r, g in zip(routes, alone, strict=True):
        torch.testing.assert_close(r.dense_weights(), g(x).dense_weights())


def test_only_alike_gates_route_together() -> None:
    def gate(**kw: object) -> DenseSoftmaxGate:
        return DenseSoftmaxGate(d_model=4, num_experts=3, **kw)  # type: ignore[arg-type]

    assert routes_together([gate(), gate()])
    assert not routes_together([gate(), gate(logit_norm=True)])
    assert not routes_together([gate(), gate(temperature=2.0)])
    assert not routes_together([gate(), gate(expert_mask=[True, False, True])])
    assert not routes_together([gate(), gate(bias=False)])
    cumulative = gate(logit_norm=True)
    cumulative.logit_norm.momentum = None
    assert not routes_together([gate(logit_norm=True), cumulative])
    other_eps = gate(logit_norm=True)
    other_eps.logit_norm.eps = 1e-3
    assert not routes_together([gate(logit_norm=True), other_eps])
    assert not routes_together([gate(logit_norm=True), gate(logit_norm=True).eval()])
    assert not routes_together([])
    with pytest.raises(ValueError, match=r"\(T, 6\)"):
        route_dense_gates([gate(), gate()], torch.randn(5, 7))
