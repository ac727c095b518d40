"""Tests for mtl.data.text (token datasets) and mtl.data.text_corpus (embedded corpus)."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl.data.text import (
    PackedBlockLoader,
    RandomBlockLoader,
    TextDataModule,
    bigram_cross_entropy,
    load_text,
    split_tokens,
    unigram_cross_entropy,
)
from mtl.data.text_corpus import default_corpus, generate_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]


def _distinct_tokens(n: int) -> torch.Tensor:
    """Token stream where every position has a different value, so a wrong slice shows."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)) + 1000


# ---------------------------------------------------------------- reading and splitting


def test_load_text_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "input.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_text(missing)


@pytest.mark.parametrize("content", ["", "  \n\t\n  "])
def test_load_text_empty_or_whitespace_file_names_path(tmp_path: Path, content: str) -> None:
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(f)) + ".*empty or only whitespace"):
        load_text(f)


def test_load_text_rejects_non_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_text(f)


def test_relative_path_resolves_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.txt").write_text("abcabcabc" * 20)
    monkeypatch.chdir(tmp_path)
    dm = TextDataModule(path="sub/t.txt", block_size=4, batch_size=2)
    assert dm.vocab_size == 3
    assert dm.tokenizer.decode(torch.cat([dm.tokens("train"), dm.tokens("val")])) == "abc" * 60


def test_split_is_contiguous_with_val_last() -> None:
    tokens = torch.arange(1000)
    train, val = split_tokens(tokens, 0.1)
    assert torch.equal(train, torch.arange(900)) and torch.equal(val, torch.arange(900, 1000))
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 1.0)


# ---------------------------------------------------------------- random training batches


