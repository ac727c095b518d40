import dataclasses

import pytest
import torch

from mtl.moe import (
    DenseSoftmaxGate,
    ExpertChoiceGate,
    NoisyTopKGate,
    SigmoidBiasGate,
    TopKGate,
    TopPGate,
)


def _logits_gate(gate, logits_TE: torch.Tensor):
    """Route given logits directly (bypasses the projection)."""
    return gate.route(logits_TE.float(), torch.zeros(logits_TE.shape[0], gate.d_model))


def test_dense_gate_weights_sum_to_one_and_mask_blocks_experts_and_gradients() -> None:
    torch.manual_seed(0)
    gate = DenseSoftmaxGate(d_model=6, num_experts=5, expert_mask=[0, 2, 3])
    x = torch.randn(10, 6, requires_grad=True)
    w_TE = gate(x).dense_weights()
    torch.testing.assert_close(w_TE.sum(-1), torch.ones(10))
    assert torch.all(w_TE[:, [1, 4]] == 0)
    y_ETD = torch.randn(5, 10, 3, requires_grad=True)
    out = torch.einsum("etd,te->td", y_ETD, w_TE)
    (g,) = torch.autograd.grad(out.sum(), y_ETD)
    assert torch.all(g[[1, 4]] == 0) and torch.all(g[[0, 2, 3]] != 0)


@pytest.mark.parametrize("mask", [None, [0, 2, 3]])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_dense_gate_shortcut_equals_slot_scatter_and_masked_softmax(
    mask: list[int] | None, temperature: float
) -> None:
    """The (T, E) weights a dense gate hands over equal the generic slot scatter."""
    torch.manual_seed(1)
    gate = DenseSoftmaxGate(d_model=6, num_experts=5, expert_mask=mask, temperature=temperature)
    r = gate(torch.randn(10, 6))
    scattered = dataclasses.replace(r, dense_TE=None).dense_weights()
    torch.testing.assert_close(r.dense_weights(), scattered)
    allowed = torch.zeros(5, dtype=torch.bool)
    allowed[mask if mask is not None else list(range(5))] = True
    ref = torch.softmax(r.logits_TE.masked_fill(~allowed, float("-inf")) / temperature, -1)
    torch.testing.assert_close(r.dense_weights(), ref)


def test_topk_softmax_variants() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)
    plain = _logits_gate(TopKGate(d_model=2, num_experts=4, k=2), logits)
    assert plain.experts_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(plain.weights_TK, p[:, :2])
    renorm = _logits_gate(TopKGate(d_model=2, num_experts=4, k=2, renormalize=True), logits)
    after = _logits_gate(TopKGate(d_model=2, num_experts=4, k=2, softmax_after_topk=True), logits)
    torch.testing.assert_close(renorm.weights_TK, p[:, :2] / p[:, :2].sum())
    torch.testing.assert_close(after.weights_TK, renorm.weights_TK)
    switch = _logits_gate(TopKGate(d_model=2, num_experts=4, k=1), logits)
    torch.testing.assert_close(switch.weights_TK, p[:, :1])


def test_input_jitter_only_in_training() -> None:
    torch.manual_seed(1)
    gate = TopKGate(d_model=8, num_experts=4, k=1, input_jitter=0.1)
    x = torch.randn(5, 8)
    gate.eval()
    torch.testing.assert_close(gate.logits(x), gate.logits(x))
    gate.train()
    assert not torch.allclose(gate.logits(x), gate.logits(x))


def test_logits_are_float32_for_half_inputs() -> None:
    gate = TopKGate(d_model=8, num_experts=4, k=2).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    r = gate(x)
    assert r.logits_TE.dtype == torch.float32 and r.weights_TK.dtype == torch.float32
    # the projection itself in float32, not a bf16 product cast up afterwards
    want = x.float() @ gate.proj.weight.float().T
    torch.testing.assert_close(r.logits_TE, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        r.weights_TK, torch.softmax(want, -1).gather(1, r.experts_TK), rtol=1e-6, atol=1e-6
    )


def test_logits_stay_float32_under_autocast() -> None:
    """Autocast must not pull the router projection down to bf16."""
    torch.manual_seed(0)
    gate = TopKGate(d_model=64, num_experts=8, k=2)
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(x)
    assert r.logits_TE.dtype == torch.float32
    torch.testing.assert_close(r.logits_TE, x @ gate.proj.weight.T, rtol=1e-5, atol=1e-5)


def test_top_p_keeps_experts_until_cumulative_reaches_p() -> None:
    probs = torch.tensor(
        [[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]]
    )
    r = _logits_gate(TopPGate(d_model=2, num_experts=4, p=0.7), probs.log())
    # row 0: 0.5 < 0.7, 0.8 >= 0.7 -> 2 experts; row 1: 1 expert; row 2: 0.75 -> 3 experts
    assert r.valid_TK.sum(-1).tolist() == [2, 1, 3]
    torch.testing.assert_close(r.dense_weights()[0], torch.tensor([0.5, 0.3, 0.0, 0.0]))
    one = _logits_gate(TopPGate(d_model=2, num_experts=4, p=0.01), probs.log())
    assert one.valid_TK.sum(-1).tolist() == [1, 1, 1]
    full = _logits_gate(TopPGate(d_model=2, num_experts=4, p=1.0), probs.log())
    assert full.valid_TK.sum(-1).min() >= 3


