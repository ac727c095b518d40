"""Upcycling a trained dense LM keeps its loss at step 0, for every supported combination."""

from __future__ import annotations

import copy

import pytest
import torch

from mtl.data.text import TextDataModule
from mtl.models.lm import TransformerLM, freeze_all_but_experts, upcycle_transformer
from mtl.models.lm.upcycling import copy_ffn, split_ffn
from mtl.moe.gates import ConstantGate

E = 8
BLOCK = 32


@pytest.fixture(scope="module")
def trained() -> tuple[TransformerLM, torch.Tensor, torch.Tensor, float]:
    """A 2-layer dense LM trained 60 steps on the embedded corpus, a val batch, its loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = TextDataModule(path=None, block_size=BLOCK, batch_size=16, steps_per_epoch=60)
    dm.setup("fit")
    lm = TransformerLM(
        vocab_size=dm.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=128, max_seq_len=BLOCK
    )
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for batch in dm.train_dataloader():
        loss = lm(batch[0], batch[1]).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    val = dm.tokens("val")[: 16 * (BLOCK + 1)].view(16, BLOCK + 1)
    x, y = val[:, :-1], val[:, 1:]
    with torch.no_grad():
        dense_loss = lm(x, y).loss
    assert dense_loss is not None and float(dense_loss) < 2.7  # it learned something
    torch.set_num_threads(threads)
    return lm, x, y, float(dense_loss)


# (method, k, renormalize): every combination the defaults accept
SUPPORTED = [
    *[("copy", k, r) for k in (1, 2, E) for r in (True, False)],
    ("split", E, True),
    ("split", E, False),
]


def _upcycled(lm: TransformerLM, method: str, k: int, renormalize: bool) -> TransformerLM:
    model = copy.deepcopy(lm)
    make = copy_ffn if method == "copy" else split_ffn
    upcycle_transformer(
        model,
        make_moe=lambda f, i: make(f, num_experts=E, k=k, renormalize=renormalize, seed=i),
    )
    return model


@pytest.mark.parametrize(("method", "k", "renormalize"), SUPPORTED)
def test_upcycled_loss_at_step_0_is_the_dense_loss(
    trained: tuple[TransformerLM, torch.Tensor, torch.Tensor, float],
    method: str,
    k: int,
    renormalize: bool,
) -> None:
    lm, x, y, dense_loss = trained
    model = _upcycled(lm, method, k, renormalize)
    with torch.no_grad():
        loss = float(model(x, y).loss)  # type: ignore[arg-type]
    assert abs(loss / dense_loss - 1.0) < 0.01, (loss, dense_loss)


def test_split_with_all_experts_at_unit_weight_reproduces_dense_logits(
    trained: tuple[TransformerLM, torch.Tensor, torch.Tensor, float],
) -> None:
    lm, x, _, _ = trained
    model = copy.deepcopy(lm)
    upcycle_transformer(
        model, make_moe=lambda f, i: split_ffn(f, num_experts=E, gate=ConstantGate(num_experts=E))
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, lm(x).logits, atol=4e-5, rtol=1e-5)


def test_split_with_top_k_of_e_is_refused_by_default(
    trained: tuple[TransformerLM, torch.Tensor, torch.Tensor, float],
) -> None:
    with pytest.raises(ValueError, match="k=2 of E=8"):
        _upcycled(trained[0], "split", 2, True)


def test_expert_only_fine_tuning_trains_the_new_router(
    trained: tuple[TransformerLM, torch.Tensor, torch.Tensor, float],
) -> None:
    lm, x, y, _ = trained
    model = _upcycled(lm, "copy", 2, True).train()
    counts = freeze_all_but_experts(model)
    assert not model.embed.weight.requires_grad
    out = model(x, y)
    assert out.loss is not None
    (out.loss + out.aux_loss).backward()
    for layer in model.moe_layers().values():
        grad = layer.gate.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        assert layer.experts.w_up.grad is not None
    assert model.embed.weight.grad is None
    routers = sum(g.gate.proj.weight.numel() for g in model.moe_layers().values())
    assert counts.trainable == routers + sum(
        p.numel() for g in model.moe_layers().values() for p in g.experts.parameters()
    )
