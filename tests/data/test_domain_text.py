"""Token blocks tagged with their text's domain id, and an LM run that routes on them."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from mtl.data.domain_text import DomainBlockLoader, DomainTextDataModule
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
    assert out.loss is not None
    want = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten())
    torch.testing.assert_close(out.loss, want)
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


# ------------------------------------------------------------ data-parallel training rows


def _domain_tokens() -> list[torch.Tensor]:
    # distinct token values per domain and position: a row's first input names its window
    return [torch.arange(60), torch.arange(1000, 1045), torch.arange(2000, 2050)]


@pytest.mark.parametrize(("world", "batch"), [(2, 3), (2, 6), (3, 2), (4, 3)])
def test_ranks_read_disjoint_slices_of_the_single_process_global_batch(
    world: int, batch: int
) -> None:
    kw = {"tokens": _domain_tokens(), "block_size": 5, "steps": 4, "seed": 7}
    ranks = [
        list(DomainBlockLoader(**kw, batch_size=batch, rank=r, world_size=world))
        for r in range(world)
    ]
    single = list(DomainBlockLoader(**kw, batch_size=world * batch))
    for s, global_batch in enumerate(single):
        parts = [ranks[r][s] for r in range(world)]
        for field in ("inputs", "targets", "domains"):
            joined = torch.cat([getattr(p, field) for p in parts])
            assert torch.equal(joined, getattr(global_batch, field)), (s, field)
        firsts = [int(x) for p in parts for x in p.inputs[:, 0]]
        assert len(set(firsts)) == len(firsts)  # no block on two ranks
        assert global_batch.domains.tolist() == [j % 3 for j in range(world * batch)]
        assert all(int(x) // 1000 == d for x, d in zip(firsts, global_batch.domains, strict=True))
    # no window twice in the epoch: 4 steps * at most 8 rows per domain <= its 41 windows
    seen = [int(x) for batches in ranks for b in batches for x in b.inputs[:, 0]]
    assert len(set(seen)) == len(seen) == 4 * world * batch


def test_domain_loader_epochs_and_seeds_differ_and_resume() -> None:
    def first_rows(seed: int, epoch: int) -> list[int]:
        loader = DomainBlockLoader(
            tokens=_domain_tokens(), block_size=5, batch_size=6, steps=2, seed=seed
        )
        loader.set_epoch(epoch)
        return [int(x) for b in loader for x in b.inputs[:, 0]]

    assert first_rows(0, 0) == first_rows(0, 0)
    assert first_rows(0, 0) != first_rows(0, 1)
    assert first_rows(0, 0) != first_rows(1, 0)
    loader = DomainBlockLoader(tokens=_domain_tokens(), block_size=5, batch_size=6, steps=2)
    list(loader)
    assert [int(x) for b in loader for x in b.inputs[:, 0]] == first_rows(0, 1)


def test_domain_loader_checks_rank_and_block_size() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        DomainBlockLoader(
            tokens=_domain_tokens(), block_size=5, batch_size=2, steps=1, rank=2, world_size=2
        )
    with pytest.raises(ValueError, match=r"block_size=50 .*domain 1.* only 45 tokens"):
        DomainBlockLoader(tokens=_domain_tokens(), block_size=50, batch_size=2, steps=1)


def test_datamodule_passes_rank_and_world_size(dm: DomainTextDataModule) -> None:
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)  # type: ignore[assignment]
    loader = dm.train_dataloader()
    assert (loader.rank, loader.world_size) == (1, 2)
    val = dm.val_dataloader()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)  # type: ignore[assignment]
    assert len(dm.val_dataloader()) == len(val)


# ------------------------------------------------------------ whole groups (batch_multiple)


def _group_dm(tmp_path: Path, **kw: int) -> DomainTextDataModule:
    # val splits of 48 and 37 characters: 11 and 9 blocks of 4
    (tmp_path / "a.txt").write_text("abcab cabca " * 40)
    (tmp_path / "b.txt").write_text("xyzzy zyxxy " * 31)
    dm = DomainTextDataModule(
        paths=[tmp_path / "a.txt", tmp_path / "b.txt"], block_size=4, steps_per_epoch=6, **kw
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("world", "multiple"), [(1, 2), (1, 4), (2, 2), (2, 4), (3, 2)])
def test_batch_multiple_gives_whole_groups_and_drops_only_each_domains_tail(
    tmp_path: Path, world: int, multiple: int
) -> None:
    dm = _group_dm(tmp_path, batch_size=8, val_batch_size=4, batch_multiple=multiple)
    plain = _group_dm(tmp_path, batch_size=8, val_batch_size=4)
    val_counts = []
    for rank in range(world):
        for module in (dm, plain):
            module.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # type: ignore[assignment]
        # training: batch_size rows, the batches the module serves without batch_multiple
        train = list(dm.train_dataloader())
        assert all(len(b.inputs) % multiple == 0 for b in train)
        for got, want in zip(train, plain.train_dataloader(), strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        # validation: whole groups, rank r reads blocks r, r + W, .. of each domain's kept blocks
        val = list(dm.val_dataloader())
        val_counts.append(len(val))
        assert len(val) == len(dm.val_dataloader())
        assert all(0 < len(b.inputs) <= 4 and len(b.inputs) % multiple == 0 for b in val)
        for d, (_, tokens) in enumerate(dm._domain_splits):
            n_blocks = (len(tokens) - 1) // 4
            kept = n_blocks - n_blocks % (world * multiple)
            assert 0 <= n_blocks - kept < world * multiple
            blocks = tokens[: kept * 4].view(kept, 4)[rank::world]
            rows = torch.cat([b.inputs[b.domains == d] for b in val])
            targets = torch.cat([b.targets[b.domains == d] for b in val])
            assert torch.equal(rows, blocks), (rank, d)
            assert torch.equal(targets, tokens[1 : kept * 4 + 1].view(kept, 4)[rank::world])
            # the same blocks as without batch_multiple, less the dropped tail
            plain_rows = torch.cat([b.inputs[b.domains == d] for b in plain.val_dataloader()])
            assert torch.equal(plain_rows[: len(rows)], rows)
    assert len(set(val_counts)) == 1  # every rank the same number of batches


def test_batch_multiple_refuses_a_domain_too_short_for_a_group(tmp_path: Path) -> None:
    dm = _group_dm(tmp_path, batch_size=8, batch_multiple=8)  # 11 and 9 val blocks
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)  # type: ignore[assignment]
    with pytest.raises(
        ValueError, match=r"domain 0: the val split has 11 blocks .* fewer than the 16"
    ):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="multiples of batch_multiple=8"):
        _group_dm(tmp_path, batch_size=8, val_batch_size=4, batch_multiple=8)


def test_mixture_of_tokens_trains_on_domain_batches(tmp_path: Path) -> None:
    """experiment=lm_mot with data=lm_domains: every train and val batch whole groups of 4."""
    from mtl.training.config import compose_config
    from mtl.training.train import train

    (tmp_path / "a.txt").write_text("abcab cabca " * 40)
    (tmp_path / "b.txt").write_text("xyzzy zyxxy " * 31)
    cfg = compose_config(
        "train",
        [
            "experiment=lm_mot",
            "data=lm_domains",
            f"data.paths=[{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}]",
            "data.block_size=4",
            "data.batch_size=8",
            "data.steps_per_epoch=3",
            "trainer.max_steps=3",
            "trainer.enable_progress_bar=false",
            "model.d_model=8",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.moe.num_experts=2",
            "model.moe.group_size=4",
            "model.moe.experts.d_hidden=8",
            "generate.max_new_tokens=4",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.data.batch_multiple == 4
    res = train(cfg)
    assert res["global_step"] == 3
    assert math.isfinite(res["val_loss"]) and res["val_loss"] > 0
