"""Vocabulary extension of a trained LM (the Chinese-LLaMA / Chinese-Mixtral recipe).

1. :func:`extend_bpe_tokenizer` learns a byte-level BPE on the new text and
   appends its merges whose tokens the trained vocabulary lacks, after the
   trained merges: new ids ``V_old ..``, new merges of lower priority. BPE
   applies merges lowest rank first, so on any text the extended tokenizer
   first produces exactly the trained tokenizer's tokens and then merges some
   of them further: text where no new merge applies encodes as before, and
   expanding every new token into the trained tokens it merges
   (:meth:`VocabExtension.expand`) gives back the trained tokenizer's ids.
2. :func:`resize_lm_vocab` grows the embedding and the output layer to the new
   size: trained rows unchanged, a new token's row the mean of the rows of the
   trained tokens it merges (``init="subtoken_mean"``) or of all trained rows
   (``init="mean"``). The logits of the trained tokens are unchanged at step 0.
3. Training continues on the new text with the extended tokenizer (the
   ``lm_extend_vocab`` experiment: :meth:`VocabExtension.tokenizer_from_checkpoint`
   for the data, :meth:`VocabExtension.lm_from_checkpoint` for the model).

In a run the new merges are learned once, for the data: the data node reads
only the checkpoint's tokenizer, and the model node, which the run hands the
data's extended tokenizer, loads the trained LM once and reads the extension
off the two tokenizers (:meth:`VocabExtension.between`) instead of learning it
again.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mtl.data.tokenizers import BPETokenizer, Tokenizer
from mtl.models.lm.transformer import TransformerLM

RowInit = Literal["subtoken_mean", "mean"]


@dataclass(frozen=True)
class VocabExtension:
    """A trained tokenizer extended with new tokens, and what each new token merges.

    Attributes:
        tokenizer: the extended tokenizer (ids ``0 .. old_vocab_size - 1`` unchanged).
        old_vocab_size: ``V_old``.
        new_tokens: the new tokens (byte-level symbols), id ``V_old + i`` for entry ``i``.
        sub_tokens: for each new token, the trained token ids it merges, in order.

    Example:
        >>> old = BPETokenizer.train("the cat sat on the mat " * 40, vocab_size=262)
        >>> ext = extend_bpe_tokenizer(old, "a dog and a frog " * 40, num_new_tokens=3)
        >>> ext.tokenizer.vocab_size == old.vocab_size + 3
        True
        >>> ext.tokenizer.decode(ext.tokenizer.encode("a frog sat")) == "a frog sat"
        True
    """

    tokenizer: BPETokenizer
    old_vocab_size: int
    new_tokens: tuple[str, ...]
    sub_tokens: tuple[tuple[int, ...], ...]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def expand(self, ids: torch.Tensor) -> torch.Tensor:
        """Replace every new token of a 1-D id tensor by the trained ids it merges."""
        out: list[int] = []
        for i in ids.tolist():
            out.extend([i] if i < self.old_vocab_size else self.sub_tokens[i - self.old_vocab_size])
        return torch.tensor(out, dtype=torch.long)

    @classmethod
    def between(cls, old: Tokenizer, extended: Tokenizer) -> VocabExtension:
        """The extension that turns ``old`` into ``extended``, read off their merges (no BPE learned).

        ``extended`` must be ``old`` with merges appended, each making the next new
        id (what :func:`extend_bpe_tokenizer` builds); a new token's sub-tokens come
        from its merge, as they do there.

        Raises:
            ValueError: either is not a byte-level BPE, or ``extended`` is not ``old``
                with appended merges.

        Example:
            >>> old = BPETokenizer.train("the cat sat on the mat " * 40, vocab_size=262)
            >>> ext = extend_bpe_tokenizer(old, "a dog and a frog " * 40, num_new_tokens=3)
            >>> VocabExtension.between(old, ext.tokenizer).sub_tokens == ext.sub_tokens
            True
        """
        if not isinstance(old, BPETokenizer) or not isinstance(extended, BPETokenizer):
            raise ValueError("vocabulary extension needs byte-level BPE tokenizers")
        old_vocab, old_merges = _bpe_model(old)
        vocab, merges = _bpe_model(extended)
        old_size = old.vocab_size
        if merges[: len(old_merges)] != old_merges or any(
            vocab.get(token) != i for token, i in old_vocab.items()
        ):
            raise ValueError(
                "the extended tokenizer does not start with the trained tokenizer's vocabulary "
                "and merges: give data.tokenizer and model the same checkpoint"
            )
        expansion: dict[str, tuple[int, ...]] = {}
        new_tokens: list[str] = []
        for a, b in merges[len(old_merges) :]:
            token = a + b
            if vocab.get(token) != old_size + len(new_tokens):
                raise ValueError(
                    f"the extended tokenizer's merge {a!r} + {b!r} does not make new id "
                    f"{old_size + len(new_tokens)}"
                )
            expansion[token] = _ids(a, old_vocab, expansion) + _ids(b, old_vocab, expansion)
            new_tokens.append(token)
        if extended.vocab_size != old_size + len(new_tokens):
            raise ValueError(
                f"the extended tokenizer has {extended.vocab_size} tokens, the trained one "
                f"{old_size} plus {len(new_tokens)} appended merges"
            )
        return cls(
            tokenizer=extended,
            old_vocab_size=old_size,
            new_tokens=tuple(new_tokens),
            sub_tokens=tuple(expansion[t] for t in new_tokens),
        )

    @classmethod
    def from_checkpoint(
        cls, *, checkpoint: str, text_path: str | None, num_new_tokens: int, min_frequency: int = 2
    ) -> tuple[VocabExtension, TransformerLM]:
        """The extension of a training checkpoint's tokenizer on a text, and the checkpoint's LM.

        Loads the checkpoint and learns the new merges; a run does each once
        (:meth:`tokenizer_from_checkpoint`, :meth:`lm_from_checkpoint`).

        Args:
            checkpoint: a ``mtl train`` checkpoint of an LM trained with a BPE tokenizer.
            text_path: the new text (UTF-8 file); None for the embedded corpus.
            num_new_tokens: how many tokens to add (at most).
            min_frequency: a new merge must occur this often in the new text.
        """
        from mtl.data.text import default_corpus, load_text

        net, tokenizer = _load_lm(checkpoint)
        text = default_corpus() if text_path is None else load_text(text_path)
        ext = extend_bpe_tokenizer(
            tokenizer, text, num_new_tokens=num_new_tokens, min_frequency=min_frequency
        )
        return ext, net

    @classmethod
    def tokenizer_from_checkpoint(
        cls, *, checkpoint: str, text_path: str | None, num_new_tokens: int, min_frequency: int = 2
    ) -> BPETokenizer:
        """The extended tokenizer alone: the ``data.tokenizer`` node of the experiment.

        Reads only the checkpoint's tokenizer (no network is built) and learns the
        new merges on the text.
        """
        from mtl.data.text import default_corpus, load_text
        from mtl.training.checkpoints import read_checkpoint  # training builds on the models

        _check_file(checkpoint)
        saved = read_checkpoint(checkpoint, role="model.checkpoint").get("lm_tokenizer")
        if saved is None:
            raise ValueError(
                f"model.checkpoint: {checkpoint} holds no language model with a tokenizer"
            )
        text = default_corpus() if text_path is None else load_text(text_path)
        ext = extend_bpe_tokenizer(
            Tokenizer.from_state(saved["state"]),
            text,
            num_new_tokens=num_new_tokens,
            min_frequency=min_frequency,
        )
        return ext.tokenizer

    @classmethod
    def lm_from_checkpoint(
        cls,
        *,
        checkpoint: str,
        text_path: str | None,
        num_new_tokens: int,
        min_frequency: int = 2,
        init: RowInit = "subtoken_mean",
        vocab_size: int | None = None,
        max_seq_len: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> TransformerLM:
        """The checkpoint's LM resized to the extended vocabulary: the experiment's ``model`` node.

        ``vocab_size``, ``max_seq_len`` and ``tokenizer`` are the data's (the run
        passes them). With ``tokenizer`` (the data's extended tokenizer) the
        extension is read off it and the checkpoint's tokenizer
        (:meth:`between`), so the merges are not learned a second time; without
        it they are learned here (``text_path``, ``num_new_tokens``, ``min_frequency``),
        with the same result. The vocabulary must be the extension's (same
        checkpoint, text and count).
        """
        if tokenizer is None:
            ext, lm = cls.from_checkpoint(
                checkpoint=checkpoint,
                text_path=text_path,
                num_new_tokens=num_new_tokens,
                min_frequency=min_frequency,
            )
        else:
            lm, trained = _load_lm(checkpoint)
            ext = cls.between(trained, tokenizer)
            if len(ext.new_tokens) > num_new_tokens:
                raise ValueError(
                    f"the data's tokenizer adds {len(ext.new_tokens)} tokens to the checkpoint's, "
                    f"more than num_new_tokens={num_new_tokens}"
                )
        if vocab_size is not None and vocab_size != ext.vocab_size:
            raise ValueError(
                f"the data's tokenizer has {vocab_size} tokens, the extension {ext.vocab_size}: "
                "give data.tokenizer and model the same checkpoint, text and num_new_tokens"
            )
        if max_seq_len is not None and max_seq_len > lm.max_seq_len:
            raise ValueError(
                f"data.block_size={max_seq_len} exceeds the checkpoint's max_seq_len={lm.max_seq_len}"
            )
        resize_lm_vocab(lm, ext, init=init)
        return lm


def _check_file(checkpoint: str) -> None:
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"model.checkpoint: no checkpoint file {checkpoint}")


def _load_lm(checkpoint: str) -> tuple[TransformerLM, Tokenizer]:
    """The LM of a training checkpoint, with its weights, and its tokenizer."""
    from mtl.training.build import load_module  # the training layer builds on the models

    _check_file(checkpoint)
    module = load_module(checkpoint)
    if not isinstance(module.net, TransformerLM) or module.tokenizer is None:
        raise ValueError(f"model.checkpoint: {checkpoint} holds no language model with a tokenizer")
    return module.net, module.tokenizer


def _bpe_model(tokenizer: BPETokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE tokenizer's vocabulary and merges, in rank order."""
    model = json.loads(tokenizer.state_dict()["hf_json"])["model"]
    # tokenizers writes a merge as a pair, older versions as one "a b" string
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges  # type: ignore[return-value]


