"""MultiGateMixture, plain and projected, against per-expert and per-gate naive loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from mtl.moe import DenseSoftmaxGate, ExpertBank, ExpertList, MultiGateMixture, TopKGate
from mtl.moe.dispatch import combine_dense_many

from .reference import expert_forward

TASKS = ("click", "like", "buy")
BANKS = [
    dict(dims=[6, 5], activation="relu", bias=True, activate_last=True),
    dict(dims=[6, 8, 5], activation="gelu", bias=True),
    dict(dims=[6, 8, 5], activation="silu", activate_last=True),
    dict(dims=[6, 8, 5], activation="relu", bias=True, hidden_sizes=[8, 2, 5, 8]),
]


def _mixture(**bank_kw: object) -> MultiGateMixture:
    bank = ExpertBank(num_experts=4, **bank_kw)  # type: ignore[arg-type]
    gates = {
        "click": DenseSoftmaxGate(d_model=6, num_experts=4, temperature=0.7),
        "like": DenseSoftmaxGate(d_model=6, num_experts=4, expert_mask=[0, 2]),
        "buy": DenseSoftmaxGate(d_model=6, num_experts=4, bias=False),
    }
    return MultiGateMixture(experts=bank, gates=gates)


def _gate_weights(gate: DenseSoftmaxGate, g_in: Tensor) -> Tensor:
    """Softmax of the gate's logits over its allowed experts, written out."""
    logits = g_in @ gate.proj.weight.t()
    if gate.proj.bias is not None:
        logits = logits + gate.proj.bias
    logits = logits.masked_fill(~gate.expert_mask_E, float("-inf"))
    return torch.softmax(logits / gate.temperature, -1)