def test_random_batches_are_shifted_windows_of_the_stream() -> None:
    tokens = _distinct_tokens(500)
    loader = RandomBlockLoader(tokens=tokens, block_size=16, batch_size=8, steps=5, seed=3)
    offsets = loader.offsets(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for batch, row in zip(batches, offsets, strict=True):
        x, y = batch
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for b, off in enumerate(row.tolist()):
            assert torch.equal(x[b], tokens[off : off + 16])
            assert torch.equal(y[b], tokens[off + 1 : off + 17])


def test_random_offsets_reach_both_ends_of_the_split() -> None:
    loader = RandomBlockLoader(tokens=torch.arange(20), block_size=5, batch_size=64, steps=10)
    offsets = loader.offsets(0)
    # The last full window starts at N - T - 1 = 14; its last target is the last token.
    assert offsets.min() == 0 and offsets.max() == 14
    assert max(int(b.targets.max()) for b in loader) == 19


def test_random_batches_same_seed_same_batches_new_epoch_new_batches() -> None:
    tokens = _distinct_tokens(2000)

    def make(seed: int) -> RandomBlockLoader:
        return RandomBlockLoader(tokens=tokens, block_size=8, batch_size=4, steps=3, seed=seed)

    a, b = make(0), make(0)
    epoch0_a, epoch0_b = [t.inputs for t in a], [t.inputs for t in b]
    assert all(torch.equal(p, q) for p, q in zip(epoch0_a, epoch0_b, strict=True))
    epoch1_a = [t.inputs for t in a]
    assert not torch.equal(epoch0_a[0], epoch1_a[0])
    other = [t.inputs for t in make(1)]
    assert not torch.equal(epoch0_a[0], other[0])
    # set_epoch replays an epoch exactly (what a resume does).
    b.set_epoch(1)
    assert all(torch.equal(p, t.inputs) for p, t in zip(epoch1_a, b, strict=True))


# ---------------------------------------------------------------- packed validation blocks


def test_packed_blocks_cover_split_without_overlap() -> None:
    tokens = _distinct_tokens(1003)
    loader = PackedBlockLoader(tokens=tokens, block_size=10, batch_size=32)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(100 / 32)
    assert [len(b.inputs) for b in batches] == [32, 32, 32, 4]
    inputs = torch.cat([b.inputs for b in batches]).reshape(-1)
    targets = torch.cat([b.targets for b in batches]).reshape(-1)
    # Consecutive, non-overlapping: the flattened blocks are the stream itself.
    assert torch.equal(inputs, tokens[:1000])
    assert torch.equal(targets, tokens[1:1001])
    assert len(set(targets.tolist())) == 1000  # every target exactly once


def test_packed_blocks_shard_across_ranks() -> None:
    tokens = torch.arange(101)
    shards = [
        PackedBlockLoader(tokens=tokens, block_size=10, batch_size=3, rank=r, world_size=2)
        for r in range(2)
    ]
    starts = sorted(int(b.inputs[i, 0]) for s in shards for b in s for i in range(len(b.inputs)))
    assert starts == list(range(0, 100, 10))


def test_block_size_too_large_names_block_size_and_token_count() -> None:
    with pytest.raises(ValueError, match=r"block_size=50 .* only 50 tokens"):
        PackedBlockLoader(tokens=torch.arange(50), block_size=50, batch_size=1)
    with pytest.raises(ValueError, match=r"block_size=64 .*train split.* only 30 tokens"):
        RandomBlockLoader(tokens=torch.arange(30), block_size=64, batch_size=1, steps=1)


def test_datamodule_block_size_too_large_for_val_split(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 10)  # 100 tokens: 90 train, 10 val
    dm = TextDataModule(path=f, block_size=20, batch_size=2, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"block_size=20 .*val split.* only 10 tokens"):
        dm.setup("fit")


# ---------------------------------------------------------------- entropy references


def test_unigram_entropy_matches_hand_computation(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("aaabab")  # val_fraction 1/3: train "aaab", val "ab"
    dm = TextDataModule(path=f, block_size=1, batch_size=1, val_fraction=1 / 3)
    # add-one counts from train: a = 3 + 1, b = 1 + 1, total 6
    expected = -(math.log(4 / 6) + math.log(2 / 6)) / 2
    assert dm.unigram_entropy("val") == pytest.approx(expected, abs=1e-12)
    expected_train = -(3 * math.log(4 / 6) + math.log(2 / 6)) / 4
    assert dm.unigram_entropy("train") == pytest.approx(expected_train, abs=1e-12)


def test_unigram_and_bigram_smoothing_cover_unseen_tokens() -> None:
    # vocab 3, token 2 never in train: p(2) = 1 / (4 + 3)
    assert unigram_cross_entropy(torch.tensor([0, 0, 1, 1]), torch.tensor([2]), 3) == (
        pytest.approx(math.log(7))
    )
    # train pairs: (0,1) (1,0) (0,1); p(1 | 0) = (2 + 1) / (2 + 3), p(2 | 1) = (0 + 1) / (1 + 3)
    h = bigram_cross_entropy(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2]), 3)
    assert h == pytest.approx(-(math.log(3 / 5) + math.log(1 / 4)) / 2)


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_is_deterministic() -> None:
    text = default_corpus()
    assert generate_corpus() == text
    assert 300_000 <= len(text) <= 500_000
    # Pinned: a change here changes the char vocabulary stored in checkpoints.
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "9d9987b24b51633d"
    assert generate_corpus(seed=1, n_chars=20_000) != generate_corpus(seed=2, n_chars=20_000)
    assert generate_corpus(seed=1, n_chars=20_000) == generate_corpus(seed=1, n_chars=20_000)


def test_embedded_corpus_has_learnable_structure() -> None:
    text = default_corpus()
    words = re.findall(r"[a-z]+", text.lower())
    assert 200 <= len(set(words)) <= 1000  # a few hundred words
    dm = TextDataModule(path=None, block_size=128, batch_size=4)
    unigram, bigram = dm.unigram_entropy(), dm.bigram_entropy()
    # Measured 3.05 vs 2.18 nats: one character of context already removes ~30%.
    assert unigram > 2.5
    assert bigram < 0.8 * unigram