def extend_bpe_tokenizer(
    tokenizer: Tokenizer, text: str, *, num_new_tokens: int, min_frequency: int = 2
) -> VocabExtension:
    """Add up to ``num_new_tokens`` tokens learned by byte-level BPE on ``text`` to ``tokenizer``.

    A BPE is trained on ``text`` alone; its merges are taken in order, those
    making a token the trained vocabulary lacks are appended (with the token)
    after the trained merges until ``num_new_tokens`` are added.

    Raises:
        ValueError: ``tokenizer`` is not a byte-level BPE, or ``text`` yields no new token.
    """
    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(
            "vocabulary extension needs a byte-level BPE tokenizer (train with data.tokenizer=bpe), "
            f"got a {tokenizer.kind!r} tokenizer"
        )
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
    state = json.loads(tokenizer.state_dict()["hf_json"])
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list[list[str]] = state["model"]["merges"]
    old_size = tokenizer.vocab_size
    # at most this many merges can be new; the learner may stop earlier on a short text,
    # which the count of new tokens below reports, so the learner's own warning is not shown
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="BPE learned only", category=UserWarning)
        learner = BPETokenizer.train(
            text, vocab_size=256 + len(merges) + num_new_tokens, min_frequency=min_frequency
        )
    learned = json.loads(learner.state_dict()["hf_json"])["model"]["merges"]
    expansion: dict[str, tuple[int, ...]] = {}
    new_tokens: list[str] = []
    for a, b in learned:
        token = a + b
        if token in vocab:
            continue
        # every part is a trained token or a token added before (merges come in order)
        expansion[token] = _ids(a, vocab, expansion) + _ids(b, vocab, expansion)
        vocab[token] = old_size + len(new_tokens)
        merges.append([a, b])
        new_tokens.append(token)
        if len(new_tokens) == num_new_tokens:
            break
    if not new_tokens:
        raise ValueError("the new text yields no token the trained vocabulary lacks")
    if len(new_tokens) < num_new_tokens:
        warnings.warn(
            f"BPE learned only {len(new_tokens)} of the {num_new_tokens} new tokens asked "
            "(the text is too small)",
            UserWarning,
            stacklevel=2,
        )
    extended = Tokenizer.from_state({"kind": "bpe", "hf_json": json.dumps(state)})
    assert isinstance(extended, BPETokenizer)
    return VocabExtension(
        tokenizer=extended,
        old_vocab_size=old_size,
        new_tokens=tuple(new_tokens),
        sub_tokens=tuple(expansion[t] for t in new_tokens),
    )


