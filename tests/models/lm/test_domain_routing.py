"""Condition routing in the LM: gates that see the sequence's domain (moe.route_on=domain)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import SwiGLUExperts, TopKGate

V, D, T = 30, 16, 12


def _lm(route_on: str = "domain") -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=4,
        gate=partial(TopKGate, k=2, renormalize=True),
        experts=partial(SwiGLUExperts, d_hidden=16),
        route_on=route_on,
        num_domains=2 if route_on == "domain" else 0,
        domain_dim=8,
    )
    return TransformerLM(
        vocab_size=V, d_model=D, n_layers=2, n_heads=2, d_ff=32, moe=moe, max_seq_len=T
    )


def _routing(lm: TransformerLM, idx: torch.Tensor, domain: torch.Tensor) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        out = lm(idx, domain_B=domain, return_routing=True)
    return {i: r.dense_weights() for i, r in out.routing.items()}


def test_routing_depends_only_on_the_domain() -> None:
    lm = _lm().eval()
    a = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(2))
    same = torch.tensor([0, 1, 1])
    w_a, w_b = _routing(lm, a, same), _routing(lm, b, same)
    for i in (0, 1):
        # other tokens, same domains: the same routing for every token
        assert torch.equal(w_a[i], w_b[i])
        w_BTE = w_a[i].view(3, T, 4)
        assert torch.equal(w_BTE, w_BTE[:, :1].expand_as(w_BTE))
        # the gate on the domain's embedding, by hand
        emb = lm.domain_embed.embed.weight[1]
        gate = lm.layers[i].ffn.gate
        expected = gate(emb[None]).dense_weights()[0]
        torch.testing.assert_close(w_BTE[1, 0], expected)
    # other domains: another routing (while the outputs still depend on the tokens)
    w_c = _routing(lm, a, torch.tensor([1, 0, 1]))
    assert not torch.equal(w_c[0].view(3, T, 4)[0], w_a[0].view(3, T, 4)[0])
    with torch.no_grad():
        assert not torch.allclose(lm(a, domain_B=same).logits, lm(b, domain_B=same).logits)


def test_gradients_reach_the_domain_embedding() -> None:
    """Each domain's gradient row against a central difference along that row."""
    lm = _lm()
    # At the default init the routing barely moves the loss (gradients near 1e-6, below
    # what a float32 difference resolves): larger routers and experts make it count.
    with torch.no_grad():
        lm.domain_embed.embed.weight.normal_(0.0, 1.0)
        for layer in lm.layers:
            layer.ffn.gate.proj.weight.normal_(0.0, 0.5)
            for w in layer.ffn.experts.parameters():
                w.normal_(0.0, 0.5)
    idx = torch.randint(0, V, (4, T))
    domain = torch.tensor([0, 1, 0, 1])

    def loss() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = lm(idx, idx, domain_B=domain, return_routing=True)
        assert out.loss is not None
        return out.loss + out.aux_loss, [r.experts_TK for r in out.routing.values()]

    value, experts = loss()
    value.backward()
    weight = lm.domain_embed.embed.weight
    grad = weight.grad
    assert grad is not None and (grad.abs().sum(1) > 1e-3).all()
    eps = 0.03
    for d in (0, 1):
        step = torch.zeros_like(weight)
        step[d] = eps * grad[d] / grad[d].norm()
        with torch.no_grad():
            weight.add_(step)
            up, experts_up = loss()
            weight.sub_(2 * step)
            down, experts_down = loss()
            weight.add_(step)
        # the same experts chosen on both sides: the loss is smooth between them
        assert all(map(torch.equal, experts, experts_up))
        assert all(map(torch.equal, experts, experts_down))
        slope = (up - down) / (2 * eps)  # along the row's gradient: its norm
        assert float(slope) == pytest.approx(float(grad[d].norm()), rel=1e-2)


def test_domain_routed_lm_overfits_a_batch() -> None:
    """The domain-routed LM trains: it fits a small batch of two domains."""
    lm = _lm()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (4, T + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    domain = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = float(lm(x, y, domain_B=domain).loss)  # type: ignore[arg-type]
    for _ in range(150):
        out = lm(x, y, domain_B=domain)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()  # type: ignore[operator]
        opt.step()
    with torch.no_grad():
        final = float(lm(x, y, domain_B=domain).loss)  # type: ignore[arg-type]
    assert initial > 3.0 and final < 0.1, (initial, final)


def test_domain_ids_are_required_exactly_when_routing_on_the_domain() -> None:
    idx = torch.randint(0, V, (2, T))
    with pytest.raises(ValueError, match="pass domain_B"):
        _lm()(idx)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        _lm()(idx, domain_B=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="3 ids for a batch of 2"):
        _lm()(idx, domain_B=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="route on the tokens"):
        _lm(route_on="input")(idx, domain_B=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="route_on must be"):
        MoEFFN(num_experts=2, gate=TopKGate, experts=SwiGLUExperts, route_on="domain")


def test_default_domain_serves_sequences_without_an_id() -> None:
    """Sampling (mtl generate) passes no ids: they route as moe.default_domain."""
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=4,
        gate=partial(TopKGate, k=2),
        experts=partial(SwiGLUExperts, d_hidden=16),
        route_on="domain",
        num_domains=2,
        default_domain=1,
    )
    lm = TransformerLM(vocab_size=V, d_model=D, n_layers=1, n_heads=2, d_ff=32, moe=moe).eval()
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(lm(idx).logits, lm(idx, domain_B=torch.tensor([1, 1])).logits)
        assert not torch.allclose(lm(idx).logits, lm(idx, domain_B=torch.tensor([0, 0])).logits)
