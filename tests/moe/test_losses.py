import math

import pytest
import torch

from mtl.moe import (
    cv_squared,
    importance_loss,
    load_balance_loss,
    router_entropy_loss,
    router_z_loss,
)


@pytest.mark.parametrize(("E", "k"), [(2, 1), (8, 2), (64, 8)])
def test_load_balance_is_one_for_uniform_routing(E: int, k: int) -> None:
    T = E * 4
    probs = torch.full((T, E), 1.0 / E)
    experts = (torch.arange(T * k) % E).view(T, k)  # every expert gets T*k/E slots
    assert load_balance_loss(probs, experts).item() == pytest.approx(1.0)


def test_load_balance_grows_with_imbalance() -> None:
    E, T = 4, 100
    values = []
    for skew in (0.0, 1.0, 3.0, 10.0):
        logits = torch.zeros(T, E)
        logits[:, 0] = skew
        probs = torch.softmax(logits, -1)
        experts = torch.topk(probs + torch.rand(T, E) * 1e-3, 1).indices
        values.append(load_balance_loss(probs, experts).item())
    assert values == sorted(values) and values[-1] > 3.5  # -> E when one expert takes all


def test_load_balance_matches_formula_and_gradient_flows_through_probs_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(10, 3, requires_grad=True)
    probs = torch.softmax(logits, -1)
    experts = torch.tensor([[0], [0], [1], [2], [0], [1], [0], [0], [2], [1]])
    f = torch.tensor([5, 3, 2]) / 10
    expected = 3 * (f * probs.mean(0)).sum()
    loss = load_balance_loss(probs, experts)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().sum() > 0


def test_load_balance_ignores_invalid_slots() -> None:
    probs = torch.full((2, 2), 0.5)
    experts = torch.tensor([[0, 1], [0, 1]])
    valid = torch.tensor([[True, False], [True, False]])
    # only expert 0 counted: f = (1, 0) -> 2 * 0.5 = 1.0 ... and all on expert 0
    assert load_balance_loss(probs, experts, valid).item() == pytest.approx(1.0)
    probs2 = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert load_balance_loss(probs2, experts, valid).item() == pytest.approx(1.8)


def test_z_loss_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_cv_losses() -> None:
    assert cv_squared(torch.ones(5)).item() == 0.0
    assert cv_squared(torch.tensor([0.0, 2.0])).item() == pytest.approx(1.0)
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert importance_loss(w).item() == pytest.approx(1.0)


def test_entropy_loss() -> None:
    assert router_entropy_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4))
    assert router_entropy_loss(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_load_balance_under_bf16_autocast() -> None:
    from mtl.moe import DroplessDispatch, MoELayer, SwiGLUExperts, TopKGate

    torch.manual_seed(0)
    layer = MoELayer(
        gate=TopKGate(d_model=8, num_experts=4, k=2),
        experts=SwiGLUExperts(num_experts=4, d_model=8, d_hidden=8),
        dispatch=DroplessDispatch(),
        aux_loss_weights={"load_balance": 1.0},
    )
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    # outside the region, as torch.amp asks: inside, the backward matmuls run in bf16
    out.aux_loss.backward()
    r = out.routing
    torch.testing.assert_close(out.aux_loss, load_balance_loss(r.probs_TE, r.experts_TK))
    # the router runs in float32 under autocast: its gradient is the float32 run's
    grad = layer.gate.proj.weight.grad
    layer.zero_grad()
    plain = layer(x)
    assert torch.equal(plain.routing.experts_TK, r.experts_TK)
    plain.aux_loss.backward()
    assert grad is not None and grad.abs().sum() > 1e-3
    torch.testing.assert_close(grad, layer.gate.proj.weight.grad)


def test_losses_of_no_tokens_are_zero() -> None:
    """A rank without tokens: 0, not the NaN of a mean over nothing."""
    logits = torch.zeros(0, 4, requires_grad=True)
    probs = torch.softmax(logits, -1)
    experts = torch.zeros(0, 2, dtype=torch.long)
    counts = torch.tensor([3, 1, 0, 2])  # other ranks' assignments
    for loss in (
        load_balance_loss(probs, experts),
        load_balance_loss(probs, experts, counts_E=counts, num_tokens=3, num_ranks=2),
        router_z_loss(logits),
        router_z_loss(logits, num_tokens=3, num_ranks=2),
        router_entropy_loss(probs),
    ):
        assert loss.item() == 0.0


@pytest.mark.parametrize("sizes", [[1, 9], [4, 0, 6], [10]])
def test_group_shares_average_to_the_global_loss(sizes: list[int]) -> None:
    """Ranks holding uneven parts of a batch: mean of their shares = loss of the batch (and grads)."""
    torch.manual_seed(0)
    E, R, T = 5, len(sizes), sum(sizes)
    logits = torch.randn(T, E, requires_grad=True)
    probs = torch.softmax(logits, -1)
    experts = torch.topk(probs, 2).indices
    valid = torch.rand(T, 2) > 0.2
    counts = torch.bincount(experts[valid], minlength=E)
    # naive global references
    f = counts.float() / counts.sum()
    want = {
        "load_balance": E * (f * probs.mean(0)).sum(),
        "z_loss": torch.logsumexp(logits, -1).square().mean(),
        "entropy": -(probs * probs.log()).sum(-1).mean(),
    }
    shares: dict[str, list[torch.Tensor]] = {k: [] for k in want}
    for rows in torch.arange(T).split(sizes):
        group = {"num_tokens": torch.tensor(T), "num_ranks": torch.tensor(R)}
        p, lg = probs[rows], logits[rows]
        shares["load_balance"].append(
            load_balance_loss(p, experts[rows], valid[rows], counts_E=counts, **group)
        )
        shares["z_loss"].append(router_z_loss(lg, **group))
        shares["entropy"].append(router_entropy_loss(p, **group))
    for key, value in want.items():
        mean = torch.stack(shares[key]).mean()
        torch.testing.assert_close(mean, value)
        (g_want,) = torch.autograd.grad(value, logits, retain_graph=True)
        (g_got,) = torch.autograd.grad(mean, logits, retain_graph=True)
        torch.testing.assert_close(g_got, g_want)
