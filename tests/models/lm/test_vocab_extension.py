"""Vocabulary extension: tokenizer compatibility, new rows, unchanged logits, continued training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mtl.data.tokenizers import BPETokenizer, CharTokenizer
from mtl.models.lm import TransformerLM
from mtl.models.lm.vocab_extension import VocabExtension, extend_bpe_tokenizer, resize_lm_vocab

OLD_TEXT = "the cat sat on the mat and the rat ate the hat\n" * 60
NEW_TEXT = "a frog in a bog and a dog on a log with a hog\n" * 60


@pytest.fixture(scope="module")
def ext() -> VocabExtension:
    old = BPETokenizer.train(OLD_TEXT, vocab_size=290)
    return extend_bpe_tokenizer(old, NEW_TEXT, num_new_tokens=12)


@pytest.fixture(scope="module")
def old_tok() -> BPETokenizer:
    return BPETokenizer.train(OLD_TEXT, vocab_size=290)


def _lm(vocab_size: int, *, tie: bool) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        vocab_size=vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=32, tie_embeddings=tie
    )


def test_extended_tokenizer_keeps_the_old_encoding(
    ext: VocabExtension, old_tok: BPETokenizer
) -> None:
    assert ext.vocab_size == ext.old_vocab_size + 12 == old_tok.vocab_size + 12
    for text in (OLD_TEXT[:300], NEW_TEXT[:300], "a cat in the bog ate a frog"):
        ids = ext.tokenizer.encode(text)
        assert ext.tokenizer.decode(ids) == text  # lossless round trip
        # new merges come after the old ones: undoing them gives the old ids
        assert torch.equal(ext.expand(ids), old_tok.encode(text))
    # where no new merge applies the ids are the old ones
    ids = ext.tokenizer.encode(OLD_TEXT[:300])
    assert ids.max() < ext.old_vocab_size and torch.equal(ids, old_tok.encode(OLD_TEXT[:300]))
    # the new text gets the new tokens, and fewer ids than before
    new_ids = ext.tokenizer.encode(NEW_TEXT[:300])
    assert new_ids.max() >= ext.old_vocab_size and len(new_ids) < len(
        old_tok.encode(NEW_TEXT[:300])
    )
    # each new token is the concatenation of what it merges
    for i, subs in enumerate(ext.sub_tokens):
        assert ext.tokenizer.decode([ext.old_vocab_size + i]) == old_tok.decode(list(subs))


@pytest.mark.parametrize("tie", [True, False])
def test_old_logits_unchanged_and_new_rows_are_subtoken_means(
    ext: VocabExtension, tie: bool
) -> None:
    lm = _lm(ext.old_vocab_size, tie=tie)
    old_embed = lm.embed.weight.detach().clone()
    old_head = lm.lm_head.weight.detach().clone()
    x = ext.tokenizer.encode(OLD_TEXT[:200])[:24].view(2, 12)
    assert x.max() < ext.old_vocab_size
    before = lm(x).logits
    resize_lm_vocab(lm, ext)
    assert lm.vocab_size == ext.vocab_size and (lm.lm_head.weight is lm.embed.weight) == tie
    after = lm(x).logits
    assert after.shape[-1] == ext.vocab_size
    torch.testing.assert_close(after[..., : ext.old_vocab_size], before, atol=1e-6, rtol=0.0)
    for i, subs in enumerate(ext.sub_tokens):
        row = ext.old_vocab_size + i
        torch.testing.assert_close(lm.embed.weight[row], old_embed[list(subs)].mean(0))
        torch.testing.assert_close(lm.lm_head.weight[row], old_head[list(subs)].mean(0))
    torch.testing.assert_close(lm.embed.weight[: ext.old_vocab_size], old_embed, atol=0.0, rtol=0.0)


def test_mean_init_and_errors(ext: VocabExtension) -> None:
    lm = _lm(ext.old_vocab_size, tie=True)
    mean = lm.embed.weight.detach().mean(0)
    resize_lm_vocab(lm, ext, init="mean")
    torch.testing.assert_close(lm.embed.weight[ext.old_vocab_size :], mean.expand(12, -1))
    with pytest.raises(ValueError, match=f"has {ext.vocab_size} tokens"):
        resize_lm_vocab(lm, ext)
    with pytest.raises(ValueError, match="byte-level BPE"):
        extend_bpe_tokenizer(CharTokenizer.fit("abc"), NEW_TEXT, num_new_tokens=2)


def test_continued_training_learns_the_new_text(ext: VocabExtension) -> None:
    lm = _lm(ext.old_vocab_size, tie=True)
    resize_lm_vocab(lm, ext)
    ids = ext.tokenizer.encode(NEW_TEXT)
    blocks = torch.stack([ids[i : i + 17] for i in range(0, 16 * 17, 17)])
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = lm(blocks[:, :-1], blocks[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        assert lm.embed.weight.grad[ext.old_vocab_size :].abs().sum() > 0  # new rows learn
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_lm_extend_vocab_experiment(tmp_path: Path, shakespeare_path: Path) -> None:
    from mtl.training.build import load_module
    from mtl.training.config import compose_config
    from mtl.training.train import train

    tiny = [
        "data.block_size=32",
        "data.batch_size=8",
        "data.steps_per_epoch=15",
        "trainer.max_steps=15",
        "trainer.enable_progress_bar=false",
        "generate.max_new_tokens=5",
        "model.n_layers=1",
    ]
    base_run = [
        "experiment=lm_dense",
        "data.tokenizer=bpe",
        "+data.tokenizer_kwargs.vocab_size=300",
        f"output_dir={tmp_path / 'base'}",
        *tiny,
    ]
    base_ckpt = train(compose_config("train", base_run))["last_ckpt"]
    res = train(
        compose_config(
            "train",
            [
                "experiment=lm_extend_vocab",
                f"model.checkpoint={base_ckpt}",
                "model.num_new_tokens=16",
                f"data.path={shakespeare_path}",
                f"output_dir={tmp_path / 'ext'}",
                *tiny[:-1],
            ],
        )
    )
    assert res["global_step"] == 15
    tuned = load_module(res["last_ckpt"])
    assert tuned.net.vocab_size == 300 + 16 and tuned.tokenizer.vocab_size == 316


def test_between_reads_the_learned_extension_off_the_two_tokenizers(
    ext: VocabExtension, old_tok: BPETokenizer
) -> None:
    """The extension read off the merges equals the one built while learning them."""
    read = VocabExtension.between(old_tok, ext.tokenizer)
    assert read.tokenizer is ext.tokenizer and read.old_vocab_size == ext.old_vocab_size
    assert read.new_tokens == ext.new_tokens and read.sub_tokens == ext.sub_tokens
    with pytest.raises(ValueError, match="does not start with the trained tokenizer"):
        VocabExtension.between(BPETokenizer.train(NEW_TEXT, vocab_size=290), ext.tokenizer)
    with pytest.raises(ValueError, match="byte-level BPE"):
        VocabExtension.between(CharTokenizer.fit("abc"), ext.tokenizer)


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count checkpoint loads (``load_module``) and BPE learning (``BPETokenizer.train``)."""
    import mtl.training.build as build_mod

    calls = {"load": 0, "learn": 0}
    load, learn = build_mod.load_module, BPETokenizer.train.__func__  # type: ignore[attr-defined]

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        calls["load"] += 1
        return load(*args, **kwargs)

    def counted_learn(cls: type, *args: Any, **kwargs: Any) -> Any:
        calls["learn"] += 1
        return learn(cls, *args, **kwargs)

    monkeypatch.setattr(build_mod, "load_module", counted_load)
    monkeypatch.setattr(BPETokenizer, "train", classmethod(counted_learn))
    return calls


