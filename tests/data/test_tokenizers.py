"""Tests for mtl.data.tokenizers: round trips, vocabularies, state and fingerprints, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mtl.data.tokenizers import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
)

UNICODE_TEXT = "naïve café — 日本語, emoji 😀, combining e\u0301, tab\tand\nnewline"


# ---------------------------------------------------------------- byte


def test_byte_encode_is_utf8_bytes() -> None:
    ids = ByteTokenizer().encode("aé😀")
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == list("aé😀".encode())
    assert ids.tolist()[:3] == [97, 0xC3, 0xA9]


def test_byte_round_trip_unicode() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert tok.encode("").shape == (0,)
    assert tok.decode([]) == ""


def test_byte_decode_cut_character_is_replaced_not_raised() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")
    assert tok.decode(ids[:1]) == "\ufffd"


# ---------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_unique_chars() -> None:
    tok = CharTokenizer.fit("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8
    # " "=0 d=1 e=2 h=3 l=4 o=5 r=6 w=7
    assert tok.encode("hello").tolist() == [3, 2, 4, 4, 5]
    assert tok.encode("hello").dtype == torch.long


def test_char_round_trip_unicode() -> None:
    tok = CharTokenizer.fit(UNICODE_TEXT)
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(ids.view(2, -1) if len(ids) % 2 == 0 else ids) == UNICODE_TEXT
    # Ids follow code-point order, including astral characters.
    assert tok.encode("😀").item() == tok.vocab_size - 1


def test_char_unknown_character_error_names_char_and_position() -> None:
    tok = CharTokenizer.fit("abc")
    with pytest.raises(ValueError, match=r"unknown character 'z' \(U\+007A\) at position 3"):
        tok.encode("abcz a")
    with pytest.raises(ValueError, match="position 0"):
        tok.encode("😀")


def test_char_unk_token() -> None:
    tok = CharTokenizer.fit("abc", unk_token="<unk>")
    assert tok.vocab_size == 4
    assert tok.encode("azb😀").tolist() == [0, 3, 1, 3]
    assert tok.decode([0, 3, 1]) == "a<unk>b"


def test_char_rejects_bad_vocabularies() -> None:
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(chars=["ab"])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.fit("")


def test_decode_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer.fit("ab").decode([0, 2])
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([256])


# ---------------------------------------------------------------- state and fingerprints


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_state_round_trip_keeps_ids_and_fingerprint(kind: str) -> None:
    tok = build_tokenizer(kind, UNICODE_TEXT)
    state = json.loads(json.dumps(tok.state_dict()))  # must survive JSON (checkpoints)
    again = Tokenizer.from_state(state)
    assert type(again) is type(tok)
    assert again.fingerprint() == tok.fingerprint()
    assert torch.equal(again.encode(UNICODE_TEXT), tok.encode(UNICODE_TEXT))


def test_fingerprint_is_pinned_and_vocabulary_sensitive() -> None:
    # Pinned: a change of the hashing scheme would make every stored checkpoint
    # look incompatible on resume.
    assert CharTokenizer.fit("hello").fingerprint() == CharTokenizer.fit("olleh").fingerprint()
    assert CharTokenizer.fit("hello").fingerprint() == "2ca971497dba2d0a"
    assert ByteTokenizer().fingerprint() == "68513ce4c5d4b673"
    fps = {
        CharTokenizer.fit("hello").fingerprint(),
        CharTokenizer.fit("hellp").fingerprint(),
        CharTokenizer.fit("hello", unk_token="<unk>").fingerprint(),
        ByteTokenizer().fingerprint(),
    }
    assert len(fps) == 4


def test_check_compatible_detects_vocabulary_mismatch() -> None:
    tok = CharTokenizer.fit("abc")
    tok.check_compatible(CharTokenizer.fit("cba").state_dict())
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*vocab_size=4.*vocab_size=3"):
        tok.check_compatible(CharTokenizer.fit("abcd").state_dict())
    with pytest.raises(ValueError, match="mismatch"):
        tok.check_compatible(ByteTokenizer().state_dict())


def test_from_state_errors() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind 'nope'"):
        Tokenizer.from_state({"kind": "nope"})
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.from_state(ByteTokenizer().state_dict())


def test_defining_a_subclass_does_not_make_its_kind_loadable() -> None:
    class ReversedBytes(ByteTokenizer):
        kind = "reversed-bytes"

    with pytest.raises(ValueError, match="unknown tokenizer kind 'reversed-bytes'"):
        Tokenizer.from_state(ReversedBytes().state_dict())
    assert type(Tokenizer.from_state(ByteTokenizer().state_dict())) is ByteTokenizer


def test_build_tokenizer_unknown_kind_lists_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'wordpiece'.*byte, char, bpe"):
        build_tokenizer("wordpiece", "text")
    assert TOKENIZER_KINDS == ("byte", "char", "bpe")


# ---------------------------------------------------------------- shakespeare


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_shakespeare_encodes_losslessly(shakespeare_path: Path, kind: str) -> None:
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = build_tokenizer(kind, text)
    ids = tok.encode(text)
    assert len(ids) == 1_115_394  # the file is ASCII: one byte = one char = one token
    assert tok.vocab_size == {"byte": 256, "char": 65}[kind]
    assert tok.decode(ids) == text


# ---------------------------------------------------------------- BPE (optional dependency)


def test_bpe_without_tokenizers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer("bpe", "some text")


def test_bpe_round_trip_state_and_determinism() -> None:
    pytest.importorskip("tokenizers")
    from mtl.data.tokenizers import BPETokenizer

    train = "the cat sat on the mat.\nthe dog sat on the log.\n\n" * 200
    tok = build_tokenizer("bpe", train, vocab_size=300)
    assert isinstance(tok, BPETokenizer)
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode("the cat sat on the mat.")
    assert len(ids) < len("the cat sat on the mat.") / 2  # merges learned
    # Byte-level: lossless even for characters never seen in training.
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    again = Tokenizer.from_state(json.loads(json.dumps(tok.state_dict())))
    assert torch.equal(again.encode(UNICODE_TEXT), tok.encode(UNICODE_TEXT))
    assert build_tokenizer("bpe", train, vocab_size=300).fingerprint() == tok.fingerprint()
    assert build_tokenizer("bpe", train, vocab_size=265).fingerprint() != tok.fingerprint()
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        build_tokenizer("bpe", train, vocab_size=100)


def test_bpe_chunked_encoding_equals_whole_text_encoding() -> None:
    pytest.importorskip("tokenizers")
    # Blank lines, trailing and leading spaces between lines: where a naive cut at any
    # newline would change the pre-tokens (and so the ids).
    seps = ["\n", "\n\n", " \n", "\n\n\n", "\n  ", "\n"]
    text = "".join(
        f"Line {i}: it's {'so ' * (i % 7)}good,  isn't it?{seps[i % 6]}" for i in range(6000)
    )
    tok = build_tokenizer("bpe", text, vocab_size=400)
    whole = tok._hf.encode(text).ids  # type: ignore[attr-defined]
    assert tok.encode(text).tolist() == whole
    assert tok.decode(tok.encode(text)) == text


def test_bpe_warns_when_it_learns_fewer_tokens_than_asked() -> None:
    pytest.importorskip("tokenizers")
    text = "the cat sat on the mat\n" * 20
    with pytest.warns(UserWarning, match=r"BPE learned only \d+ of the 5000 tokens asked") as rec:
        tok = BPETokenizer.train(text, vocab_size=5000)
    (msg,) = [str(w.message) for w in rec if "BPE learned only" in str(w.message)]
    # 256 bytes + one token per merge the trainer learned
    merges = json.loads(tok.state_dict()["hf_json"])["model"]["merges"]
    assert f"only {256 + len(merges)} of" in msg and "\n" not in msg
    assert tok.vocab_size < 5000


def test_bpe_is_silent_when_it_learns_the_tokens_asked() -> None:
    pytest.importorskip("tokenizers")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = BPETokenizer.train("the cat sat on the mat\n" * 20, vocab_size=260)
    assert tok.vocab_size == 260
