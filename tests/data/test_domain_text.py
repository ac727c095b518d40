"""Token blocks tagged with their text's domain id, and an LM run that routes on them."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mtl.data.domain_text import DomainTextDataModule
from mtl.models.lm import MoEFFN, TransformerLM
from mtl.moe import SwiGLUExperts, TopKGate
from mtl.training.lm_module import LMModule


@pytest.fixture
def dm(tmp_path: Path) -> DomainTextDataModule:
    (tmp_path / "a.txt").write_text("abcab cabca " * 40)
    (tmp_path / "b.txt").write_text("xyzzy zyxxy " * 30)
    dm = DomainTextDataModule(
        paths=[tmp_path / "a.txt", tmp_path / "b.txt"],
        block_size=8,
        batch_size=4,
        steps_per_epoch=5,
    )
    dm.setup("fit")
    return dm


def _is_window(row: torch.Tensor, tokens: torch.Tensor) -> bool:
    windows = tokens.unfold(0, len(row), 1)
    return bool((windows == row).all(1).any())


def test_every_training_row_comes_from_its_domain(dm: DomainTextDataModule) -> None:
    train_a, train_b = (t for t, _ in dm._domain_splits)
    for batch in dm.train_dataloader():
        assert batch.domains.tolist() == [0, 1, 0, 1]
        for row_in, row_out, d in zip(batch.inputs, batch.targets, batch.domains, strict=True):
            tokens = train_a if int(d) == 0 else train_b
            assert _is_window(torch.cat([row_in, row_out[-1:]]), tokens)
            assert torch.equal(row_in[1:], row_out[:-1])


def test_validation_covers_each_domain_once(dm: DomainTextDataModule) -> None:
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for batch in dm.val_dataloader():
        for row, d in zip(batch.inputs, batch.domains, strict=True):
            seen[int(d)].append(row)
    for d, (_, val) in enumerate(dm._domain_splits):
        n_blocks = (len(val) - 1) // 8
        assert torch.equal(torch.cat(seen[d]), val[: n_blocks * 8])
    assert dm.tokenizer.decode(dm._domain_splits[1][0][:5].tolist()) == "xyzzy"


@pytest.mark.parametrize("route_on", ["domain", "input"])
def test_lm_trains_on_domain_batches(dm: DomainTextDataModule, route_on: str) -> None:
    """A domain-routed LM gets the ids; a token-routed one trains on the same batches without."""
    torch.manual_seed(0)
    moe = MoEFFN(
        num_experts=4,
        gate=partial(TopKGate, k=1),
        experts=partial(SwiGLUExperts, d_hidden=8),
        route_on=route_on,
        num_domains=2,
        domain_dim=4,
    )
    net = TransformerLM(
        vocab_size=dm.vocab_size, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8, moe=moe
    )
    module = LMModule(net=net, tokenizer=dm.tokenizer)
    batch = next(iter(dm.train_dataloader()))
    out = module(batch.inputs, batch.targets, batch.domains)
    assert out.loss is not None and torch.isfinite(out.loss)
    pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=2,
    ).fit(module, datamodule=dm)
    if route_on == "domain":
        with pytest.raises(ValueError, match="pass domain_B"):
            net(batch.inputs)  # no default domain: the ids are required