def test_embedded_corpus_needs_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dm = TextDataModule(path=None, block_size=32, batch_size=4, steps_per_epoch=2)
    dm.setup("fit")
    assert dm.source == "<embedded corpus>"
    assert dm.tokenizer.decode(dm.tokens("val")) == default_corpus()[-len(dm.tokens("val")) :]


# ---------------------------------------------------------------- data module


def test_datamodule_same_seed_same_batches_and_state_round_trip() -> None:
    def make(seed: int) -> TextDataModule:
        return TextDataModule(path=None, block_size=32, batch_size=4, steps_per_epoch=3, seed=seed)

    a, b = make(7), make(7)
    batches_a = [x for x, _ in a.train_dataloader()]
    assert all(torch.equal(p, x) for p, (x, _) in zip(batches_a, b.train_dataloader(), strict=True))
    assert not torch.equal(batches_a[0], next(iter(make(8).train_dataloader())).inputs)
    # A module resumed from `a`'s state continues with epoch 1's batches.
    state = a.state_dict()
    assert state["train_epoch"] == 1 and state["fingerprint"] == a.tokenizer.fingerprint()
    resumed = make(7)
    resumed.load_state_dict(state)
    reference = make(7).train_dataloader()
    reference.set_epoch(1)
    assert all(
        torch.equal(p.inputs, q.inputs)
        for p, q in zip(resumed.train_dataloader(), reference, strict=True)
    )


def test_datamodule_refuses_checkpoint_with_other_vocabulary(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("xyz " * 100)
    state = TextDataModule(path=f, block_size=8, batch_size=2).state_dict()
    dm = TextDataModule(path=None, block_size=8, batch_size=2)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        dm.load_state_dict(state)


def test_datamodule_validation_loader_is_the_val_split() -> None:
    dm = TextDataModule(path=None, block_size=100, batch_size=8, val_batch_size=16)
    val = dm.tokens("val")
    loader = dm.val_dataloader()
    x = torch.cat([b.inputs for b in loader]).reshape(-1)
    assert len(x) == (len(val) - 1) // 100 * 100
    assert torch.equal(x, val[: len(x)])
    assert max(len(b.inputs) for b in loader) == 16


def test_shakespeare_datamodule_from_hydra_config(
    shakespeare_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTL_SHARED_DATA", str(shakespeare_path.parents[1]))
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "data" / "lm_shakespeare.yaml")
    dm = instantiate(cfg)
    assert isinstance(dm, TextDataModule)
    assert dm.vocab_size == 65 and dm.block_size == 128 and dm.batch_size == 32
    train, val = dm.tokens("train"), dm.tokens("val")
    assert len(train) + len(val) == 1_115_394
    assert len(val) == round(1_115_394 * 0.1)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert dm.tokenizer.decode(val) == text[len(train) :]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 128) and torch.equal(x[:, 1:], y[:, :-1])
    # Character-level Shakespeare unigram entropy is ~3.3 nats (4.8 bits).
    assert 3.2 < dm.unigram_entropy() < 3.5


def test_embedded_hydra_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    dm = instantiate(OmegaConf.load(REPO_ROOT / "conf" / "data" / "lm_embedded.yaml"))
    assert dm.path is None and dm.vocab_size == 60


def test_lightning_trains_a_bigram_model_below_unigram_entropy(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    dm = TextDataModule(path=None, block_size=32, batch_size=32, steps_per_epoch=20)

    class Bigram(pl.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.logits = torch.nn.Embedding(vocab_size, vocab_size)

        def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return self._loss(batch)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.3)

    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(Bigram(dm.vocab_size), dm)
    assert trainer.num_val_batches == [len(dm.val_dataloader())]
    val_loss = float(trainer.callback_metrics["val_loss"])
    assert val_loss < dm.unigram_entropy() - 0.5