def test_a_run_loads_the_checkpoint_and_learns_the_merges_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtl.data.text_corpus import default_corpus
    from mtl.training.build import build_datamodule, build_module, load_module
    from mtl.training.config import compose_config
    from mtl.training.train import train

    (tmp_path / "old.txt").write_text(default_corpus()[:20_000])
    (tmp_path / "new.txt").write_text(default_corpus()[20_000:40_000].upper())  # new merges
    tiny = [
        "data.block_size=16",
        "data.batch_size=4",
        "data.steps_per_epoch=2",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "generate.max_new_tokens=3",
    ]
    base = train(
        compose_config(
            "train",
            [
                "experiment=lm_dense",
                f"data.path={tmp_path / 'old.txt'}",
                "data.tokenizer=bpe",
                "+data.tokenizer_kwargs.vocab_size=300",
                "model.d_model=16",
                "model.n_layers=1",
                "model.n_heads=2",
                "model.d_ff=32",
                f"output_dir={tmp_path / 'base'}",
                *tiny,
            ],
        )
    )
    cfg = compose_config(
        "train",
        [
            "experiment=lm_extend_vocab",
            f"model.checkpoint={base['last_ckpt']}",
            f"data.path={tmp_path / 'new.txt'}",
            "model.num_new_tokens=12",
            f"output_dir={tmp_path / 'ext'}",
            *tiny,
        ],
    )
    # the result of loading and learning by hand, before the counting starts
    ref = load_module(base["last_ckpt"])
    ref_ext = extend_bpe_tokenizer(
        ref.tokenizer, (tmp_path / "new.txt").read_text(), num_new_tokens=12
    )
    resize_lm_vocab(ref.net, ref_ext)

    calls = _counting(monkeypatch)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    assert calls == {"load": 1, "learn": 1}
    assert dm.tokenizer.state_dict() == ref_ext.tokenizer.state_dict()
    assert module.net.vocab_size == ref_ext.vocab_size == 300 + 12
    want = ref.net.state_dict()
    got = module.net.state_dict()
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert torch.equal(value, want[name]), name

    calls.update(load=0, learn=0)
    assert train(cfg)["global_step"] == 2
    assert calls == {"load": 1, "learn": 1}


def test_extension_warns_when_the_text_gives_fewer_new_tokens(old_tok: BPETokenizer) -> None:
    with pytest.warns(
        UserWarning, match=r"BPE learned only \d+ of the 5000 new tokens asked"
    ) as rec:
        ext = extend_bpe_tokenizer(old_tok, NEW_TEXT, num_new_tokens=5000)
    messages = [str(w.message) for w in rec if "BPE learned only" in str(w.message)]
    # one warning, about the new tokens (not the learner's own vocabulary size)
    assert messages == [
        f"BPE learned only {len(ext.new_tokens)} of the 5000 new tokens asked (the text is too small)"
    ]
    assert ext.tokenizer.vocab_size - old_tok.vocab_size == len(ext.new_tokens) < 5000


def test_extension_is_silent_when_it_adds_the_tokens_asked(old_tok: BPETokenizer) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ext = extend_bpe_tokenizer(old_tok, NEW_TEXT, num_new_tokens=3)
    assert len(ext.new_tokens) == 3