def _ids(
    piece: str, vocab: dict[str, int], expansion: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    return expansion[piece] if piece in expansion else (vocab[piece],)


@torch.no_grad()
def resize_lm_vocab(
    lm: TransformerLM, ext: VocabExtension, *, init: RowInit = "subtoken_mean"
) -> None:
    """Grow ``lm``'s embedding and output layer to the extended vocabulary, in place.

    Args:
        lm: a model of ``ext.old_vocab_size`` tokens.
        ext: the extension.
        init: ``"subtoken_mean"``: a new row is the mean of the rows of the
            trained tokens it merges; ``"mean"``: the mean of all trained rows.
            Applied to the embedding and (when untied) the output layer alike.
    """
    if lm.vocab_size != ext.old_vocab_size:
        raise ValueError(
            f"the model has {lm.vocab_size} tokens, the extended tokenizer was trained for "
            f"{ext.old_vocab_size}"
        )
    if init not in ("subtoken_mean", "mean"):
        raise ValueError(f"init must be 'subtoken_mean' or 'mean', got {init!r}")
    tied = lm.lm_head.weight is lm.embed.weight
    lm.embed.weight = nn.Parameter(_grown(lm.embed.weight, ext, init))
    lm.embed.num_embeddings = ext.vocab_size
    head = nn.Linear(lm.d_model, ext.vocab_size, bias=False)
    head.weight = lm.embed.weight if tied else nn.Parameter(_grown(lm.lm_head.weight, ext, init))
    lm.lm_head = head.to(lm.embed.weight.device)
    lm.vocab_size = ext.vocab_size


def _grown(w_VD: torch.Tensor, ext: VocabExtension, init: RowInit) -> torch.Tensor:
    """``(V_old, D)`` rows plus one initialised row per new token: ``(V_new, D)``."""
    if init == "mean":
        new_ND = w_VD.mean(0, keepdim=True).expand(len(ext.new_tokens), -1)
    else:
        new_ND = torch.stack([w_VD[list(ids)].mean(0) for ids in ext.sub_tokens])
    return torch.cat([w_VD.detach(), new_ND.to(w_VD.dtype)]).clone()
