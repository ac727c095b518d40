"""Tokenizers for language-model data: byte, character and (optional) BPE.

Every tokenizer maps ``str -> LongTensor (N,)`` and back, and can be stored in a
checkpoint (:meth:`Tokenizer.state_dict`) and rebuilt from it
(:meth:`Tokenizer.from_state`). :meth:`Tokenizer.fingerprint` is a stable hash
of the vocabulary: a resume compares it with the data's tokenizer, because the
same ids under a different vocabulary silently mean different characters.

Encoding is vectorised (no Python loop per character) so that a megabyte of
text encodes in milliseconds.

Example:
    >>> tok = build_tokenizer("char", "hello world")
    >>> tok.decode(tok.encode("hello")) == "hello"
    True
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "build_tokenizer",
]

TokenIds = torch.Tensor | np.ndarray | Sequence[int]


def _as_id_list(ids: TokenIds, vocab_size: int) -> list[int]:
    """Flatten ids to a Python list and reject out-of-range ids with a clear message."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().reshape(-1).tolist()
    elif isinstance(ids, np.ndarray):
        ids = ids.reshape(-1).tolist()
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for vocab_size={vocab_size}")
    return out


class Tokenizer(ABC):
    """Interface of every tokenizer.

    Subclasses set ``kind`` (the name used by :func:`build_tokenizer` and stored
    in :meth:`state_dict`) and implement ``vocab_size``, ``encode``, ``decode``,
    ``state_dict`` and ``_from_state``; :meth:`from_state` loads the kinds listed
    in the module's ``_KINDS`` table.

    Example:
        >>> tok = ByteTokenizer()
        >>> again = Tokenizer.from_state(tok.state_dict())
        >>> again.fingerprint() == tok.fingerprint()
        True
    """

    kind: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; valid ids are ``0 .. vocab_size - 1``."""

    @abstractmethod
    def encode(self, text: str) -> torch.Tensor:
        """Encode ``text`` into a 1-D ``torch.long`` tensor of shape ``(N,)``."""

    @abstractmethod
    def decode(self, ids: TokenIds) -> str:
        """Decode ids (tensor of any shape, flattened; array; or list) back to text."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, with ``"kind"``, that :meth:`from_state` rebuilds."""

    @classmethod
    @abstractmethod
    def _from_state(cls, state: Mapping[str, Any]) -> Tokenizer:
        """Rebuild this class from its own :meth:`state_dict`."""

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`state_dict`, dispatching on ``state["kind"]``.

        Called on a subclass (``CharTokenizer.from_state``), the state must be of
        that kind.
        """
        kind = state.get("kind")
        target = _KINDS.get(str(kind))
        if target is None:
            raise ValueError(f"unknown tokenizer kind {kind!r} in state; known: {sorted(_KINDS)}")
        if not issubclass(target, cls):
            raise ValueError(f"state is of a {kind!r} tokenizer, not a {cls.__name__}")
        return target._from_state(state)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the vocabulary (kind and state), same in every process."""
        blob = json.dumps(self.state_dict(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]

    def check_compatible(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` when ``state`` (e.g. from a checkpoint) has another vocabulary."""
        other = Tokenizer.from_state(state)
        if other.fingerprint() != self.fingerprint():
            raise ValueError(
                "tokenizer vocabulary mismatch: the checkpoint has a "
                f"{other.kind} tokenizer with vocab_size={other.vocab_size} "
                f"(fingerprint {other.fingerprint()}), the data has a {self.kind} tokenizer "
                f"with vocab_size={self.vocab_size} (fingerprint {self.fingerprint()}); "
                "token ids would mean different things. Train on the same text and "
                "tokenizer, or pass the checkpoint's tokenizer to the data module."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()!r})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocabulary of 256, lossless for any text, nothing to fit.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("é").tolist()
        [195, 169]
        >>> tok.decode([195, 169])
        'é'
    """

    kind: ClassVar[str] = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8", errors="surrogatepass")
        if not data:
            return torch.empty(0, dtype=torch.long)
        # frombuffer shares the bytearray's memory; .long() makes the owned copy.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: TokenIds) -> str:
        # A slice may cut a multi-byte character; replace it rather than fail on sampling.
        return bytes(_as_id_list(ids, 256)).decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any]) -> ByteTokenizer:
        return cls()


class CharTokenizer(Tokenizer):
    """One token per Unicode character, vocabulary = sorted unique characters.

    Args:
        chars: The vocabulary characters (any order, duplicates ignored); id ``i``
            is the ``i``-th character in code-point order.
        unk_token: If given, unknown characters encode to an extra id
            ``vocab_size - 1`` that decodes to this string; if ``None`` (default),
            encoding an unknown character raises ``ValueError``.

    Example:
        >>> tok = CharTokenizer.fit("abba")
        >>> tok.encode("ab").tolist(), tok.vocab_size
        ([0, 1], 2)
    """

    kind: ClassVar[str] = "char"

    def __init__(self, *, chars: str | Sequence[str], unk_token: str | None = None) -> None:
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {c!r}")
        if not chars:
            raise ValueError("a CharTokenizer needs at least one character")
        if unk_token is not None and not unk_token:
            raise ValueError("unk_token must be a non-empty string or None")
        # Python orders strings by code point, so this is also the sorted code-point array.
        self.chars: list[str] = sorted(set(chars))
        self.unk_token = unk_token
        self._codes = np.fromiter((ord(c) for c in self.chars), dtype=np.int64)
        self._itos = [*self.chars, *([unk_token] if unk_token is not None else [])]

    @classmethod
    def fit(cls, text: str, *, unk_token: str | None = None) -> CharTokenizer:
        """Vocabulary of the characters occurring in ``text``."""
        if not text:
            raise ValueError("cannot fit a CharTokenizer on empty text")
        return cls(chars=sorted(set(text)), unk_token=unk_token)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> torch.Tensor:
        if not text:
            return torch.empty(0, dtype=torch.long)
        # UTF-32 gives one fixed-width code point per character; searchsorted maps
        # code points to ids in C without a Python loop or a 1.1M-entry table.
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        codes = codes.astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        unknown = self._codes[ids_clipped] != codes
        if unknown.any():
            if self.unk_token is None:
                pos = int(np.flatnonzero(unknown)[0])
                raise ValueError(
                    f"unknown character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} "
                    f"({int(unknown.sum())} unknown characters in total); the vocabulary has "
                    f"{len(self.chars)} characters. For training, fit it on text that contains "
                    "it or set data.tokenizer_kwargs.unk_token='<unk>'; at generate time the "
                    "checkpoint's vocabulary is fixed, so leave the character out of the prompt."
                )
            ids = np.where(unknown, len(self.chars), ids)
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: TokenIds) -> str:
        itos = self._itos
        return "".join([itos[i] for i in _as_id_list(ids, len(itos))])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": "".join(self.chars), "unk_token": self.unk_token}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any]) -> CharTokenizer:
        return cls(chars=state["chars"], unk_token=state.get("unk_token"))


def _import_hf_tokenizers() -> Any:
    """Import the optional HF ``tokenizers`` package, or explain how to install it."""
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "BPETokenizer needs the optional 'tokenizers' package: pip install tokenizers"
        ) from err
    return tokenizers


# Between "X\n" and "Y" (X, Y not whitespace) the GPT-2 byte-level regex always ends
# a pre-token, so text cut there pre-tokenises exactly as the whole; a blank line
# ("\n\n") is *not* safe: at the end of a chunk it would become one pre-token.
_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")


def _safe_chunks(text: str, size: int = 4096) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters at safe pre-token boundaries."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        match = _SAFE_SPLIT.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with the HF ``tokenizers`` library (optional dependency).

    Byte-level pre-tokenisation makes it lossless for any text: the 256 byte
    symbols are always in the vocabulary, merges are learned on top.

    Args:
        hf_tokenizer: A trained ``tokenizers.Tokenizer``; use :meth:`train` to make one.

    Example:
        >>> tok = BPETokenizer.train("the cat sat on the mat " * 50, vocab_size=260)
        >>> tok.decode(tok.encode("the mat")) == "the mat"
        True
    """

    kind: ClassVar[str] = "bpe"

    def __init__(self, *, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer

    @classmethod
    def train(cls, text: str, *, vocab_size: int = 512, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges on ``text`` until ``vocab_size`` tokens (at least 256: the bytes)."""
        hf = _import_hf_tokenizers()
        if vocab_size < 256:
            raise ValueError(f"byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        if not text:
            raise ValueError("cannot train a BPETokenizer on empty text")
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_safe_chunks(text), trainer=trainer)
        learned = int(tok.get_vocab_size())
        if learned < vocab_size:
            # the trainer stops silently when no pair occurs min_frequency times
            warnings.warn(
                f"BPE learned only {learned} of the {vocab_size} tokens asked (the text is too "
                f"small for more merges occurring >= {min_frequency} times)",
                UserWarning,
                stacklevel=2,
            )
        return cls(hf_tokenizer=tok)

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size())

    def encode(self, text: str) -> torch.Tensor:
        if not text:
            return torch.empty(0, dtype=torch.long)
        # One call on a long string is slow; chunks at pre-token boundaries give identical
        # ids faster, serially (no rayon pool, so no fork warnings).
        ids = itertools.chain.from_iterable(self._hf.encode(c).ids for c in _safe_chunks(text))
        return torch.tensor(list(ids), dtype=torch.long)

    def decode(self, ids: TokenIds) -> str:
        return self._hf.decode(_as_id_list(ids, self.vocab_size), skip_special_tokens=False)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hf_json": self._hf.to_str()}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any]) -> BPETokenizer:
        hf = _import_hf_tokenizers()
        return cls(hf_tokenizer=hf.Tokenizer.from_str(state["hf_json"]))


# The kinds a saved state may name: a fixed table, so defining a subclass elsewhere
# (a test, a user module) changes nothing here.
_KINDS: Mapping[str, type[Tokenizer]] = {
    "byte": ByteTokenizer,
    "char": CharTokenizer,
    "bpe": BPETokenizer,
}
TOKENIZER_KINDS: tuple[str, ...] = tuple(_KINDS)


def build_tokenizer(kind: str, text: str, **kwargs: Any) -> Tokenizer:
    """Build (and fit on ``text`` where needed) a tokenizer by name.

    Args:
        kind: One of :data:`TOKENIZER_KINDS`: ``"byte"``, ``"char"``, ``"bpe"``.
        text: Text to fit the vocabulary on (ignored by ``"byte"``).
        **kwargs: Passed to the fitting method: ``unk_token`` for ``"char"``;
            ``vocab_size``, ``min_frequency`` for ``"bpe"``.

    Example:
        >>> build_tokenizer("byte", "").vocab_size
        256
    """
    if kind == "byte":
        if kwargs:
            raise TypeError(f"the byte tokenizer takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.fit(text, **kwargs)
    if kind == "bpe":
        return BPETokenizer.train(text, **kwargs)
    raise ValueError(f"unknown tokenizer kind {kind!r}; known kinds: {', '.join(TOKENIZER_KINDS)}")