def test_expert_choice_each_expert_takes_its_top_tokens() -> None:
    torch.manual_seed(2)
    gate = ExpertChoiceGate(d_model=4, num_experts=3, capacity_factor=1.5)
    logits = torch.randn(8, 3)
    r = _logits_gate(gate, logits)
    C = gate.capacity(8)  # ceil(1.5 * 8 / 3) = 4
    assert C == 4
    assert r.valid_TK.sum(0).tolist() == [C] * 3
    probs = torch.softmax(logits, -1)
    for e in range(3):
        top = set(torch.topk(probs[:, e], C).indices.tolist())
        assert set(torch.nonzero(r.valid_TK[:, e]).flatten().tolist()) == top
    torch.testing.assert_close(r.dense_weights(), probs * r.valid_TK)


def test_noisy_topk_is_deterministic_in_eval_and_its_load_estimate_is_smooth() -> None:
    torch.manual_seed(3)
    gate = NoisyTopKGate(d_model=8, num_experts=6, k=2)
    x = torch.randn(64, 8)
    gate.eval()
    a, b = gate(x), gate(x)
    assert torch.equal(a.experts_TK, b.experts_TK)
    assert a.load_estimate_E.sum().item() == pytest.approx(64 * 2)
    gate.train()
    with torch.no_grad():
        gate.noise_proj.weight.normal_(0.0, 0.3)
    r = gate(x)
    load = r.load_estimate_E
    assert load.requires_grad and torch.all(load > 0)
    # the smooth estimate is an expected count: averaged over noise draws it
    # tracks the average real count of top-k assignments
    draws = [gate(x) for _ in range(200)]
    est = torch.stack([d.load_estimate_E.detach() for d in draws]).mean(0)
    real = torch.stack(
        [torch.bincount(d.experts_TK.flatten(), minlength=6).float() for d in draws]
    ).mean(0)
    torch.testing.assert_close(est, real, rtol=0.05, atol=0.0)
    (g,) = torch.autograd.grad(load.var(), gate.noise_proj.weight)
    assert g.abs().sum() > 0


def test_sigmoid_gate_selects_with_bias_but_weighs_without_it() -> None:
    gate = SigmoidBiasGate(d_model=2, num_experts=4, k=2)
    gate.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    logits = torch.tensor([[3.0, 2.0, 1.0, -3.0]])
    r = _logits_gate(gate, logits)
    assert sorted(r.experts_TK[0].tolist()) == [0, 3]
    s = torch.sigmoid(logits)[0]
    expected = torch.tensor([s[0], s[3]]) / (s[0] + s[3])
    got = {int(e): float(w) for e, w in zip(r.experts_TK[0], r.weights_TK[0], strict=True)}
    assert got[0] == pytest.approx(float(expected[0])) and got[3] == pytest.approx(
        float(expected[1])
    )


def test_aux_free_bias_moves_load_toward_balance() -> None:
    torch.manual_seed(4)
    E, D = 8, 16
    gate = SigmoidBiasGate(d_model=D, num_experts=E, k=2, bias_update_rate=0.01)
    with torch.no_grad():
        gate.proj.weight.mul_(0.1)
        gate.proj.weight[0] += 0.3  # skew: experts 0 gets most tokens
    x = torch.rand(512, D)

    def load() -> torch.Tensor:
        return torch.bincount(gate(x).experts_TK.flatten(), minlength=E).float()

    before = load()
    for _ in range(300):
        gate.update_bias(load())
    after = load()
    assert before.max() / before.mean() > 1.5
    assert after.max() / after.mean() < before.max() / before.mean() - 0.5
    assert abs(gate.expert_bias_E.mean().item()) < 1e-5  # centred updates


@pytest.mark.parametrize(
    ("factory", "arg"),
    [
        (lambda: TopKGate(d_model=4, num_experts=4, k=5), "k"),
        (lambda: TopKGate(d_model=4, num_experts=4, k=0), "k"),
        (lambda: NoisyTopKGate(d_model=4, num_experts=2, k=3), "k"),
        (lambda: SigmoidBiasGate(d_model=4, num_experts=2, k=3), "k"),
        (lambda: TopPGate(d_model=4, num_experts=4, p=0.0), "p must"),
        (lambda: TopPGate(d_model=4, num_experts=4, p=1.5), "p must"),
        (lambda: ExpertChoiceGate(d_model=4, num_experts=4, capacity_factor=0), "capacity_factor"),
        (
            lambda: DenseSoftmaxGate(d_model=4, num_experts=3, expert_mask=[True, False]),
            "expert_mask",
        ),
        (lambda: DenseSoftmaxGate(d_model=4, num_experts=3, expert_mask=[5]), "expert_mask"),
        (lambda: TopKGate(d_model=0, num_experts=4, k=1), "d_model"),
    ],
)
def test_bad_gate_arguments_name_the_argument(factory, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        factory()


def test_gate_input_width_mismatch() -> None:
    with pytest.raises(ValueError, match="d_model=4"):
        TopKGate(d_model=4, num_experts=2, k=1)(torch.randn(3, 5))