def _reference(
    mix: MultiGateMixture, x: Tensor, gate_inputs: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Per expert: its own forward; per gate: its own softmax and weighted sum."""
    bank = mix.experts
    inputs = [x[e] if x.dim() == 3 else x for e in range(bank.num_experts)]
    y = [expert_forward(bank, e, inputs[e]) for e in range(bank.num_experts)]
    out = {}
    for t, g in mix.gates.items():
        w = _gate_weights(g, x if gate_inputs is None else gate_inputs[t])
        out[t] = sum(w[:, e : e + 1] * y[e] for e in range(bank.num_experts))
    return out


def _grads(mix: MultiGateMixture, outputs: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    torch.manual_seed(99)
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs.values())
    params = [p for p in mix.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, [*params, x], allow_unused=True))


def _assert_same(a: list[Tensor | None], b: list[Tensor | None]) -> None:
    for u, v in zip(a, b, strict=True):
        if u is None or v is None:  # a masked gate's unused column, say
            assert u is None or not u.any()
            assert v is None or not v.any()
        else:
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("bank_kw", BANKS)
def test_forward_matches_per_expert_and_per_gate_reference(bank_kw: dict) -> None:
    torch.manual_seed(0)
    mix = _mixture(**bank_kw)
    x = torch.randn(9, 6, requires_grad=True)
    out = mix(x)
    ref = _reference(mix, x)
    for t, g in mix.gates.items():
        torch.testing.assert_close(out.outputs[t], ref[t])
        torch.testing.assert_close(out.routing[t].dense_weights(), _gate_weights(g, x))
    assert torch.all(out.routing["like"].dense_weights()[:, [1, 3]] == 0)
    _assert_same(_grads(mix, out.outputs, x), _grads(mix, ref, x))


@pytest.mark.parametrize("bank_kw", BANKS)
def test_projected_path_equals_forward_in_values_and_gradients(bank_kw: dict) -> None:
    torch.manual_seed(1)
    mix = _mixture(**bank_kw)
    x = torch.randn(9, 6, requires_grad=True)
    w = mix.input_weight()
    E, n_gates = 4, len(TASKS)
    assert (
        w.shape[0] == 6
        and w.shape[1] == bank_kw["dims"][1] * E * (2 if bank_kw.get("glu") else 1) + n_gates * E
    )
    projected = mix.forward_projected(x @ w)
    ref = _reference(mix, x)
    for t in TASKS:
        torch.testing.assert_close(projected.outputs[t], ref[t])
    _assert_same(_grads(mix, projected.outputs, x), _grads(mix, ref, x))


def test_per_expert_inputs_and_gate_inputs_match_reference() -> None:
    torch.manual_seed(2)
    mix = _mixture(**BANKS[1])
    x_ETD = torch.randn(4, 7, 6, requires_grad=True)
    g_in = {t: torch.randn(7, 6) for t in TASKS}
    out = mix(x_ETD, gate_inputs=g_in)
    ref = _reference(mix, x_ETD, g_in)
    for t in TASKS:
        torch.testing.assert_close(out.outputs[t], ref[t])
    _assert_same(_grads(mix, out.outputs, x_ETD), _grads(mix, ref, x_ETD))
    with pytest.raises(ValueError, match="need explicit gate_inputs"):
        mix(x_ETD)
    with pytest.raises(ValueError, match="no entry for gate 'buy'"):
        mix(x_ETD, gate_inputs={"click": g_in["click"], "like": g_in["like"]})


def test_batch_norm_experts_and_gate_logit_norm_projected_equals_forward() -> None:
    """Batch statistics and running statistics agree between the two paths, step after step."""
    torch.manual_seed(3)
    bank = ExpertBank(
        num_experts=4, dims=[6, 5], activation="relu", bias=True, activate_last=True, norm="batch"
    )
    gates = {t: DenseSoftmaxGate(d_model=6, num_experts=4, logit_norm=True) for t in TASKS}
    mix = MultiGateMixture(experts=bank, gates=gates)
    with torch.no_grad():
        for g in mix.gates.values():
            g.logit_norm.weight.uniform_(0.5, 2.0)
            g.logit_norm.bias.uniform_(-1.0, 1.0)
    twin = copy.deepcopy(mix)
    for _ in range(2):
        x = torch.randn(16, 6, requires_grad=True)
        plain = mix(x)
        projected = twin.forward_projected(x @ twin.input_weight())
        for t, g in mix.gates.items():
            z = g.proj(x)
            z_hat = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + g.logit_norm.eps)
            want = torch.softmax(z_hat * g.logit_norm.weight + g.logit_norm.bias, -1)
            torch.testing.assert_close(plain.routing[t].dense_weights(), want)
            torch.testing.assert_close(projected.routing[t].dense_weights(), want)
            torch.testing.assert_close(projected.outputs[t], plain.outputs[t])
        _assert_same(_grads(mix, plain.outputs, x), _grads(twin, projected.outputs, x))
    for (name, a), b in zip(mix.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_routing_logits_stay_float32_under_autocast() -> None:
    mix = _mixture(**BANKS[0])
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mix(x)
    assert all(r.logits_TE.dtype == torch.float32 for r in out.routing.values())
    plain = mix(x).routing
    for task, r in out.routing.items():
        torch.testing.assert_close(r.logits_TE, plain[task].logits_TE, rtol=1e-6, atol=1e-6)


def test_projected_path_needs_an_expert_bank_and_dense_gates_without_jitter() -> None:
    topk = MultiGateMixture(
        experts=ExpertBank(num_experts=4, dims=[6, 5]),
        gates={"a": TopKGate(d_model=6, num_experts=4, k=2)},
    )
    jittery = MultiGateMixture(
        experts=ExpertBank(num_experts=4, dims=[6, 5]),
        gates={"a": DenseSoftmaxGate(d_model=6, num_experts=4, input_jitter=0.1)},
    )
    listed = MultiGateMixture(
        experts=ExpertList(experts=[torch.nn.Linear(6, 5) for _ in range(4)]),
        gates={"a": DenseSoftmaxGate(d_model=6, num_experts=4)},
    )
    for mix in (topk, jittery, listed):
        with pytest.raises(TypeError, match="projected input needs"):
            mix.input_weight()


def test_gates_must_route_over_the_bank() -> None:
    with pytest.raises(ValueError, match="routes to 3 experts, bank has 4"):
        MultiGateMixture(
            experts=ExpertBank(num_experts=4, dims=[6, 5]),
            gates={"a": DenseSoftmaxGate(d_model=6, num_experts=3)},
        )
    with pytest.raises(ValueError, match="at least one gate"):
        MultiGateMixture(experts=ExpertBank(num_experts=4, dims=[6, 5]), gates={})


def test_forward_all_projected_rejects_wrong_width() -> None:
    bank = ExpertBank(num_experts=2, dims=[4, 3, 4], activation="silu")
    assert bank.first_layer_weight().shape == (4, 2 * 3)
    with pytest.raises(ValueError, match=r"first-layer products must be \(T, 6\)"):
        bank.forward_all_projected(torch.randn(5, 7))


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
